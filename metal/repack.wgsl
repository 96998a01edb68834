// GPTQ int32 [K/8, N] -> Marlin int32 [K/16, 2N] (vLLM's gptq_marlin_repack), one output word per
// invocation: nibble s of word w = 4t + j of a 16 x 64 chunk holds k row 2(t % 4) + CHUNK_DR[s]
// and column 16j + t/4 + CHUNK_DC[s] of the chunk (the host generates CHUNK_DR/CHUNK_DC from
// ferrum.format and checks that formula against its CHUNK_ROW/CHUNK_COL at import). With
// act-order, Marlin row k reads GPTQ row perm[k].
//
// A dispatch fills a destination window: kt rows [kt0, kt0 + kt_count) x columns [n0, n0 + nb)
// of the Marlin matrix (2N words a row; the binding starts at kt0's row, dst_base is column n0's
// word in it). Its source binding holds nb columns of some GPTQ word rows: all K rows (act-order
// may read any: k = PERM[perm_base + local k], the perm binding holding this window's rows), or
// only the rows the window reads (k = k0 + local k; the host applied any perm beforehand). Large
// matrices are repacked in many such windows, so every binding fits the adapter's limit.

struct RepackParams {
    N: u32,           // full width (columns) of the weight
    nb: u32,          // columns in this source block (its row stride, in words)
    k0: u32,          // source k row of the window's first k row (no perm)
    has_perm: u32,
    dst_base: u32,    // u32 offset of (kt0, n0) in the destination binding
    perm_base: u32,   // u32 offset of perm[16 kt0] in the perm binding
    src_base: u32,    // u32 offset of the source block in the source binding
    _pad0: u32,
}

{{CHUNK_TABLES}}

@group(0) @binding(0) var<uniform> P: RepackParams;
@group(0) @binding(1) var<storage, read> SRC: array<u32>;
@group(0) @binding(2) var<storage, read> PERM: array<u32>;
@group(0) @binding(3) var<storage, read_write> DST: array<u32>;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) w: u32) {
    let chunk = wg.x;                      // chunk of the window
    let kt_local = wg.y;
    let t = w / 4u;
    let j = w % 4u;
    var word = 0u;
    for (var s = 0u; s < 8u; s++) {
        let k_local = 16u * kt_local + 2u * (t % 4u) + CHUNK_DR[s];
        var k = P.k0 + k_local;
        if (P.has_perm != 0u) { k = PERM[P.perm_base + k_local]; }
        let n = 64u * chunk + 16u * j + t / 4u + CHUNK_DC[s];
        let q = (SRC[P.src_base + (k / 8u) * P.nb + n] >> (4u * (k % 8u))) & 0xFu;
        word |= q << (4u * s);
    }
    DST[P.dst_base + kt_local * 2u * P.N + chunk * 128u + w] = word;
}
