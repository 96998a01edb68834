// repack.cu -- GPTQ -> Marlin repacking and the act-order column gather, on the GPU.
#include <cuda_fp16.h>

#include "common.cuh"

namespace ferrum {

// Where nibble s of a Marlin word lands inside its lane's 16x16 n-tile, as (row offset from
// r0, column offset from c). Pairs (s, s+4) are the two halves of one fp16x2 fragment register
// after dequant_u4b8: (0,4) -> b0 of column c, (1,5) -> b1 of column c, (2,6) and (3,7) the
// same for column c+8 (format.py derives and checks the same table).
__constant__ int8_t kNibbleRow[8] = {0, 8, 0, 8, 1, 9, 1, 9};
__constant__ int8_t kNibbleCol[8] = {0, 0, 8, 8, 0, 0, 8, 8};

// One thread per output word. Word w of a 64-column chunk is what lane t = (w%128)/4 loads for
// n-tile j = w%4; that lane owns rows r0 = 2*(t%4) (+1, +8, +9) and columns c = t/4 (+8).
__global__ void repack_kernel(const uint32_t *__restrict__ gptq, const int32_t *__restrict__ perm,
                              uint32_t *__restrict__ marlin, int size_k, int size_n) {
    const long long words_per_row = 2LL * size_n;
    const long long total = (long long)(size_k / 16) * words_per_row;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const int ktile = static_cast<int>(idx / words_per_row);
        const int w = static_cast<int>(idx % words_per_row);
        const int chunk = w / 128, wc = w % 128;
        const int lane = wc / 4, ntile = wc % 4;
        const int r0 = 2 * (lane % 4), c = lane / 4;
        uint32_t word = 0;
#pragma unroll
        for (int s = 0; s < 8; ++s) {
            const int k = 16 * ktile + r0 + kNibbleRow[s];
            const int n = 64 * chunk + 16 * ntile + c + kNibbleCol[s];
            const int src = perm ? perm[k] : k;
            const uint32_t packed = gptq[(long long)(src / 8) * size_n + n];
            word |= ((packed >> (4 * (src % 8))) & 0xFu) << (4 * s);
        }
        marlin[idx] = word;
    }
}

__global__ void permute_cols_kernel(const half *__restrict__ a, const int32_t *__restrict__ perm,
                                    half *__restrict__ out, int size_m, int size_k) {
    const long long total = (long long)size_m * size_k;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long m = idx / size_k;
        const int k = static_cast<int>(idx % size_k);
        out[idx] = a[m * size_k + perm[k]];
    }
}

static bool aligned2(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 1) == 0; }
static bool aligned4(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 3) == 0; }

static int grid_for(long long total, int threads) {
    long long blocks = (total + threads - 1) / threads;
    if (blocks > 65535LL * 16) blocks = 65535LL * 16;  // grid-stride loops cover the rest
    return static_cast<int>(blocks < 1 ? 1 : blocks);
}

}  // namespace ferrum

extern "C" int ferrum_repack(const int32_t *gptq, const int32_t *perm, int32_t *marlin,
                             int size_k, int size_n, void *stream) {
    using namespace ferrum;
    FERRUM_REQUIRE(gptq && marlin, "ferrum_repack: null pointer");
    // int32 loads and stores: a misaligned pointer would fault (a sticky error that ends the
    // CUDA context) instead of failing here.
    FERRUM_REQUIRE(aligned4(gptq) && aligned4(marlin) && (!perm || aligned4(perm)),
                   "ferrum_repack: gptq, perm and marlin must be 4-byte aligned");
    FERRUM_REQUIRE(size_k > 0 && size_k % 16 == 0, "ferrum_repack: size_k=%d is not a multiple of 16", size_k);
    FERRUM_REQUIRE(size_n > 0 && size_n % 64 == 0, "ferrum_repack: size_n=%d is not a multiple of 64", size_n);
    const long long total = (long long)(size_k / 16) * 2 * size_n;
    repack_kernel<<<grid_for(total, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const uint32_t *>(gptq), perm, reinterpret_cast<uint32_t *>(marlin),
        size_k, size_n);
    FERRUM_CUDA_CHECK(cudaGetLastError());
    return FERRUM_OK;
}

extern "C" int ferrum_permute_cols(const void *a, const int32_t *perm, void *out, int size_m,
                                   int size_k, void *stream) {
    using namespace ferrum;
    FERRUM_REQUIRE(a && perm && out, "ferrum_permute_cols: null pointer");
    FERRUM_REQUIRE(size_m > 0 && size_k > 0, "ferrum_permute_cols: empty problem");
    FERRUM_REQUIRE(aligned2(a) && aligned2(out) && aligned4(perm),
                   "ferrum_permute_cols: a and out must be 2-byte aligned, perm 4-byte aligned");
    const long long total = (long long)size_m * size_k;
    permute_cols_kernel<<<grid_for(total, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const half *>(a), perm, static_cast<half *>(out), size_m, size_k);
    FERRUM_CUDA_CHECK(cudaGetLastError());
    return FERRUM_OK;
}
