// Large-M kernel: a 64 x 64 tile of C (64 rows of A x one Marlin chunk of one expert) over one
// k-split, in steps of BK = 32 k (two Marlin kt rows).
//
// Stage 1, fetch A: 64 rows x 32 halves = 256 vec4<u32>, one per invocation, stored as fp32,
//   k-major (As[k][m]) so the compute stage reads 4 consecutive rows as one vec4.
// Stage 2, fetch + dequantize B: two kt rows of the chunk = 256 words, one per invocation
//   (consecutive invocations read consecutive words: coalesced). Word w = 4t + j holds, per nibble
//   pair p (nibbles p, p+4), k rows (r, r+1) of one column: r = 2*(t%4) + NIB_DR[p],
//   column 16j + t/4 + NIB_DC[p] (tables from ferrum.format). Scaled in fp32 and stored k-major
//   in original column order (Bs[k][n]).
// Stage 3, multiply: invocation (tm, tn) accumulates rows 4tm..4tm+3 x columns 4tn..4tn+3.
// Stage 4, write: fp32 partial sums to this split's scratch slot (reduce.wgsl finishes).
// Workgroup memory: 2 x 8 KiB, within WebGPU's 16 KiB default limit.

{{PARAMS}}
{{TABLES}}

const BK: u32 = 32u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read> S: array<u32>;
@group(0) @binding(3) var<storage, read> A: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read_write> OUT: array<f32>;

var<workgroup> As: array<vec4<f32>, 512>;   // [k 32][m/4 16]
var<workgroup> Bs: array<vec4<f32>, 512>;   // [k 32][n/4 16]

fn scale_at(row_half: u32, col: u32) -> f32 {   // col: original column within the chunk
    let pos = row_half + SCALE_POS[col];
    return unpack2x16float(S[pos / 2u])[pos % 2u];
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let chunk = wg.x;
    let split = wg.y % P.splits;
    let m0 = (wg.y / P.splits) * 64u;
    let e_local = wg.z;
    let tm = li / 16u;
    let tn = li % 16u;

    let kt_lo = split * P.kt_per_split;
    let kt_hi = min(kt_lo + P.kt_per_split, P.kt_count);

    // Stage 1 indices: A row m0 + li/4, halves 8q..8q+7 of the BK step (q = li % 4).
    let a_m = m0 + li / 4u;
    let a_q = li % 4u;
    let a_row = P.K / 8u;                                     // vec4s per row of A
    // Stage 2 indices: kt row kt + li/128, word w = li % 128 of the chunk.
    let b_kt = li / 128u;
    let w = li % 128u;
    let t = w / 4u;
    let j = w % 4u;
    let r0 = 2u * (t % 4u);
    let c = t / 4u;
    let w_at = P.w_base + e_local * P.w_expert + chunk * 128u + w;
    let s_at = P.s_base + e_local * P.s_expert + chunk * 64u;              // halves

    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) { acc[i] = vec4<f32>(0.0); }

    for (var kt = kt_lo; kt < kt_hi; kt += 2u) {
        let ktg = P.kt_begin + kt;                             // kt within the expert
        // Stage 1: fetch A (rows past M read as zero).
        var av = vec4<u32>(0u);
        if (a_m < P.M) {
            av = A[P.a_base / 4u + a_m * a_row + ktg * 2u + a_q];
        }
        for (var i = 0u; i < 4u; i++) {
            let pr = unpack2x16float(av[i]);
            let k = 8u * a_q + 2u * i;
            As[k * 16u + (li / 4u) / 4u][(li / 4u) % 4u] = pr.x;
            As[(k + 1u) * 16u + (li / 4u) / 4u][(li / 4u) % 4u] = pr.y;
        }
        // Stage 2: fetch + dequantize B.
        let kt_b = kt + b_kt;
        let x = W[w_at + kt_b * 2u * P.n];
        let g_row = (((P.kt_begin + kt_b) >> P.group_shift) - P.g_begin) * P.n;   // halves
        for (var p = 0u; p < 4u; p++) {
            let col = 16u * j + c + NIB_DC[p];
            let r = 16u * b_kt + r0 + NIB_DR[p];
            let v = (unpack2x16float(((x >> (4u * p)) & 0x000F000Fu) | 0x64006400u)
                     - vec2<f32>(1032.0)) * scale_at(s_at + g_row, col);
            Bs[r * 16u + col / 4u][col % 4u] = v.x;
            Bs[(r + 1u) * 16u + col / 4u][col % 4u] = v.y;
        }
        workgroupBarrier();
        // Stage 3: multiply.
        for (var k = 0u; k < BK; k++) {
            let a = As[k * 16u + tm];
            let b = Bs[k * 16u + tn];
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }

    // Stage 4: write partial sums.
    let col_out = P.col_base + e_local * P.n + chunk * 64u + 4u * tn;
    let slot_at = P.out_base + (P.slot_base + split) * P.slot_stride;
    for (var i = 0u; i < 4u; i++) {
        let row = m0 + 4u * tm + i;
        if (row < P.M) {
            let at = slot_at + row * P.n_total + col_out;
            OUT[at] = acc[i].x;
            OUT[at + 1u] = acc[i].y;
            OUT[at + 2u] = acc[i].z;
            OUT[at + 3u] = acc[i].w;
        }
    }
}
