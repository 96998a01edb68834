// Small-M kernel with A in workgroup memory: C[m, col] partial sums over one k-split for M_TILE
// rows of A, each weight dequantized once and used for every row from registers.
//
// One workgroup = one 64-column Marlin chunk of one expert x one k-split x one m-tile (m-tiles of
// a chunk are neighbours in grid x, so all but the first find the weight in cache). Its
// LANES * K_SLOTS invocations are K_SLOTS k-slots x LANES lanes; a lane owns J consecutive words
// of each chunk row (LANES = 128 / J) and loads them as one vecJ<u32>.
//
// Which words: word w = 4t + j of a chunk row is Marlin's B fragment of warp lane t for n-tile j:
// k rows {r0, r0+1, r0+8, r0+9} (r0 = 2*(t%4)) and columns {16j + c, 16j + c + 8} (c = t/4).
// Lanes are mapped so that each 32 lanes read 32 consecutive vectors (coalesced) and t%4 is the
// low two bits of the lane: t4 = l % 4, jg = (l / 4) % (4 / J), c = 2J * (l / 32) + (l % 32) / (16 / J)
// (l: lane within the k-slot), words 4t + J jg .. + J - 1. Lanes l, l^1, l^2, l^3 share columns
// (the same c and j, the four t%4), so they are summed with two subgroup shuffles.
//
// A: the k-split's rows of A are staged in workgroup memory, STAGE_KT kt rows at a time, as fp32
// and laid out for the fragment: sh[(kt * 4 + t4) * M_TILE + m] = vec4(A[m, 16kt + r0 + {0,1,8,9}])
// (r0 = 2 t4), so a lane reads the four A values of one row with one vector load (a warp: 4
// distinct addresses, broadcast) and uses them for its J words: 8J fmas a load.
// Slot s takes kt rows kt0 + s, + K_SLOTS, ... (ROWS of them a stage); the next stage's weights
// are loaded while this one's are multiplied.
//
// Dequantization: nibbles p, p+4 of a word are rows (r, r+1) of one column; OR'd into the
// mantissa of fp16 1024 they are the halves 1024 + q, exact, which unpack2x16float turns into two
// floats. With PRESCALE (several rows share each weight) w = fma(1024 + q, s, -1032 s) = (q - 8) s
// once per weight; else (1 or 2 rows) a row's dot of the raw values with its 4 A values, minus
// 1032 times their sum, is scaled: acc += s * (sum (1024 + q) a - 1032 sum a).
// Channelwise scales (one group) are applied to the column sums at the end.
//
// Reduction: the 4 lanes sharing columns (subgroup shuffles, or workgroup memory), then the
// k-slots in workgroup memory, in rounds of RED_ROWS rows; the 64 column sums of a row go to the
// fp32 scratch slot of this split (reduce.wgsl adds the slots), or with DIRECT straight to C.

{{PARAMS}}
{{TABLES}}

const M_TILE: u32 = {{M_TILE}}u;
const J: u32 = {{J}}u;                       // words a lane owns per chunk row
const LANES: u32 = 128u / J;                 // lanes per k-slot
const K_SLOTS: u32 = {{K_SLOTS}}u;
const INVOCATIONS: u32 = LANES * K_SLOTS;
const ROWS: u32 = {{ROWS}}u;                 // kt rows a slot takes per stage
const STAGE_KT: u32 = K_SLOTS * ROWS;        // kt rows of A staged at a time
const A_VEC4S: u32 = STAGE_KT * 2u * M_TILE; // vec4<u32> of A per stage (8 halves each)
const SUBGROUPS: bool = {{SUBGROUPS}};
const CHANNELWISE: bool = {{CHANNELWISE}};
const PRESCALE: bool = {{PRESCALE}};
// DIRECT: this dispatch is the whole k range (one k-split, one weight piece), so the column sums
// are final: written to C as fp16 pairs, with no scratch and no reduce.wgsl pass.
const DIRECT: bool = {{DIRECT}};
// lanes t%4 = 0..3 to add in workgroup memory (1 when subgroup shuffles added them already)
const LANE_TERMS: u32 = select(4u, 1u, SUBGROUPS);

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<{{WVEC}}>;
@group(0) @binding(2) var<storage, read> S: array<{{WVEC}}>;
@group(0) @binding(3) var<storage, read> A: array<vec4<u32>>;
// fp32 partial sums (bit patterns) in the scratch slots, or (DIRECT) fp16 pairs of C
@group(0) @binding(4) var<storage, read_write> OUT: array<u32>;

// A's stage, then (reused) the reduction: [k-slot][lane term][row of the round][column 64]
var<workgroup> sh: array<vec4<f32>, {{SH_VEC4S}}>;

fn s_word(i: u32) -> u32 {               // u32 i of the scale binding
{{S_WORD}}
}

fn scale_half(pos: u32) -> f32 {         // pos: half index into the scale binding
    return unpack2x16float(s_word(pos / 2u))[pos % 2u];
}

fn pair(x: u32, p: u32) -> vec2<f32> {   // nibbles p, p + 4 as floats 1024 + q
    return unpack2x16float(((x >> (4u * p)) & 0x000F000Fu) | 0x64006400u);
}

fn red_add(f: u32, v: f32) {             // sh as flat floats
    sh[f / 4u][f % 4u] = v;
}

@compute @workgroup_size({{WORKGROUP_SIZE}})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let m_tiles = (P.M + M_TILE - 1u) / M_TILE;
    let chunk = wg.x / m_tiles;
    let m0 = (wg.x % m_tiles) * M_TILE;
    let split = wg.y;
    let e_local = wg.z;
    let lane = li % LANES;
    let slot = li / LANES;
    let l = lane % 32u;
    let t4 = l % 4u;
    let jg = (l / 4u) % (4u / J);
    let c = 2u * J * (lane / 32u) + l / (16u / J);
    let j0 = J * jg;                                          // first n-tile of the lane's words
    let vec_in_row = (16u * c + 4u * t4 + j0) / J;            // its vector within the chunk row

    let kt_lo = split * P.kt_per_split;
    let kt_hi = min(kt_lo + P.kt_per_split, P.kt_count);
    let kt_last = max(kt_hi, 1u) - 1u;
    let w_row = 2u * P.n / J;                                 // vectors per kt row
    let w_at = (P.w_base + e_local * P.w_expert) / J + chunk * (128u / J) + vec_in_row;
    // grouped scales: columns 16j + c + 8h sit at permuted 8c + 2j + h (checked by the host):
    // the lane's J words take J consecutive u32 of the scale row, one vector
    let s_row = P.n / (2u * J);                               // vectors per scale row
    let s_at = (P.s_base + e_local * P.s_expert + chunk * 64u + 8u * c + 2u * j0) / (2u * J);
    let a_row = P.K / 8u;                                     // vec4s per row of A

    // acc{m}_{u}: row m of the tile, word u: columns (16(j0 + u) + c, + 8). Generated, unrolled,
    // so every accumulator is a register on every compiler.
{{ACC_DECL}}

    let stages = (kt_hi - kt_lo + STAGE_KT - 1u) / STAGE_KT;  // the same for the workgroup
{{LOAD_DECL}}
    for (var st = 0u; st < stages; st++) {
        let kt0 = kt_lo + st * STAGE_KT;
{{LOAD_TAKE}}
        workgroupBarrier();                                   // the last stage's A reads are done
        // stage A: vec4 v -> row m0 + v / (2 STAGE_KT), kt row kt0 + (v / 2) % STAGE_KT, halves
        // 8h .. 8h + 7 (h = v % 2) = t4 0..3 at components 2h, 2h + 1
        for (var v = li; v < A_VEC4S; v += INVOCATIONS) {
            let m = v / (2u * STAGE_KT);
            let kt_l = (v / 2u) % STAGE_KT;
            let h = v % 2u;
            var av = vec4<u32>(0u);
            if (m0 + m < P.M && kt0 + kt_l < kt_hi) {
                av = A[P.a_base / 4u + (m0 + m) * a_row + (P.kt_begin + kt0 + kt_l) * 2u + h];
            }
            for (var q = 0u; q < 4u; q++) {
                let pr = unpack2x16float(av[q]);
                let at = (kt_l * 4u + q) * M_TILE + m;
                sh[at][2u * h] = pr.x;
                sh[at][2u * h + 1u] = pr.y;
            }
        }
        workgroupBarrier();
        let kt_next = kt0 + STAGE_KT;
{{LOAD_NEXT}}
{{STEPS}}
    }

    // Reduce and write, in rounds of rows (generated).
    let col_out = P.col_base + e_local * P.n + chunk * 64u;
    let slot_at = P.out_base + (P.slot_base + split) * P.slot_stride;
    let s_first = P.s_base + e_local * P.s_expert + chunk * 64u;
{{REDUCE}}
}

// Sum over k-slots and lane terms of column col of round row r, from sh.
fn column_sum(r: u32, col: u32, rows: u32) -> f32 {
    var sum = 0.0;
    for (var s = 0u; s < K_SLOTS * LANE_TERMS; s++) {
        let f = (s * rows + r) * 64u + col;
        sum += sh[f / 4u][f % 4u];
    }
    return sum;
}

// The final value of column col of round row r: the sum, scaled when channelwise.
fn column_out(r: u32, col: u32, rows: u32, s_first: u32) -> f32 {
    var v = column_sum(r, col, rows);
    if (CHANNELWISE) {
        v *= scale_half(s_first + scale_pos(col));
    }
    return v;
}
