// mm_wgmma.cu -- the W4A16 product on Hopper's warpgroup MMA (wgmma, sm_90a), for many rows.
//
// The mma.sync kernel (mm.cu) tops out near 300 TFLOP/s on an H100, well below what the tensor
// cores give to wgmma. This kernel computes the same C tile transposed, C^T = W^T A^T, so that
// the weights are wgmma's A operand, taken from registers, and the activations its B operand,
// read by the tensor cores straight from shared memory:
//   * a Marlin word holds, for one k16 x n16 tile, exactly the pairs an mma.m16n8k16 B
//     fragment needs; read as W^T they are the pairs of an A fragment (rows = weight columns),
//     so the dequantized words of a warp's lane feed wgmma with no shuffles;
//   * a block owns 256 weight columns x BM = 64 or 128 rows of A and a range of K (split-K);
//     2 warpgroups; warp w of either holds chunk w (64 columns) of the tile, warpgroup q the
//     n16 tiles 2q and 2q+1 of every chunk, so each warpgroup issues two m64 x BM x k16
//     wgmmas per k16 step (64 weight columns each: rows 16w.. of wgmma j are chunk w's n16
//     tile 2q + j);
//   * A, B and scales stream through the same kind of cp.async pipeline as the mma.sync kernel
//     (StageCopy), TK = 64 or 128, A laid out in 8-row x 128-byte swizzle atoms, as wgmma's
//     descriptor wants;
//   * dequantization (lop3 + the fp16 exponent trick, group scales) of step k+1 overlaps the
//     tensor cores' work on step k (two fragment buffers, wgmma.wait_group 1);
//   * the epilogue (C^T fragments -> FP32 C tile in shared memory -> fp16 C, split-K reduction)
//     is mm_common.cuh's.
// KSPLIT (tile 8): a block owns 128 weight columns instead, and the two warpgroups split
// each stage's k16 steps (warpgroup q the steps of A atom q); warp w of either holds chunk w / 2
// and the n16 tiles 2(w % 2), 2(w % 2) + 1 of it, so per k16 step the warpgroup issues the same
// two wgmmas over all 128 columns. The two warpgroups' sums are added in the epilogue. Half the
// columns a block make twice the column tiles: on narrow layers a grid fills the GPU with half
// the splits, each split's FP32 partial half as wide.
// NARROW (tile 9, always with KSPLIT): a block owns one 64-column chunk and TK = 256 (four A
// atoms, two a warpgroup); warp w of either warpgroup holds its n16 tile w % 4, one word of
// the lane's vector, so per k16 step a warpgroup issues one wgmma over the 64 columns. Four
// times tile 5's column tiles: the same grid with a quarter of the splits, and each block's
// partial a quarter as wide (at 16 rows the split-K exchange, not the stream, is what grows
// with the rows); the k tile of 256 keeps a stage's weight bytes (and so the barriers per
// byte) those of tile 8.
#include <cuda_fp16.h>

#include "common.cuh"
#include "mm_common.cuh"
#include "ptx.cuh"
#include "wgmma.cuh"

namespace ferrum {

template <int MB, int K_ATOMS, int BLOCKS_PER_SM, bool GROUPED, bool KSPLIT = false, bool NARROW = false>
struct WgTile {
    static constexpr int kThreads = 256;                 // 2 warpgroups
    static constexpr int kRows = 16 * MB;                // BM: 64 or 128 rows of A
    static constexpr int TK = 64 * K_ATOMS;              // 64, 128 or 256: 1, 2 or 4 swizzle atoms of A
    static constexpr int TN = NARROW ? kWgmmaNarrowTileN : KSPLIT ? kWgmmaSplitTileN : kWgmmaTileN;   // weight columns
    static constexpr int kWgmmas = NARROW ? 1 : 2;     // wgmmas a warpgroup issues per k16 step
    // k16 steps of a stage that one warpgroup computes (KSPLIT: those of its half of the A atoms)
    static constexpr int kSteps = KSPLIT ? 2 * K_ATOMS : 4 * K_ATOMS;
    static_assert(!KSPLIT || K_ATOMS == 2 || (NARROW && K_ATOMS == 4), "KSPLIT: one A atom per warpgroup (NARROW: two)");
    static_assert(!NARROW || KSPLIT, "NARROW: the warpgroups split K");
    // A stage: K_ATOMS blocks of kRows rows x 128 bytes (the 64 k values of one atom), each
    // a stack of 8-row x 128-byte swizzle atoms, as wgmma's descriptor wants.
    static constexpr bool kAAtomMajor = true;
    static constexpr int kChunks = TN / 64;
    static constexpr int kKTiles = TK / 16;
    static constexpr int kARowVecs = TK / 8;
    static constexpr int kAStageVecs = kRows * kARowVecs;
    static constexpr int kBStageVecs = kKTiles * kChunks * 32;
    static constexpr int kSRows = GROUPED ? TK / 32 : 0;
    static constexpr int kSStageVecs = kSRows * TN / 8;
    static constexpr int kStageBytes = (kAStageVecs + kBStageVecs + kSStageVecs) * 16;
    // One block per SM, or two 64-row blocks (tile 6: 16 warps hide each other's shared-memory
    // and dequantization latency, with half the pipeline depth each; it pays where the grid
    // fills two blocks per SM).
    static_assert(BLOCKS_PER_SM == 1 || (BLOCKS_PER_SM == 2 && MB <= 4), "two blocks: up to 64 rows");
    static constexpr int kStageBudget = (BLOCKS_PER_SM == 2 ? 105 : 200) * 1024;
    static constexpr int kStages = kStageBudget / kStageBytes > 8 ? 8 : kStageBudget / kStageBytes;
    static_assert(kStages >= 3, "pipeline depth");
    // With group scales ptxas (CUDA 13.0) serializes every wgmma (warning C7515) when one is in
    // flight across the pipeline loop's back edge. The loop is unrolled over the stages, so
    // the grouped kernels drain at the back edge only, once per kStages stages; except with
    // only 3 stages (tile 6), which rather keep two stages in flight and drain every stage.
    static constexpr bool kDrainEachStage = GROUPED && kStages < 4;
    // Stages fetched ahead of the one computed: where a stage's last wgmma may still run into
    // the next stage, the slot computed last iteration stays untouched too.
    static constexpr int kAhead = kDrainEachStage ? kStages - 1 : kStages - 2;
    static constexpr int kPipeBytes = kStages * kStageBytes;
    // FP32 C tile [kRows][TN], rows padded by 4 floats: the accumulator stores of one warp
    // (8 weight columns x rows 2i, i = 0..3) then hit 32 different banks.
    static constexpr int kCStride = TN + 4;
    static constexpr int kCTileBytes = kRows * kCStride * 4;
    // + 1024: the A atoms must start 1024-byte aligned; the base is aligned at run time.
    static constexpr int kSmemBytes = (kPipeBytes > kCTileBytes ? kPipeBytes : kCTileBytes) + 1024;
    static constexpr int kAcc = kRows / 2;               // fp32 accumulators per wgmma per thread
    static_assert((kRows * 128) % 1024 == 0, "A atoms stay 1024-byte aligned");
};

template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc,
                                         int scale_d = 1) {
    if constexpr (N == 16) wgmma_m64n16k16_rs(d, a, desc, scale_d);
    else if constexpr (N == 32) wgmma_m64n32k16_rs(d, a, desc, scale_d);
    else if constexpr (N == 64) wgmma_m64n64k16_rs(d, a, desc, scale_d);
    else wgmma_m64n128k16_rs(d, a, desc, scale_d);
}

// F32S: the scales in FP32, per group (FOLD k16 steps: 8 for groups of 128 rows, 4 for 64; 0
// off). The fragments are the exact q - 8, unscaled; each group's wgmmas sum into a run
// accumulator of their own (the group's first wgmma overwrites it), and the run is multiplied
// by its group's scales in FP32 and added to the total in the next group's first step, after
// that step's dequantization and before its wgmmas (the wait there is for the previous group's
// last wgmma, which the step would wait for anyway). Per weight that drops the four fp16 scale
// multiplies of a word (and the per-step scale loads) for one FFMA per accumulator per group;
// the scales are applied in FP32, not fp16.
// One C tile's K range (a split, or a stream-K segment) of one block: the pipeline, then the
// epilogue. `smem` is the block's dynamic shared memory, 1024-byte aligned.
template <int MB, int K_ATOMS, int BLOCKS_PER_SM, bool GROUPED, int FOLD, bool KSPLIT, bool NARROW>
__device__ __forceinline__ void wgmma_tile(const MmParams &p, const BlockWork &work, int4 *const smem) {
    using T = WgTile<MB, K_ATOMS, BLOCKS_PER_SM, GROUPED, KSPLIT, NARROW>;
    constexpr int kWg = T::kWgmmas;
    constexpr int kStages = T::kStages;
    constexpr bool F32S = FOLD > 0;
    constexpr int kFold = F32S ? FOLD : 1;   // k16 steps a group (a divisor where F32S is off)
    static_assert(!F32S || (GROUPED && T::kKTiles % kFold == 0), "FP32 scales: whole groups per stage");
    // a warpgroup's steps start its runs: where a group spans both warpgroups' steps, each
    // folds its own share
    constexpr int kRunSteps = kFold < T::kSteps ? kFold : T::kSteps;
    int4 *const a_sh = smem;
    int4 *const b_sh = a_sh + kStages * T::kAStageVecs;
    int4 *const s_sh = b_sh + kStages * T::kBStageVecs;

    const int kt_begin = work.kt_begin, iters = work.iters;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wg = warp / 4;
    // this warp's 64 weight columns of the tile, and which of its n16 tiles: kWg * pair ..
    // kWg * pair + kWg - 1 (NARROW: one chunk, warp w its tile w % 4; KSPLIT: two warps a chunk,
    // a pair each; else each warpgroup its pair of every chunk)
    const int chunk = NARROW ? 0 : KSPLIT ? (warp % 4) / 2 : warp % 4;
    const int pair = NARROW ? warp % 4 : KSPLIT ? warp % 2 : wg;
    // the warpgroup's first k16 step of a stage
    const int kk0 = KSPLIT ? wg * T::kSteps : 0;

    const StageCopy<T, GROUPED> copy(p, work, tid);
    auto fetch_acts = [&](int stage, int kt) { copy.acts(a_sh + stage * T::kAStageVecs, kt); };
    auto fetch_weights = [&](int stage, int kt) {
        copy.weights(b_sh + stage * T::kBStageVecs, s_sh + stage * T::kSStageVecs, kt);
    };

    float acc[kWg][T::kAcc];
#pragma unroll
    for (int j = 0; j < kWg; ++j)
#pragma unroll
        for (int i = 0; i < T::kAcc; ++i) acc[j][i] = 0.f;
    // F32S: the run sums [wgmma][register] and the scales of the run not yet added ([wgmma]
    // [column c / c + 8]); zero before the first stage, whose fold adds 0 x 0.
    float run[kWg][T::kAcc];
    float run_s[kWg][2];
#pragma unroll
    for (int j = 0; j < kWg; ++j) {
#pragma unroll
        for (int i = 0; i < T::kAcc; ++i) run[j][i] = 0.f;
        run_s[j][0] = run_s[j][1] = 0.f;
    }
    // What the wgmmas accumulate into: the run (F32S) or the total.
    float (&d)[kWg][T::kAcc] = *[&] {
        if constexpr (F32S) return &run;
        else return &acc;
    }();
    // total += run x its scales (d[4t + 2h + e]: weight column c + 8h), once no wgmma is in
    // flight
    auto fold = [&] {
        if constexpr (F32S) {
#pragma unroll
            for (int j = 0; j < kWg; ++j)
#pragma unroll
                for (int i = 0; i < T::kAcc; ++i) {
                    fence_operand(run[j][i]);
                    acc[j][i] = fmaf(run[j][i], run_s[j][(i >> 1) & 1], acc[j][i]);
                }
        }
    };

    // kWg consecutive 32-bit words (kWg * 2 halves of scales) from a stage's words or scales,
    // in one load
    auto load_words = [](const uint32_t *src, uint32_t (&dst)[kWg]) {
        if constexpr (kWg == 2) {
            const uint2 v = *reinterpret_cast<const uint2 *>(src);
            dst[0] = v.x;
            dst[1] = v.y;
        } else {
            dst[0] = *src;
        }
    };
    // One pipeline stage: per k16 step, this lane's kWg words (n16 tiles kWg pair .. of its
    // chunk) -> kWg A fragments -> kWg wgmmas over the stage's rows of A. NARROW (one wgmma a
    // step) takes its steps in pairs instead, two wgmmas into the one accumulator between a
    // fence and a commit, so that a lane's words a commit group are tile 5's, 6's and 8's two.
    constexpr int kPair = NARROW ? 2 : 1;   // k16 steps a commit group
    static_assert(T::kSteps % kPair == 0 && (!F32S || kRunSteps % kPair == 0), "whole pairs");
    auto compute_stage = [&](int stage, int kt) {
        const uint32_t *words = reinterpret_cast<const uint32_t *>(b_sh + stage * T::kBStageVecs) +
                                ((kk0 * T::kChunks + chunk) * 32 + lane) * 4 + kWg * pair;
        const uint32_t *scales = reinterpret_cast<const uint32_t *>(s_sh + stage * T::kSStageVecs);
        const uint32_t a_addr = smem_u32(a_sh + stage * T::kAStageVecs) + (kk0 / 4) * (T::kRows * 128);
        uint32_t frag[2][kPair][kWg][4];   // [buffer][step of the pair][wgmma][register]
#pragma unroll
        for (int i0 = 0; i0 < T::kSteps; i0 += kPair) {
            uint32_t (&fp)[kPair][kWg][4] = frag[(i0 / kPair) & 1];
#pragma unroll
            for (int u = 0; u < kPair; ++u) {
                const int i = i0 + u;
                const int kk = kk0 + i;   // the stage's k16 step
                uint32_t (&f)[kWg][4] = fp[u];
                uint32_t q[kWg];
                load_words(words + i * T::kChunks * 32 * 4, q);
                half2 s[kWg][2];   // [wgmma][column c / c + 8]
                if constexpr (GROUPED && !F32S) {
                    const int k = kt * T::TK + 16 * kk;
                    const int g_row = (k >> p.group_shift) - ((kt * T::TK) >> p.group_shift);
                    // Permuted scales: within 64 columns, 8c..8c+7 hold columns c, c+8, .., c+56;
                    // this warp's are halves 2 kWg pair .. 2 kWg pair + 2 kWg - 1 of the lane's vector.
                    uint32_t sv[kWg];
                    load_words(scales + (g_row * (T::TN / 8) + chunk * 8 + lane / 4) * 4 + kWg * pair, sv);
                    const half *sh = reinterpret_cast<const half *>(sv);
#pragma unroll
                    for (int j = 0; j < kWg; ++j) {
                        s[j][0] = __half2half2(sh[2 * j]);
                        s[j][1] = __half2half2(sh[2 * j + 1]);
                    }
                }
#pragma unroll
                for (int j = 0; j < kWg; ++j) {
                    const uint32_t word = q[j];
                    uint32_t lo[2], hi[2];     // weight column c and c + 8 (c = lane / 4)
                    dequant_u4b8(word, lo);
                    dequant_u4b8(word >> 8, hi);
                    if constexpr (GROUPED && !F32S) {
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            lo[h] = as_u32(__hmul2(as_half2(lo[h]), s[j][0]));
                            hi[h] = as_u32(__hmul2(as_half2(hi[h]), s[j][1]));
                        }
                    }
                    // A fragment rows = weight columns: (c, k 2i..), (c+8, k 2i..), (c, k 2i+8..),
                    // (c+8, k 2i+8..). In a chunk past N (not loaded) these are garbage, which
                    // reaches only the rows of D for those columns, never written out.
                    f[j][0] = lo[0];
                    f[j][1] = hi[0];
                    f[j][2] = lo[1];
                    f[j][3] = hi[1];
                }
            }
            if constexpr (F32S) {
                if (i0 % kRunSteps == 0) {   // the previous run: wait for its last wgmma, fold it,
                    wgmma_wait<0>();         // and take this group's scales (row (kk0 + i0) / kFold
                    fold();                  // of the stage's; permuted as above)
                    uint32_t sv[kWg];
                    load_words(scales + (((kk0 + i0) / kFold) * (T::TN / 8) + chunk * 8 + lane / 4) * 4 + kWg * pair, sv);
                    const half *sh = reinterpret_cast<const half *>(sv);
#pragma unroll
                    for (int j = 0; j < kWg; ++j) {
                        run_s[j][0] = __half2float(sh[2 * j]);
                        run_s[j][1] = __half2float(sh[2 * j + 1]);
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < kWg; ++j)
#pragma unroll
                for (int r = 0; r < T::kAcc; ++r) fence_operand(d[j][r]);
            wgmma_fence();
            // F32S: a run's first wgmma starts it (D = A B)
#pragma unroll
            for (int u = 0; u < kPair; ++u) {
                const int i = i0 + u;
                const uint64_t desc = wgmma_desc_sw128(a_addr + (i / 4) * (T::kRows * 128) + 32 * (i % 4));
#pragma unroll
                for (int j = 0; j < kWg; ++j) wgmma_rs<T::kRows>(d[j], fp[u][j], desc, !F32S || i % kRunSteps != 0);
            }
            wgmma_commit();
            // The previous group is done: its fragment buffer is free for the next one, and by
            // the end of the stage only this stage's last group is still reading shared memory.
            wgmma_wait<1>();
#pragma unroll
            for (int j = 0; j < kWg; ++j)
#pragma unroll
                for (int r = 0; r < T::kAcc; ++r) fence_operand(d[j][r]);
        }
    };

    // ---- the pipeline (mm_common.cuh): kAhead stages in flight while one is computed; a
    // stage's last wgmma runs into the next stage, and the grouped kernels drain at the loop's
    // back edge (see kDrainEachStage) --------------------------------------------------------
    auto compute_and_drain = [&](int stage, int kt) {
        compute_stage(stage, kt);
        if constexpr (T::kDrainEachStage) wgmma_wait<0>();
    };
    run_pipeline<kStages, T::kAhead, true>(iters, kt_begin, p.weights_early, fetch_acts, fetch_weights, compute_and_drain, [] {
        if constexpr (GROUPED && !T::kDrainEachStage) wgmma_wait<0>();
    });
    wgmma_wait<0>();
#pragma unroll
    for (int j = 0; j < kWg; ++j)
#pragma unroll
        for (int i = 0; i < T::kAcc; ++i) fence_operand(acc[j][i]);
    fold();   // F32S: the last stage's run (its scales are in run_s)
    cp_async_wait<0>();
    __syncthreads();

    // ---- C^T fragments -> FP32 C tile [row of A][weight column] in shared memory ------------
    // d[4t + 2h + e] of wgmma j: weight column 64*chunk + 16*(kWg pair + j) + lane/4 + 8h,
    // row of A 8t + 2*(lane%4) + e. KSPLIT: warpgroup 0's sums, then warpgroup 1's added.
    float *const ctile = reinterpret_cast<float *>(smem);
    auto to_ctile = [&](bool add) {
#pragma unroll
        for (int j = 0; j < kWg; ++j)
#pragma unroll
            for (int i = 0; i < T::kAcc; ++i) {
                const int col = 64 * chunk + 16 * (kWg * pair + j) + lane / 4 + 8 * ((i >> 1) & 1);
                const int row = 8 * (i >> 2) + 2 * (lane % 4) + (i & 1);
                float &c = ctile[row * T::kCStride + col];
                c = add ? c + acc[j][i] : acc[j][i];
            }
    };
    if (!KSPLIT || wg == 0) to_ctile(false);
    if constexpr (KSPLIT) {
        __syncthreads();
        if (wg == 1) to_ctile(true);
    }
    __syncthreads();
    write_c_tile<T::kRows, T::TN, T::kCStride, T::kThreads, GROUPED>(p, work, ctile);
}

// The kernel: one tile's K range per block (split-K), or with stream-K (SK, p.sk_iters) a run
// of iterations that may cover the end of one tile and the start of the next, one wgmma_tile
// each (as the mma.sync kernel's, mm.cu).
template <int MB, int K_ATOMS, int BLOCKS_PER_SM, bool GROUPED, int FOLD, bool KSPLIT, bool SK, bool NARROW>
__global__ void __launch_bounds__(256, BLOCKS_PER_SM) marlin_mm_wgmma_kernel(const MmParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using T = WgTile<MB, K_ATOMS, BLOCKS_PER_SM, GROUPED, KSPLIT, NARROW>;
    extern __shared__ int4 smem_raw[];
    int4 *const smem = reinterpret_cast<int4 *>(
        reinterpret_cast<char *>(smem_raw) + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023));
    if constexpr (!SK) {
        wgmma_tile<MB, K_ATOMS, BLOCKS_PER_SM, GROUPED, FOLD, KSPLIT, NARROW>(p, block_work(p, T::kRows, T::TN), smem);
    } else {
        long long it = (long long)blockIdx.x * p.sk_iters;
        const long long end = min(it + p.sk_iters, (long long)p.m_slices * p.n_tiles_total * p.k_tiles);
        while (it < end) {
            const BlockWork work = stream_k_work(p, T::kRows, T::TN, it, end);
            wgmma_tile<MB, K_ATOMS, BLOCKS_PER_SM, GROUPED, FOLD, KSPLIT, NARROW>(p, work, smem);
            it += work.iters;
            if (it < end) __syncthreads();   // the next segment's copies overwrite the C tile
        }
    }
#endif
}

template <int MB, int K_ATOMS, int BLOCKS_PER_SM, bool GROUPED, int FOLD = 0, bool KSPLIT = false, bool SK = false,
          bool NARROW = false>
struct WgInstance {
    using T = WgTile<MB, K_ATOMS, BLOCKS_PER_SM, GROUPED, KSPLIT, NARROW>;
    static constexpr auto kKernel = marlin_mm_wgmma_kernel<MB, K_ATOMS, BLOCKS_PER_SM, GROUPED, FOLD, KSPLIT, SK, NARROW>;
    static int launch(const MmParams &p, int grid, cudaStream_t stream, bool pdl, int smem_bytes) {
        return launch_mm<T::kThreads, T::kSmemBytes>(kKernel, p, grid, stream, pdl, smem_bytes);
    }
    static KernelEntry entry() { return {reinterpret_cast<const void *>(kKernel), T::kSmemBytes, &launch}; }
};

bool wgmma_built() {
#if defined(FERRUM_HAVE_SM90A)
    return true;
#else
    return false;
#endif
}

template <int MB, int K_ATOMS, int BLOCKS_PER_SM, bool KSPLIT = false, bool SK = false, bool NARROW = false>
static KernelEntry entry_of(bool grouped) {
    return grouped ? WgInstance<MB, K_ATOMS, BLOCKS_PER_SM, true, 0, KSPLIT, SK, NARROW>::entry()
                   : WgInstance<MB, K_ATOMS, BLOCKS_PER_SM, false, 0, KSPLIT, SK, NARROW>::entry();
}

template <int MB, int BLOCKS_PER_SM, bool KSPLIT, bool SK, bool NARROW = false, int K_ATOMS = 2>
static KernelEntry f32s_entry(int fold) {
    return fold == 4 ? WgInstance<MB, K_ATOMS, BLOCKS_PER_SM, true, 4, KSPLIT, SK, NARROW>::entry()
                     : WgInstance<MB, K_ATOMS, BLOCKS_PER_SM, true, 8, KSPLIT, SK, NARROW>::entry();
}

// Tile 9 (NARROW, k=256, two blocks an SM): 16- or 32-row blocks (m_blocks 1 or 2; the
// planner refuses others).
template <bool SK>
static KernelEntry narrow_entry(int m_blocks, bool grouped, int f32s_fold) {
    if ((f32s_fold == 4 || f32s_fold == 8) && grouped)
        return m_blocks == 1 ? f32s_entry<1, 2, true, SK, true, 4>(f32s_fold)
                             : f32s_entry<2, 2, true, SK, true, 4>(f32s_fold);
    return m_blocks == 1 ? entry_of<1, 4, 2, true, SK, true>(grouped) : entry_of<2, 4, 2, true, SK, true>(grouped);
}

// The k=128 tiles with `BLOCKS_PER_SM` blocks an SM: 16, 32, 64 rows (and 128 with one block).
template <int BLOCKS_PER_SM, bool KSPLIT, bool SK>
static KernelEntry k128_entry(int m_blocks, bool grouped, int f32s_fold) {
    if ((f32s_fold == 4 || f32s_fold == 8) && grouped && m_blocks <= 2)
        return m_blocks == 1 ? f32s_entry<1, BLOCKS_PER_SM, KSPLIT, SK>(f32s_fold)
                             : f32s_entry<2, BLOCKS_PER_SM, KSPLIT, SK>(f32s_fold);
    switch (m_blocks) {
        case 1: return entry_of<1, 2, BLOCKS_PER_SM, KSPLIT, SK>(grouped);
        case 2: return entry_of<2, 2, BLOCKS_PER_SM, KSPLIT, SK>(grouped);
        case 8:
            if constexpr (BLOCKS_PER_SM == 1 && !KSPLIT) return entry_of<8, 2, 1, false, SK>(grouped);
            [[fallthrough]];
        default: return entry_of<4, 2, BLOCKS_PER_SM, KSPLIT, SK>(grouped);
    }
}

// tile 4: k=64 x n=256, one block per SM; tile 5: k=128 x n=256, one block per SM; tile 6:
// k=128 x n=256, two blocks per SM (up to 64 rows); tile 8: k=128 x n=128 with the warpgroups
// splitting K (KSPLIT), the stage budget of one block per SM (its 16-row blocks are small
// enough for two); tile 9: k=256 x n=64 likewise (NARROW), 16 or 32 rows, two blocks an SM. f32s_fold (8: groups of 128 rows, 4: of 64; 0: off): 16- and 32-row blocks
// of the k=128 tiles apply the scales in FP32 per group (F32S above). stream_k: the stream-K
// instance (tiles 5, 6, 8 and 9; the planner asks for none of tile 4).
KernelEntry wgmma_entry(int tile, int m_blocks, bool grouped, int f32s_fold, bool stream_k) {
    switch (tile) {
        case 5: return stream_k ? k128_entry<1, false, true>(m_blocks, grouped, f32s_fold)
                                : k128_entry<1, false, false>(m_blocks, grouped, f32s_fold);
        case 6: return stream_k ? k128_entry<2, false, true>(m_blocks, grouped, f32s_fold)
                                : k128_entry<2, false, false>(m_blocks, grouped, f32s_fold);
        case 8: return stream_k ? k128_entry<1, true, true>(m_blocks, grouped, f32s_fold)
                                : k128_entry<1, true, false>(m_blocks, grouped, f32s_fold);
        case 9: return stream_k ? narrow_entry<true>(m_blocks, grouped, f32s_fold)
                                : narrow_entry<false>(m_blocks, grouped, f32s_fold);
        default: return m_blocks == 8 ? entry_of<8, 1, 1>(grouped) : entry_of<4, 1, 1>(grouped);
    }
}

}  // namespace ferrum
