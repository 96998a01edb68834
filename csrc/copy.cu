// copy.cu -- a strided gather into a C-contiguous buffer, on the caller's stream; and the
// bench's bandwidth probes (ferrum_stream_probe).
//
// The Python binding uses it for device arrays the kernels cannot read in place: a
// non-contiguous view (a[:, ::2], a transposed tensor, a row-padded slice), or a pointer not
// aligned as the kernels load it (a[1:] of a flat fp16 buffer). It runs on the stream of the
// call that needs the copy, so the copy is ordered before that call's kernels and after the
// producer's work that the stream already waits for (a copy made by the array's own library
// would run on that library's current stream instead).
#include <stdint.h>

#include "common.cuh"

namespace ferrum {

// One thread per element; elements are moved byte by byte, so any stride and any alignment
// are fine (this path is for odd layouts, not for speed).
__global__ void copy_strided_kernel(const unsigned char *__restrict__ src, unsigned char *__restrict__ dst,
                                    long long d1, long long d2, long long s0, long long s1,
                                    long long s2, int elem_bytes, long long total) {
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long i2 = idx % d2;
        const long long i1 = (idx / d2) % d1;
        const long long i0 = idx / (d1 * d2);
        const unsigned char *from = src + i0 * s0 + i1 * s1 + i2 * s2;
        unsigned char *to = dst + idx * elem_bytes;
        for (int b = 0; b < elem_bytes; ++b) to[b] = from[b];
    }
}

// The bench's probes of what the memory streams: every thread keeps kProbeUnroll 16-byte loads
// in flight (grid-stride, streaming cache hints), and either stores them (a copy) or XORs them
// into a word that goes to `fold_out` when that is given (the host passes none; the compiler
// cannot know that, so the loads stay).
constexpr int kProbeUnroll = 4;
__global__ void stream_probe_kernel(const int4 *__restrict__ src, int4 *__restrict__ dst, long long n,
                                    unsigned *__restrict__ fold_out) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    unsigned fold = 0;
    for (; i + (kProbeUnroll - 1) * stride < n; i += kProbeUnroll * stride) {
        int4 v[kProbeUnroll];
#pragma unroll
        for (int u = 0; u < kProbeUnroll; ++u) v[u] = __ldcs(src + i + u * stride);
#pragma unroll
        for (int u = 0; u < kProbeUnroll; ++u) {
            if (dst) __stcs(dst + i + u * stride, v[u]);
            else fold ^= unsigned(v[u].x ^ v[u].y ^ v[u].z ^ v[u].w);
        }
    }
    for (; i < n; i += stride) {
        const int4 v = __ldcs(src + i);
        if (dst) __stcs(dst + i, v);
        else fold ^= unsigned(v.x ^ v.y ^ v.z ^ v.w);
    }
    if (fold_out) atomicXor(fold_out, fold);
}

}  // namespace ferrum

extern "C" int ferrum_stream_probe(const void *src, void *dst, int64_t nbytes, int sm_blocks, void *stream) {
    using namespace ferrum;
    FERRUM_REQUIRE(nbytes > 0 && nbytes % 16 == 0, "ferrum_stream_probe: nbytes=%lld (a positive multiple of 16)",
                   (long long)nbytes);
    FERRUM_REQUIRE(src && reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0,
                   "ferrum_stream_probe: src and dst must be 16-byte aligned (src non-null)");
    FERRUM_REQUIRE(sm_blocks >= 1 && sm_blocks <= 8, "ferrum_stream_probe: sm_blocks=%d (use 1..8)", sm_blocks);
    int device = 0, sms = 0;
    FERRUM_CUDA_CHECK(cudaGetDevice(&device));
    FERRUM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    stream_probe_kernel<<<sms * sm_blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const int4 *>(src), static_cast<int4 *>(dst), nbytes / 16, nullptr);
    FERRUM_CUDA_CHECK(cudaGetLastError());
    return FERRUM_OK;
}

extern "C" int ferrum_copy_strided(const void *src, void *dst, int64_t d0, int64_t d1, int64_t d2,
                                   int64_t s0, int64_t s1, int64_t s2, int elem_bytes,
                                   void *stream) {
    using namespace ferrum;
    FERRUM_REQUIRE(d0 >= 0 && d1 >= 0 && d2 >= 0,
                   "ferrum_copy_strided: shape (%lld, %lld, %lld) has a negative extent",
                   (long long)d0, (long long)d1, (long long)d2);
    FERRUM_REQUIRE(elem_bytes >= 1 && elem_bytes <= 16, "ferrum_copy_strided: elem_bytes=%d (use 1..16)",
                   elem_bytes);
    if (d0 == 0 || d1 == 0 || d2 == 0) return FERRUM_OK;
    FERRUM_REQUIRE(src && dst, "ferrum_copy_strided: null pointer");
    FERRUM_REQUIRE(d0 <= INT64_MAX / d1 && d0 * d1 <= INT64_MAX / d2 / elem_bytes,
                   "ferrum_copy_strided: shape (%lld, %lld, %lld) is too large",
                   (long long)d0, (long long)d1, (long long)d2);
    const long long total = (long long)d0 * d1 * d2;
    long long blocks = (total + 255) / 256;
    if (blocks > 65535LL * 16) blocks = 65535LL * 16;   // the grid-stride loop covers the rest
    copy_strided_kernel<<<static_cast<int>(blocks), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const unsigned char *>(src), static_cast<unsigned char *>(dst), d1, d2, s0, s1,
        s2, elem_bytes, total);
    FERRUM_CUDA_CHECK(cudaGetLastError());
    return FERRUM_OK;
}
