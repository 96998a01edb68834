// Finish: C[m, 2i..2i+1] = fp16(sum over the k-split slots of the fp32 partial sums), written as
// one u32 of two halves (the output is [M, n_total] float16 viewed as u32 pairs). Slots are read
// four at a time, four independent loads in flight, so the pass does not wait on memory once per
// slot.

{{PARAMS}}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> PART: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> C: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let pair = gid.x;
    let row = gid.y;
    let pairs = P.n_total / 2u;
    if (pair >= pairs) { return; }
    var sum = vec2<f32>(0.0);
    let at = P.out_base / 2u + row * pairs + pair;
    let stride = P.slot_stride / 2u;
    var s = 0u;
    for (; s + 4u <= P.splits; s += 4u) {
        let p0 = PART[at + s * stride];
        let p1 = PART[at + (s + 1u) * stride];
        let p2 = PART[at + (s + 2u) * stride];
        let p3 = PART[at + (s + 3u) * stride];
        sum += (p0 + p1) + (p2 + p3);
    }
    for (; s < P.splits; s++) {
        sum += PART[at + s * stride];
    }
    C[P.c_base + row * pairs + pair] = pack2x16float(sum);
}
