// Large-M kernel: a BM x 64 tile of C (BM = 16 * TM rows of A x one Marlin chunk of one expert)
// over one k-split, in steps of BK k (BK / 16 Marlin kt rows), register-blocked.
//
// 256 invocations = 16 x 16: invocation (tm, tn) = (li / 16, li % 16) owns rows TM*tm .. +TM-1
// and columns 4*tn .. 4*tn+3 of the tile: TM x 4 fp32 accumulators in registers. Per k it reads
// TM values of A and 4 of B from workgroup memory (vectors: a warp's 2 tm values are broadcasts,
// its 16 tn values one 256-byte row) and does TM * 4 fmas.
//
// Each step, staged through registers so the global loads of step s+1 are in flight while step s
// is multiplied (one workgroup-memory buffer, no double buffering needed):
//   fetch    A: BM rows x BK halves as vec4<u32> (8 halves), invocation v -> row v % BM, 8-half
//            group v / BM; B: BK/16 kt rows x 128 words of the chunk, one word per invocation
//            (consecutive invocations, consecutive words: coalesced).
//   store    A converted to fp32, k-major (As[k][m]: consecutive invocations store consecutive
//            m, no bank conflicts). B dequantized: word w = 4t + j holds, per nibble pair p
//            (nibbles p, p+4), k rows (r, r+1) of one column: r = 2*(t%4) (+8 for the HI pairs),
//            column 16j + t/4 (+8 for the H1 pairs) (the NIB_PAIR_* constants come from
//            ferrum.format); OR'd into the mantissa of fp16 1024 both nibbles become 1024 + q
//            exactly, minus 1032 = uint4b8's q - 8, times the column's scale (its permuted
//            place computed by scale_pos, checked by the host), stored k-major in original
//            column order (Bs[k][n]).
//   multiply BK rank-1 updates of the register block (the host writes the k loop out, or
//            leaves it a loop: TILED_UNROLL).
// Then fp32 partial sums go to this split's scratch slot (reduce.wgsl finishes), or with DIRECT
// (one k-split, one weight piece) straight to C as fp16 pairs.
// Workgroup memory: (BM + 64) * BK * 4 bytes (the host checks it against the device's limit).

{{PARAMS}}
{{TABLES}}

const TM: u32 = {{TM}}u;                 // rows per invocation
const BM: u32 = 16u * TM;                // rows per tile
const BK: u32 = {{BK}}u;                 // k per step (16 or 32)
const KT_STEP: u32 = BK / 16u;           // Marlin kt rows per step
const A_VEC4S: u32 = BM * BK / 8u;       // vec4<u32> of A per step
const A_ITERS: u32 = (A_VEC4S + 255u) / 256u;
const B_WORDS: u32 = KT_STEP * 128u;     // words of B per step
const DIRECT: bool = {{DIRECT}};

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read> S: array<u32>;
@group(0) @binding(3) var<storage, read> A: array<vec4<u32>>;
// fp32 partial sums (bit patterns) in the scratch slots, or (DIRECT) fp16 pairs of C
@group(0) @binding(4) var<storage, read_write> OUT: array<u32>;

const AW: u32 = {{AW}}u;                 // width of As's vectors: min(TM, 4)
var<workgroup> As: array<vec{{AW}}<f32>, {{AS_LEN}}>;   // [k BK][m BM] in AW-wide vectors
var<workgroup> Bs: array<vec4<f32>, {{BS_LEN}}>;   // [k BK][n/4 16]

fn scale_at(row_half: u32, col: u32) -> f32 {   // col: original column within the chunk
    let pos = row_half + scale_pos(col);
    return unpack2x16float(S[pos / 2u])[pos % 2u];
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let chunk = wg.x;
    let split = wg.y % P.splits;
    let m0 = (wg.y / P.splits) * BM;
    let e_local = wg.z;
    let tm = li / 16u;
    let tn = li % 16u;

    let kt_lo = split * P.kt_per_split;
    let kt_hi = min(kt_lo + P.kt_per_split, P.kt_count);

    let a_row = P.K / 8u;                                   // vec4s per row of A
    // fetch indices of B: kt row kt + b_kt, word w of the chunk (invocations < B_WORDS)
    let b_kt = li / 128u;
    let w = li % 128u;
    let t = w / 4u;
    let j = w % 4u;
    let r0 = 2u * (t % 4u);
    let c = t / 4u;
    let w_at = P.w_base + e_local * P.w_expert + chunk * 128u + w;
    let s_at = P.s_base + e_local * P.s_expert + chunk * 64u;              // halves

{{ACC_DECL}}

    // Registers holding the next step's A and B words (fetched a step ahead).
    var pa: array<vec4<u32>, A_ITERS>;
    var pb = 0u;
    if (kt_lo < kt_hi) {
        fetch_a(&pa, kt_lo, m0, li, a_row);
        if (li < B_WORDS) { pb = W[w_at + (kt_lo + b_kt) * 2u * P.n]; }
    }
    for (var kt = kt_lo; kt < kt_hi; kt += KT_STEP) {
        workgroupBarrier();                                 // the last step's reads are done
        // store A (fp32, k-major)
        for (var i = 0u; i < A_ITERS; i++) {
            let v = li + 256u * i;
            if (v < A_VEC4S) {
                let m = v % BM;
                let q = v / BM;
                let av = pa[i];
                for (var h = 0u; h < 4u; h++) {
                    let pr = unpack2x16float(av[h]);
                    let k = 8u * q + 2u * h;
                    As[(k * BM + m) / AW][m % AW] = pr.x;
                    As[((k + 1u) * BM + m) / AW][m % AW] = pr.y;
                }
            }
        }
        // store B dequantized (fp32, k-major, original column order)
        if (li < B_WORDS) {
            let g_row = (((P.kt_begin + kt + b_kt) >> P.group_shift) - P.g_begin) * P.n;
            let col = 16u * j + c;
            let r = 16u * b_kt + r0;
            let s0 = scale_at(s_at + g_row, col);
            let s8 = scale_at(s_at + g_row, col + 8u);
            store_pair(pb, NIB_PAIR_LO_H0, r, col, s0);
            store_pair(pb, NIB_PAIR_HI_H0, r + 8u, col, s0);
            store_pair(pb, NIB_PAIR_LO_H1, r, col + 8u, s8);
            store_pair(pb, NIB_PAIR_HI_H1, r + 8u, col + 8u, s8);
        }
        workgroupBarrier();
        // fetch the next step while this one is multiplied
        let kt_next = kt + KT_STEP;
        if (kt_next < kt_hi) {
            fetch_a(&pa, kt_next, m0, li, a_row);
            if (li < B_WORDS) { pb = W[w_at + (kt_next + b_kt) * 2u * P.n]; }
        }
        // multiply: BK rank-1 updates of the TM x 4 block (generated: a loop, or written out)
{{FMA}}
    }

    // write: fp32 partial sums to this split's scratch slot, or (DIRECT) fp16 pairs of C
    let col_out = P.col_base + e_local * P.n + chunk * 64u + 4u * tn;
    let slot_at = P.out_base + (P.slot_base + split) * P.slot_stride;
{{WRITE}}
}

// Nibble pair p of word x (k rows r, r + 1 of column col) dequantized into Bs.
fn store_pair(x: u32, p: u32, r: u32, col: u32, scale: f32) {
    let v = (unpack2x16float(((x >> (4u * p)) & 0x000F000Fu) | 0x64006400u) - vec2<f32>(1032.0))
            * scale;
    Bs[r * 16u + col / 4u][col % 4u] = v.x;
    Bs[(r + 1u) * 16u + col / 4u][col % 4u] = v.y;
}

// A of kt row kt (within the piece) for this step: vec4 v = li + 256 i -> row m0 + v % BM,
// halves 8 * (v / BM) .. + 7 of the step (rows past M read as zero).
fn fetch_a(pa: ptr<function, array<vec4<u32>, A_ITERS>>, kt: u32, m0: u32, li: u32, a_row: u32) {
    for (var i = 0u; i < A_ITERS; i++) {
        let v = li + 256u * i;
        let m = m0 + v % BM;
        var av = vec4<u32>(0u);
        if (v < A_VEC4S && m < P.M) {
            av = A[P.a_base / 4u + m * a_row + kt * 2u + v / BM];
        }
        (*pa)[i] = av;
    }
}
