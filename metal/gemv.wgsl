// Small-M kernel: C[m, col] partial sums over one k-split, for M_TILE rows of A at a time.
//
// One workgroup = one 64-column Marlin chunk of one expert x one k-split x one m-tile.
// Its 256 invocations are 8 k-slots x 32 lanes. Lane t reads word quad 4t..4t+3 of the chunk row
// as one vec4<u32> (16 bytes; the 32 lanes of a slot read 512 contiguous bytes). That quad is the
// B fragment Marlin's lane t owns: k rows {r0, r0+1, r0+8, r0+9} (r0 = 2*(t%4)) and columns
// {c, c+8} (c = t/4) of each of the 4 n-tiles j (word j of the quad), so the lane needs only two
// words of A per row m: halves (r0, r0+1) and (r0+8, r0+9). Slot s walks kt = kt_lo+s, +8, ...
//
// Dequantization: nibble pair p = (p, p+4) of a word is the same column, k rows (r, r+1)
// (NIB_DR/NIB_DC, from ferrum.format). (x >> 4p) & 0x000F000F puts the pair in the low mantissa
// bits of two halves; OR 0x6400 makes them the fp16 numbers 1024 + q, so one unpack2x16float
// gives vec2(1024 + q_r, 1024 + q_r+1) — subtract 1032 for uint4b8's q - 8 — which dots with the
// A pair unpack2x16float also gives. No shader-f16 needed.
//
// Grouped scales: marlin_permute_scales puts the 8 scales lane t needs (columns 16j + c + 8h) at
// permuted columns 8c + 2j + h: one vec4<u32> load (checked against ferrum.format by the host).
// Channelwise scales (one group) are applied once, after the k loop.
//
// Reduction: lanes t with equal t/4 share columns; first over t%4 (subgroup shuffles, or
// workgroup memory), then over the 8 k-slots in workgroup memory. The 64 column sums go to the
// fp32 scratch slot of this split; reduce.wgsl adds the slots and writes fp16.

{{PARAMS}}
{{TABLES}}

const M_TILE: u32 = {{M_TILE}}u;
const SUBGROUPS: bool = {{SUBGROUPS}};
const CHANNELWISE: bool = {{CHANNELWISE}};
const K_SLOTS: u32 = 8u;

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> S: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> A: array<u32>;
@group(0) @binding(4) var<storage, read_write> OUT: array<f32>;

var<workgroup> red: array<f32, 2048>;   // [k-slot 8][lane 32][column 8]

fn dequant_pair(x: u32, p: u32) -> vec2<f32> {
    return unpack2x16float(((x >> (4u * p)) & 0x000F000Fu) | 0x64006400u) - vec2<f32>(1032.0);
}

fn scale_half(pos: u32) -> f32 {   // pos: half index into the scale binding
    let v = S[pos / 8u];
    return unpack2x16float(v[(pos / 2u) % 4u])[pos % 2u];
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let chunk = wg.x;
    let split = wg.y % P.splits;
    let m0 = (wg.y / P.splits) * M_TILE;
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

    var acc: array<f32, {{ACC_LEN}}>;                         // [m][2j + h]
    for (var i = 0u; i < {{ACC_LEN}}u; i++) { acc[i] = 0.0; }

    for (var kt = kt_lo + slot; kt < kt_hi; kt += K_SLOTS) {
        let x = W[w_at + kt * w_row];
        let ktg = P.kt_begin + kt;                            // kt within the expert
        var sc = vec4<u32>(0x3C003C00u);                      // 1.0 halves (channelwise)
        if (!CHANNELWISE) {
            sc = S[s_at + (ktg / P.group_tiles - P.g_begin) * s_row];
        }
        // w[2j + h] = dequantized pairs for column (j, h): lo rows (r0, r0+1), hi (r0+8, r0+9)
        var wlo: array<vec2<f32>, 8>;
        var whi: array<vec2<f32>, 8>;
        for (var j = 0u; j < 4u; j++) {
            let s2 = unpack2x16float(sc[j]);
            wlo[2u * j] = dequant_pair(x[j], NIB_PAIR_LO_H0) * s2.x;
            whi[2u * j] = dequant_pair(x[j], NIB_PAIR_HI_H0) * s2.x;
            wlo[2u * j + 1u] = dequant_pair(x[j], NIB_PAIR_LO_H1) * s2.y;
            whi[2u * j + 1u] = dequant_pair(x[j], NIB_PAIR_HI_H1) * s2.y;
        }
        let a_k = P.a_base + ktg * 8u + t4;                   // u32 of halves (16kt + r0, +1)
        for (var m = 0u; m < M_TILE; m++) {
            let row = min(m0 + m, P.M - 1u);
            let a_lo = unpack2x16float(A[a_k + row * a_row]);
            let a_hi = unpack2x16float(A[a_k + row * a_row + 4u]);
            for (var q = 0u; q < 8u; q++) {
                acc[m * 8u + q] += dot(wlo[q], a_lo) + dot(whi[q], a_hi);
            }
        }
    }

    let col_out = P.col_base + e_local * P.n + chunk * 64u;
    let slot_at = P.out_base + (P.slot_base + split) * P.slot_stride;
    for (var m = 0u; m < M_TILE; m++) {
        var v: array<f32, 8>;
        for (var q = 0u; q < 8u; q++) {
            var x = acc[m * 8u + q];
            if (SUBGROUPS) {
                x += subgroupShuffleXor(x, 1u);
                x += subgroupShuffleXor(x, 2u);
            }
            v[q] = x;
        }
        workgroupBarrier();
        for (var q = 0u; q < 8u; q++) { red[(slot * 32u + lane) * 8u + q] = v[q]; }
        workgroupBarrier();
        if (li < 64u) {
            // column col of the chunk = 16j + c' + 8h
            let col = li;
            let j = col / 16u;
            let h = (col % 16u) / 8u;
            let cc = col % 8u;
            var sum = 0.0;
            for (var s = 0u; s < K_SLOTS; s++) {
                if (SUBGROUPS) {
                    sum += red[(s * 32u + cc * 4u) * 8u + 2u * j + h];
                } else {
                    for (var r = 0u; r < 4u; r++) {
                        sum += red[(s * 32u + cc * 4u + r) * 8u + 2u * j + h];
                    }
                }
            }
            if (CHANNELWISE) {
                sum *= scale_half(P.s_base + e_local * P.s_expert + chunk * 64u + SCALE_POS[col]);
            }
            let row = m0 + m;
            if (row < P.M) {
                OUT[slot_at + row * P.n_total + col_out + col] = sum;
            }
        }
    }
}
