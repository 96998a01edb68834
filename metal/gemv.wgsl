// Small-M kernel: C[m, col] partial sums over one k-split, for M_TILE rows of A at a time.
//
// One workgroup = one 64-column Marlin chunk of one expert x one k-split x one m-tile. The m-tiles
// of a chunk are neighbours in grid x (x = chunk * m_tiles + tile), launched side by side, so all
// but the first can find the chunk's weight in cache.
// Its 32 * K_SLOTS invocations are K_SLOTS k-slots (8, 16 or 32) x 32 lanes. Lane t reads word quad 4t..4t+3 of the chunk row
// as one vec4<u32> (16 bytes; the 32 lanes of a slot read 512 contiguous bytes). That quad is the
// B fragment Marlin's lane t owns: k rows {r0, r0+1, r0+8, r0+9} (r0 = 2*(t%4)) and columns
// {c, c+8} (c = t/4) of each of the 4 n-tiles j (word j of the quad), so the lane needs only two
// words of A per row m: halves (r0, r0+1) and (r0+8, r0+9). Slot s walks kt = kt_lo + s,
// + K_SLOTS, ...
//
// Dequantization: nibble pair p = (p, p+4) of a word is the same column, k rows (r, r+1)
// (NIB_DR/NIB_DC and the NIB_PAIR_* indices come from ferrum.format), so each pair dots with the
// one A word that unpack2x16float turns into rows (r, r+1). The pair, moved to bits 4..7 of each
// half and OR'd into fp16 64 (whose mantissa step is 1/16), is the fp16 pair (64 + q, 64 + q')
// exactly: one shift and one and-or a pair, and one unpack2x16float (integer->float conversions
// are slow on some GPUs and on lavapipe; no shader-f16). uint4b8's q - 8 is then (64 + q) - 72:
//   * PRESCALE (several rows share each weight): w = fma(64 + q, s, -72 s), exactly (q - 8) s:
//     72 s and (64 + q) s are exact in fp32, and so is their difference;
//   * else (M_TILE <= 2) the 72 goes into the column sums: a lane's four k rows give
//     sum(a (64 + q)) - 72 sum(a), one fma a weight and no subtraction. Those sums round at the
//     size of 72 |a| (and give inf - inf for an inf), so the host takes this way only for rows
//     of A without inf/NaN or values far above the median |a| of the row (_column_sums_fit).
//
// Grouped scales: marlin_permute_scales puts the 8 scales lane t needs (columns 16j + c + 8h) at
// permuted columns 8c + 2j + h: one vec4<u32> load (checked against ferrum.format by the host).
// Channelwise scales (one group) are applied once, after the k loop.
//
// Reduction: lanes t with equal t/4 share columns; first over t%4 (subgroup shuffles, or
// workgroup memory), then over the k-slots in workgroup memory: more than 8 are folded in halves
// down to 8 (slots s + half add into slot s), and column_sum adds the last 8. The 64 column sums
// go to the fp32 scratch slot of this split (reduce.wgsl adds the slots and writes fp16), or
// with DIRECT straight to C.

{{PARAMS}}
{{TABLES}}

const M_TILE: u32 = {{M_TILE}}u;
const SUBGROUPS: bool = {{SUBGROUPS}};
const CHANNELWISE: bool = {{CHANNELWISE}};
const PRESCALE: bool = {{PRESCALE}};
// DIRECT: this dispatch is the whole k range (one k-split, one weight piece), so the column sums
// are final: written to C as fp16 pairs, with no scratch and no reduce.wgsl pass.
const DIRECT: bool = {{DIRECT}};
const LOADS: u32 = {{LOADS}}u;
const K_SLOTS: u32 = {{K_SLOTS}}u;
const FINAL_SLOTS: u32 = 8u;                  // k-slots column_sum adds (after the folds)
// lanes t%4 = 0..3 to add in workgroup memory (1 when subgroup shuffles added them already)
const LANE_TERMS: u32 = select(4u, 1u, SUBGROUPS);

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> S: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> A: array<u32>;
// fp32 partial sums (bit patterns) in the scratch slots, or (DIRECT) fp16 pairs of C
@group(0) @binding(4) var<storage, read_write> OUT: array<u32>;

// [k-slot][lane 32][columns q/4][q%4]: the 8 final slots, or the upper half of the first fold
var<workgroup> red: array<vec4<f32>, {{RED_VEC4S}}>;

fn pair64(x: u32, p: u32) -> vec2<f32> {
    // Nibbles p and p + 4 at bits 4..7 of each half, OR'd into fp16 64: (64 + q, 64 + q'), exact.
    return unpack2x16float((((x >> (4u * p)) << 4u) & 0x00F000F0u) | 0x54005400u);
}

// A lane's quad by k row: {a,b}{d} = columns q 0..3 (a) or 4..7 (b) at k row r0 + d, each
// 64 + the nibble. Column q = 2j + h is word j's pair (NIB_PAIR_{LO,HI}_H{h}: rows r0.. or r0+8..).
struct Quad {
    a0: vec4<f32>, a1: vec4<f32>, a8: vec4<f32>, a9: vec4<f32>,
    b0: vec4<f32>, b1: vec4<f32>, b8: vec4<f32>, b9: vec4<f32>,
}

fn quad64(x: vec4<u32>) -> Quad {
    let w0 = pair64(x.x, NIB_PAIR_LO_H0);
    let v0 = pair64(x.x, NIB_PAIR_HI_H0);
    let w1 = pair64(x.x, NIB_PAIR_LO_H1);
    let v1 = pair64(x.x, NIB_PAIR_HI_H1);
    let w2 = pair64(x.y, NIB_PAIR_LO_H0);
    let v2 = pair64(x.y, NIB_PAIR_HI_H0);
    let w3 = pair64(x.y, NIB_PAIR_LO_H1);
    let v3 = pair64(x.y, NIB_PAIR_HI_H1);
    let w4 = pair64(x.z, NIB_PAIR_LO_H0);
    let v4 = pair64(x.z, NIB_PAIR_HI_H0);
    let w5 = pair64(x.z, NIB_PAIR_LO_H1);
    let v5 = pair64(x.z, NIB_PAIR_HI_H1);
    let w6 = pair64(x.w, NIB_PAIR_LO_H0);
    let v6 = pair64(x.w, NIB_PAIR_HI_H0);
    let w7 = pair64(x.w, NIB_PAIR_LO_H1);
    let v7 = pair64(x.w, NIB_PAIR_HI_H1);
    return Quad(vec4<f32>(w0.x, w1.x, w2.x, w3.x), vec4<f32>(w0.y, w1.y, w2.y, w3.y),
                vec4<f32>(v0.x, v1.x, v2.x, v3.x), vec4<f32>(v0.y, v1.y, v2.y, v3.y),
                vec4<f32>(w4.x, w5.x, w6.x, w7.x), vec4<f32>(w4.y, w5.y, w6.y, w7.y),
                vec4<f32>(v4.x, v5.x, v6.x, v7.x), vec4<f32>(v4.y, v5.y, v6.y, v7.y));
}

// The lane's 8 grouped scales (columns 16j + c + 8h at halves 2j + h) of kt row ktg: one vector
// load (marlin_permute_scales' order); channelwise, 1.0 (applied after the k loop).
fn quad_scales(s_at: u32, s_row: u32, ktg: u32) -> vec4<u32> {
    if (CHANNELWISE) {
        return vec4<u32>(0x3C003C00u);
    }
    return S[s_at + ((ktg >> P.group_shift) - P.g_begin) * s_row];
}

fn scale_half(pos: u32) -> f32 {   // pos: half index into the scale binding
    let v = S[pos / 8u];
    return unpack2x16float(v[(pos / 2u) % 4u])[pos % 2u];
}

@compute @workgroup_size({{WORKGROUP_SIZE}})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let m_tiles = (P.M + M_TILE - 1u) / M_TILE;
    let chunk = wg.x / m_tiles;
    let m0 = (wg.x % m_tiles) * M_TILE;
    let split = wg.y;
    let e_local = wg.z;
    let lane = li % 32u;
    let slot = li / 32u;
    let t4 = lane % 4u;
    let c = lane / 4u;

    let kt_lo = split * P.kt_per_split;
    let kt_hi = min(kt_lo + P.kt_per_split, P.kt_count);
    let w_row = P.n / 2u;                                     // vec4s per kt row (2n words)
    let w_at = (P.w_base + e_local * P.w_expert) / 4u + chunk * 32u + lane;
    let s_row = P.n / 8u;                                     // vec4s per scale row (n halves)
    let s_at = (P.s_base + e_local * P.s_expert) / 8u + chunk * 8u + c;
    let a_row = P.K / 2u;

    // Per row m of the tile: acc{m}a = columns q 0..3, acc{m}b = q 4..7, q = 2j + h; arow{m} =
    // the row's offset in A (rows past M re-read row M - 1 and are never written). Generated,
    // unrolled, so every accumulator is a register on every compiler.
{{ACC_DECL}}

    // Software pipelined: each lane keeps LOADS quads in flight at once (kt rows kt, kt + 8, ...
    // of its k-slot: independent 16-byte loads, so enough bytes are in flight even when the grid
    // is small), and the next batch is loaded while this one is dequantized. Past kt_hi the last
    // valid row is re-read (cached) and not used.
    let kt_last = max(kt_hi, 1u) - 1u;
    var kt = kt_lo + slot;
{{LOAD_DECL}}
    loop {
        if (kt >= kt_hi) { break; }
        let kt_next = kt + K_SLOTS * LOADS;
{{LOAD_NEXT}}
        // One quad: dequantize lane's quad XQ of kt row KTQ and accumulate it into every row of
        // the tile. The host repeats this block (between the step markers) once per load u, with
        // XQ = x{u}, KTQ = kt + 8u (its kt row), skipping rows past kt_hi.
        //@step-begin
        if (KTQ < kt_hi) {
        let x = XQ;
        let ktg = P.kt_begin + KTQ;                           // kt within the expert
        let sc = quad_scales(s_at, s_row, ktg);
        // Columns q 0..3 (scales sa) and 4..7 (sb) of the quad, by k row (quad64).
        let sa = vec4<f32>(unpack2x16float(sc.x), unpack2x16float(sc.y));
        let sb = vec4<f32>(unpack2x16float(sc.z), unpack2x16float(sc.w));
        let q = quad64(x);
        // PRESCALE: the weights, scaled once for the tile's rows: (q - 8) s.
        var w = q;
        if (PRESCALE) {
            let na = -72.0 * sa;
            let nb = -72.0 * sb;
            w.a0 = fma(q.a0, sa, na);
            w.a1 = fma(q.a1, sa, na);
            w.a8 = fma(q.a8, sa, na);
            w.a9 = fma(q.a9, sa, na);
            w.b0 = fma(q.b0, sb, nb);
            w.b1 = fma(q.b1, sb, nb);
            w.b8 = fma(q.b8, sb, nb);
            w.b9 = fma(q.b9, sb, nb);
        }
        let a_k = P.a_base + ktg * 8u + t4;                   // u32 of halves (16kt + r0, +1)
{{ACCUMULATE}}
        }
        //@step-end
        kt = kt_next;
    }

    // Reduce and write, row by row of the tile. Invocation li < 64 writes column li of the chunk
    // to the scratch slot, or (DIRECT) li < 32 writes columns 2li, 2li + 1 as one u32 of C.
    let col_out = P.col_base + e_local * P.n + chunk * 64u;
    let slot_at = P.out_base + (P.slot_base + split) * P.slot_stride;
    let col_a = select(li, 2u * li, DIRECT);
    var scale = vec2<f32>(1.0);
    if (CHANNELWISE && li < 64u) {
        let s_first = P.s_base + e_local * P.s_expert + chunk * 64u;
        scale = vec2<f32>(scale_half(s_first + SCALE_POS[col_a % 64u]),
                          scale_half(s_first + SCALE_POS[(col_a + 1u) % 64u]));
    }
{{REDUCE}}
}

// Sum of column col (16j + c + 8h) of the chunk over k-slots and lanes, from red.
fn column_sum(col: u32) -> f32 {
    let q = 2u * (col / 16u) + (col % 16u) / 8u;
    let c = col % 8u;
    var sum = 0.0;
    for (var s = 0u; s < FINAL_SLOTS; s++) {
        for (var r = 0u; r < LANE_TERMS; r++) {
            sum += red[(s * 32u + 4u * c + r) * 2u + q / 4u][q % 4u];
        }
    }
    return sum;
}
