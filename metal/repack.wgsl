// GPTQ int32 [K/8, N] -> Marlin int32 [K/16, 2N] (vLLM's gptq_marlin_repack), one output word per
// invocation: nibble s of word w of a 16 x 64 chunk holds k row CHUNK_ROW[w][s] and column
// CHUNK_COL[w][s] of the chunk (the table comes from ferrum.format, packed as row | col << 8).
// With act-order, Marlin row k reads GPTQ row perm[k].
//
// The source binding holds columns [n0, n0 + nb) of the GPTQ matrix (nb wide, all K rows); the
// destination binding holds kt rows [kt0, kt0 + kt_count) of the full Marlin matrix (2N words a
// row). Large matrices are repacked in several such blocks when one binding cannot hold them.

struct RepackParams {
    N: u32,           // full width (columns) of the weight
    nb: u32,          // columns in this source block
    n0: u32,          // first column of the block
    kt0: u32,         // first kt row of the destination binding
    has_perm: u32,
    dst_base: u32,    // u32 offset of kt row kt0 in the destination binding
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> P: RepackParams;
@group(0) @binding(1) var<storage, read> SRC: array<u32>;
@group(0) @binding(2) var<storage, read> PERM: array<u32>;
@group(0) @binding(3) var<storage, read> POS: array<u32>;
@group(0) @binding(4) var<storage, read_write> DST: array<u32>;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) w: u32) {
    let chunk = wg.x;                      // chunk of the block
    let kt_local = wg.y;
    let kt = P.kt0 + kt_local;
    var word = 0u;
    for (var s = 0u; s < 8u; s++) {
        let code = POS[w * 8u + s];
        var k = 16u * kt + (code & 0xFFu);
        if (P.has_perm != 0u) { k = PERM[k]; }
        let n = 64u * chunk + (code >> 8u);
        let q = (SRC[(k / 8u) * P.nb + n] >> (4u * (k % 8u))) & 0xFu;
        word |= q << (4u * s);
    }
    DST[P.dst_base + kt_local * 2u * P.N + 2u * P.n0 + chunk * 128u + w] = word;
}
