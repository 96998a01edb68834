// Memory-bandwidth probe for the bench's floor: stream a buffer through the shader cores.
// COPY = true: dst[i] = src[i] (bytes read + written); false: read src only, into an XOR that is
// stored only when it equals an impossible pattern (src is zeros), so the loads stay.
const COPY: bool = {{COPY}};

@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = arrayLength(&src);
    let stride = nwg.x * 256u;
    var acc = vec4<u32>(0u);
    for (var i = gid.x; i < n; i += stride) {
        if (COPY) {
            dst[i] = src[i];
        } else {
            acc ^= src[i];
        }
    }
    if (!COPY && all(acc == vec4<u32>(0xdeadbeefu))) {
        dst[gid.x] = acc;
    }
}
