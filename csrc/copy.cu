// copy.cu -- a strided gather into a C-contiguous buffer, on the caller's stream.
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

}  // namespace ferrum

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
