// ptx.cuh -- thin wrappers over the PTX instructions the Marlin design is built from.
// Each wrapper is one instruction; the comments say which fragment layout it reads or writes
// (PTX ISA, "Matrix fragments for mma.m16n8k16" and "ldmatrix").
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

namespace ferrum {

__device__ __forceinline__ uint32_t smem_u32(const void *ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte asynchronous global->shared copy that bypasses L1 (.cg). With valid == false the
// source is not read and the 16 bytes are zero-filled (src-size 0): used for rows of A past M.
__device__ __forceinline__ void cp_async16_zfill(void *smem, const void *gmem, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
                 "l"(gmem), "r"(src_bytes));
}

// The same copy with an L2 cache policy: the weights are read exactly once per call, so they
// are marked evict-first and do not push A, the scales and the partial sums out of L2.
__device__ __forceinline__ void cp_async16_hint(void *smem, const void *gmem, uint64_t policy) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(
                     smem_u32(smem)),
                 "l"(gmem), "l"(policy));
}

__device__ __forceinline__ uint64_t evict_first_policy() {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}

// Programmatic dependent launch (PTX griddepcontrol, sm_90+; no-ops before): wait until the
// kernels this one depends on have completed and their writes are visible; and allow the
// kernel that depends on this one to launch now.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Shared memory written through the generic proxy (cp.async, st.shared) becomes visible to
// the async proxy (e.g. wgmma's operand reads) after this fence in the writing thread + a barrier.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most `pending` committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
}

// Four 8x8 fp16 matrices from shared memory; lane l gives the address of row l%8 of matrix
// l/8. Register i of every lane then holds its two elements of matrix i in mma order.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&frag)[4], const void *smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(frag[0]), "=r"(frag[1]), "=r"(frag[2]), "=r"(frag[3])
                 : "r"(smem_u32(smem)));
}

// D = A * B + D on the tensor cores, fp16 inputs and fp32 accumulation.
// A (16x16, row): a0 = (g, 2i..2i+1), a1 = (g+8, ..), a2 = (g, 2i+8..), a3 = (g+8, 2i+8..)
// B (16x8, col):  b0 = (k 2i..2i+1, n g), b1 = (k 2i+8..2i+9, n g)
// C (16x8):       c0,c1 = (g, 2i..2i+1), c2,c3 = (g+8, 2i..2i+1)        g = lane/4, i = lane%4
__device__ __forceinline__ void mma_m16n8k16(const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             float (&c)[4]) {
    // Pure register-to-register: no volatile needed (the SASS is the same either way).
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The same with C = 0 (a fresh sum): D = A * B.
__device__ __forceinline__ void mma_m16n8k16_fresh(const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                   float (&d)[4]) {
    const float zero = 0.f;
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(zero));
}

// Any 3-input bitwise function in one instruction; lut is the truth table over
// (a = 0xF0, b = 0xCC, c = 0xAA).
template <int lut>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(lut));
    return d;
}

__device__ __forceinline__ half2 as_half2(uint32_t x) { return *reinterpret_cast<half2 *>(&x); }
__device__ __forceinline__ uint32_t as_u32(half2 x) { return *reinterpret_cast<uint32_t *>(&x); }

// Dequantize the four nibbles of one word that feed one n8 column (see format.py): nibbles
// 0 and 4 (bits 0-3, 16-19) -> b0, nibbles 1 and 5 (bits 4-7, 20-23) -> b1. The trick: OR-ing a
// nibble into the mantissa of fp16 1024 (0x6400) gives exactly 1024 + v (or 1024 + 16v for the
// high nibble of a byte) with no int->float conversion; one subtract or fma then removes the
// 1024 and the uint4b8 bias of 8.
__device__ __forceinline__ void dequant_u4b8(uint32_t q, uint32_t (&b)[2]) {
    constexpr uint32_t kLowMask = 0x000f000fu;
    constexpr uint32_t kHighMask = 0x00f000f0u;
    constexpr uint32_t kExp1024 = 0x64006400u;   // fp16 1024.0 in both halves
    constexpr int kAndOr = (0xF0 & 0xCC) | 0xAA; // lop3 table of (a & b) | c
    const uint32_t lo = lop3<kAndOr>(q, kLowMask, kExp1024);
    const uint32_t hi = lop3<kAndOr>(q, kHighMask, kExp1024);
    const half2 k1032 = as_half2(0x64086408u);   // 1024 + 8
    const half2 kSixteenth = as_half2(0x2c002c00u); // 1/16
    const half2 kMinus72 = as_half2(0xd480d480u);   // -(1024/16 + 8)
    b[0] = as_u32(__hsub2(as_half2(lo), k1032));
    b[1] = as_u32(__hfma2(as_half2(hi), kSixteenth, kMinus72));
}

// The eight nibbles of one word as fp16 64 + v, bias left in: OR-ing a nibble into mantissa bits
// 4-7 of fp16 64 (0x5400, whose mantissa step is 1/16) gives exactly 64 + v, so each pair costs
// one lop3 (after a shift) and no fp16 arithmetic. x[0] = nibbles 0 and 4, x[1] = 1 and 5,
// x[2] = 2 and 6, x[3] = 3 and 7 (low half first). The 64 + 8 this leaves in every weight is
// taken out of the fp32 sums, once per row (see the swapped kernel in mm.cu).
__device__ __forceinline__ void nibbles_plus64(uint32_t q, uint32_t (&x)[4]) {
    constexpr uint32_t kMask = 0x00f000f0u;
    constexpr uint32_t kExp64 = 0x54005400u;     // fp16 64.0 in both halves
    constexpr int kAndOr = (0xF0 & 0xCC) | 0xAA; // lop3 table of (a & b) | c
    x[0] = lop3<kAndOr>(q << 4, kMask, kExp64);
    x[1] = lop3<kAndOr>(q, kMask, kExp64);
    x[2] = lop3<kAndOr>(q >> 4, kMask, kExp64);
    x[3] = lop3<kAndOr>(q >> 8, kMask, kExp64);
}

}  // namespace ferrum
