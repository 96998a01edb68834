// mm.cu -- the W4A16 matrix product: fp16 A [M, K] x uint4b8 Marlin B [K/16, 2N] -> fp16 C.
//
// Design (after Frantar et al., "MARLIN: Mixed-Precision Auto-Regressive Parallel Inference on
// Large Language Models", 2024; the code here is ferrum's own):
//   * a thread block owns a C tile of 16*MB rows x TN columns and a range of K (split-K);
//   * A, B (and the group scales) stream through a kStages-deep cp.async pipeline in shared
//     memory; B is read once per call, so its copies carry an L2 evict-first policy;
//   * each warp owns one 64-column chunk of the tile and a subset of the 16-row k-tiles of every
//     stage; the packed words come straight out of shared memory into registers and are
//     dequantized into mma.m16n8k16 B fragments with lop3 and the fp16 0x6400 exponent trick;
//   * at the end the warps that shared a chunk add their accumulators in shared memory (block
//     reduce), and blocks that shared a C tile add their FP32 partials in a fixed order: every
//     block writes its partial to the workspace and bumps a per-tile counter; the block that
//     finds itself last sums the partials split 0, 1, 2, ... and writes C (global reduce). The
//     sum is deterministic and no block ever waits for another;
//   * up to 8 rows, the weights are the mma's A operand instead (the swapped kernel, mm_tile);
//   * one-slice launches may run as stream-K: equal runs of (tile, k-tile) iterations, one per
//     block of a single wave, reduced the same way (marlin_mm_kernel, stream_k_work).
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "common.cuh"
#include "mm_common.cuh"

namespace ferrum {


// Compile-time geometry of one kernel instance. Every constant that shapes shared memory or
// the warp layout lives here. SWAP8 = 1: the swapped kernel (one slice, of which 8 rows are
// used; see mm_tile).
template <int MB, int TK_BLOCKS, int TN_BLOCKS, bool GROUPED, int SWAP8 = 0>
struct Tile {
    static_assert(SWAP8 == 0 || (MB == 1 && SWAP8 == 1), "the swapped kernel takes one 8-row block");
    static constexpr int kThreads = 256;
    static constexpr int kWarps = kThreads / 32;
    static constexpr int kRows = 16 * MB;
    static constexpr bool kAAtomMajor = false;   // A stage: rows of TK halves (StageCopy)
    static constexpr int TK = 16 * TK_BLOCKS;
    static constexpr int TN = 16 * TN_BLOCKS;
    // Bytes of A, B and scales per pipeline stage.
    static constexpr int kStageBytes = 16 * MB * TK * 2 + TK * TN / 2 + (GROUPED ? (TK / 32) * TN * 2 : 0);
    // As many stages as fit the shared memory of the blocks an SM holds (2 for few rows,
    // where the weight stream is the whole cost and bytes in flight set the speed; 1 for
    // many rows), between 3 and 8. Tile 3 (k=64) is the planner's fallback on GPUs that hold
    // less (sm_86 and sm_89 allow 99 KB per block, sm_80 163 KB): 96 KB whatever the rows.
    static constexpr int kStageBudget = (TK == 64 ? 96 : MB <= 2 ? 108 : 200) * 1024;
    static constexpr int kStages = kStageBudget / kStageBytes < 3 ? 3
                                 : (kStageBudget / kStageBytes > 8 ? 8 : kStageBudget / kStageBytes);
    static constexpr int kChunks = TN / 64;                 // 64-column chunks = warp columns
    static constexpr int kKGroups = kWarps / kChunks;       // warps that share one chunk
    static constexpr int kKTilesPerWarp = TK_BLOCKS / kKGroups;
    static_assert(kWarps % kChunks == 0 && TK_BLOCKS % kKGroups == 0, "warp layout");

    // A stage: 16*MB rows of TK halves, rows split in 16-byte vectors.
    static constexpr int kARowVecs = TK / 8;
    static constexpr int kAStageVecs = 16 * MB * kARowVecs;
    // B stage: TK/16 k-tiles x kChunks chunks x 128 words (32 int4), the global order.
    static constexpr int kBStageVecs = TK_BLOCKS * kChunks * 32;
    // Scale stage: up to TK/32 group rows (group size >= 32) of TN halves.
    static constexpr int kSRows = GROUPED ? TK / 32 : 0;
    static constexpr int kSStageVecs = kSRows * TN / 8;
    static constexpr int kPipeBytes = kStages * (kAStageVecs + kBStageVecs + kSStageVecs) * 16;

    // Block reduce: one k-group's accumulators, laid out [register][warp column][lane] so
    // that a warp's 32 lanes touch 32 consecutive floats (no bank conflicts).
    // The k-groups fold in halves (groups [h, 2h) add into [0, h), h = kKGroups/2 .. 1), so
    // the buffer holds kKGroups/2 of them at once.
    // MB m-tiles x 8 n8 tiles x 4; swapped: 4 n16 tiles x 4
    static constexpr int kAccPerThread = SWAP8 ? 4 * 4 : MB * 8 * 4;
    static constexpr int kRedFloats = kAccPerThread * kChunks * 32;   // one k-group
    static constexpr int kRedBytes = kRedFloats * 4 * (kKGroups > 1 ? kKGroups / 2 : 1);
    static_assert((kKGroups & (kKGroups - 1)) == 0, "k-groups fold in halves");
    // C tile in FP32, rows padded by 8 floats so that the float2 writes of one half-warp
    // (rows g = 0..3, columns 2i) fall in 16 different bank pairs.
    static constexpr int kCStride = TN + 8;
    static constexpr int kCTileBytes = 16 * MB * kCStride * 4;

    static constexpr int kSmemBytes =
        kPipeBytes > kRedBytes ? (kPipeBytes > kCTileBytes ? kPipeBytes : kCTileBytes)
                               : (kRedBytes > kCTileBytes ? kRedBytes : kCTileBytes);
    // Few rows: 2 blocks (16 warps) per SM; more rows need the registers for accumulators.
    static constexpr int kMinBlocksPerSm = MB <= 2 ? 2 : 1;
};

// The kernel body. With SWAP8 = 1 (one slice of at most 8 rows of A) the weights are the A
// operand of mma.m16n8k16 and the rows of A its B operand (n = 8 rows): one Marlin word then
// makes exactly one A fragment (columns 16j + c and 16j + 8 + c, k rows 2i.., 2i+8..), so a
// word costs one mma per 8 rows instead of two per 16. Its nibbles are not debiased and not
// scaled in fp16 (nibbles_plus64: 64 + v, one lop3 a pair); instead each warp sums its run of
// k-tiles of a stage in FP32, adds -72 x (the rows' sum of A over the run) -- one more mma a
// k-tile, with a constant -72 weight -- and multiplies the run by its group's scales in FP32.
// A run never crosses a group end: the host takes this kernel only for groups of at least a
// run's 16 x kKTilesPerWarp rows (swap_min_group). Fewer instructions per weight than the fp16
// dequantize-and-scale path (the kernel is issue-bound at few rows), and the scales are
// applied in FP32, not fp16.
// The bias taken out as -72 x sum(A) is inf - inf where a row of A holds an inf, and it rounds
// the run sums at the size of 72 |a|, not of the result: so a warp whose bias terms or results
// are not all finite, or whose estimated rounding error is large against its result (an
// activation far above the rest on weights that contribute little), recomputes its share from
// global memory with every nibble debiased on its own (swapped_exact). That gives what float64 gives (inf x 0
// = NaN, inf x w an inf of w's sign) and the fp16 path's accuracy. N(0, 1) activations stay
// some 10^4 below the bound.
// mm_tile computes one C tile's K range (`work`): all of the kernel but the choice of work
// (marlin_mm_kernel).
template <class T>
__device__ __forceinline__ void swapped_exact(const MmParams &p, const BlockWork &work, int chunk, int kgroup,
                                           float (&acc)[T::kAccPerThread]) {
    constexpr int kRun = T::kKTilesPerWarp;
    constexpr bool kGrouped = T::kSRows > 0;
    const int lane = threadIdx.x % 32, g = lane / 4, i = lane % 4;
    const bool row_live = g < min(T::kRows, p.M - work.m0);
    const half *a_row = p.a + (long long)(work.m0 + (row_live ? g : 0)) * p.K + 2 * i;
    const int4 *b_col = work.B + (work.n0 + 64 * chunk) / 2 + lane;
    const half *s_col = work.S + work.n0 + 64 * chunk + 8 * g;
#pragma unroll
    for (int v = 0; v < T::kAccPerThread; ++v) acc[v] = 0.f;
    for (int it = 0; it < work.iters; ++it) {
        for (int kk = 0; kk < kRun; ++kk) {
            const int k0 = (work.kt_begin + it) * T::TK + 16 * (kgroup * kRun + kk);
            uint32_t rows[2] = {0u, 0u};
            if (row_live) {
                rows[0] = *reinterpret_cast<const uint32_t *>(a_row + k0);
                rows[1] = *reinterpret_cast<const uint32_t *>(a_row + k0 + 8);
            }
            const int4 q = b_col[(long long)(k0 / 16) * (p.N / 2)];
            const uint32_t words[4] = {(uint32_t)q.x, (uint32_t)q.y, (uint32_t)q.z, (uint32_t)q.w};
            int4 sv = make_int4(0, 0, 0, 0);
            if (kGrouped) sv = *reinterpret_cast<const int4 *>(s_col + (long long)(k0 >> p.group_shift) * p.N);
            const half *sh = reinterpret_cast<const half *>(&sv);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                uint32_t x[4];
                nibbles_plus64(words[j], x);
#pragma unroll
                for (int t = 0; t < 4; ++t) x[t] = as_u32(__hadd2(as_half2(x[t]), as_half2(0xd480d480u)));   // v - 8
                const uint32_t w[4] = {x[0], x[2], x[1], x[3]};
                float d[4];
                mma_m16n8k16_fresh(w, rows, d);
#pragma unroll
                for (int v = 0; v < 4; ++v)
                    acc[j * 4 + v] = kGrouped ? fmaf(__half2float(sh[2 * j + v / 2]), d[v], acc[j * 4 + v])
                                              : acc[j * 4 + v] + d[v];
            }
        }
    }
}

template <int MB, int TK_BLOCKS, int TN_BLOCKS, bool GROUPED, int SWAP8>
__device__ __forceinline__ void mm_tile(const MmParams &p, const BlockWork &work, int4 *smem) {
    using T = Tile<MB, TK_BLOCKS, TN_BLOCKS, GROUPED, SWAP8>;
    constexpr int TK = T::TK, TN = T::TN, kStages = T::kStages, kAcc = T::kAccPerThread;
    constexpr int kRun = T::kKTilesPerWarp;   // k-tiles a warp computes per stage
    static_assert(!SWAP8 || kRun % 2 == 0, "the swapped kernel loads A two k-tiles at a time");
    int4 *const a_sh = smem;
    int4 *const b_sh = a_sh + kStages * T::kAStageVecs;
    int4 *const s_sh = b_sh + kStages * T::kBStageVecs;
    const int n0 = work.n0, kt_begin = work.kt_begin, iters = work.iters;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int chunk = warp % T::kChunks;      // this warp's 64 columns of the tile
    const int kgroup = warp / T::kChunks;     // and its share of each stage's k-tiles
    const bool chunk_live = n0 + 64 * chunk < p.N;   // the last tile may be narrower than TN

    // ---- stage 1: fetch a K tile of A, B and scales into shared memory (asynchronous) ------
    const StageCopy<T, GROUPED> copy(p, work, tid);
    auto fetch_acts = [&](int stage, int kt) { copy.acts(a_sh + stage * T::kAStageVecs, kt); };
    auto fetch_weights = [&](int stage, int kt) {
        copy.weights(b_sh + stage * T::kBStageVecs, s_sh + stage * T::kSStageVecs, kt);
    };

    // acc[(mb * 8 + j) * 4 + v]: m-tile mb, n8 tile j, mma register v; swapped:
    // acc[j * 4 + v]: n16 tile j (columns 16j + g, 16j + 8 + g), register v.
    float acc[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;
    // Swapped, grouped: the current run's sums (64 + v weights) and its -72 x sum-of-A terms.
    // Channelwise, the run is the whole K range: the sums go straight into acc.
    // The run sums round at the size of 72 |a|, not of the result (corr[v] is -72 times the sum
    // of A row 2i + v%2 so far; registers 2 and 3 repeat 0 and 1), so `err2` adds up the squares
    // of the lane's live rows' bias terms and of 72 x the largest |a| of its row g (amax) -- per
    // run, times a scale of the lane's columns squared (grouped), or per stage, of the running
    // sum (channelwise): the rounding error's variance up to a constant (see the check after
    // the pipeline). Not finite when those rows of A held inf (NaN shows in the results).
    // (Rows past M are never loaded: their shared memory holds anything.)
    constexpr int kRunAcc = SWAP8 && GROUPED ? kAcc : 1;
    float run[kRunAcc];
    float corr[4] = {0.f, 0.f, 0.f, 0.f};
    float err2 = 0.f;
    const int rows_live = min(T::kRows, p.M - work.m0);
    const bool bias_live[2] = {2 * (lane % 4) < rows_live, 2 * (lane % 4) + 1 < rows_live};
    auto live_corr2 = [&] {
        const float c0 = bias_live[0] ? corr[0] : 0.f, c1 = bias_live[1] ? corr[1] : 0.f;
        return fmaf(c0, c0, c1 * c1);
    };
    // The largest |a| of the run so far among the lane's k rows of A row g (the B fragment's
    // column): a sum of A cancels where large values of both signs share a run, a largest |a|
    // does not (two instructions a k-tile). amax_term: (72 x it)^2 x 8 -- each row's plain sum
    // counts from 8 lanes, its largest |a| from one -- then the next run starts at 0.
    const bool row_live = lane / 4 < rows_live;
    __half2 amax = __float2half2_rn(0.f);
    auto amax_term = [&] {
        const float m = row_live ? fmaxf(__low2float(amax), __high2float(amax)) * 203.6f : 0.f;
        amax = __float2half2_rn(0.f);
        return m * m;
    };

    // ---- stage 2: shared -> registers -> tensor cores for one pipeline stage ---------------
    // Fragments are double-buffered in registers: the loads of k-tile kk+1 are issued before
    // the mma of k-tile kk, so shared-memory latency hides behind tensor-core work (the asm
    // statements are volatile, so the compiler keeps them in this order).
    // A warp's k-tiles of a stage: interleaved (kgroup, kgroup + kKGroups, ...); swapped, a
    // contiguous run (kgroup * kRun, ...), which lies inside one group.
    struct Frags {
        uint32_t a[MB][4];
        int4 q;       // lane t's 16 bytes: words 4t..4t+3 of the chunk, one per n-tile
        int4 s;       // grouped scales of the lane's 8 n8 columns
    };
    auto kt16_of = [&](int kk) { return SWAP8 ? kgroup * kRun + kk : kgroup + T::kKGroups * kk; };
    auto load_frags = [&](Frags &f, int stage, int kt, int kk) {
        const int kt16 = kt16_of(kk);   // 16-row k-tile inside the stage
        const int4 *a_src = a_sh + stage * T::kAStageVecs;
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
            // ldmatrix.x4 lane l addresses row l%16 and k-half l/16 of the 16x16 A tile,
            // which yields exactly the a0..a3 registers of mma.m16n8k16.
            const int r = 16 * mb + (lane % 16);
            const int v = 2 * kt16 + lane / 16;
            ldmatrix_x4(f.a[mb], a_src + r * T::kARowVecs + (v ^ (r & 7)));
        }
        f.q = b_sh[stage * T::kBStageVecs + (kt16 * T::kChunks + chunk) * 32 + lane];
        if constexpr (GROUPED) {
            const int k = kt * TK + 16 * kt16;
            const int g_row = (k >> p.group_shift) - ((kt * TK) >> p.group_shift);
            // Grouped permuted scales: within 64 columns, permuted 8c..8c+7 hold columns
            // c, c+8, ..., c+56 -- the eight n8 columns lane 4c.. needs, in one vector.
            f.s = s_sh[stage * T::kSStageVecs + g_row * (TN / 8) + chunk * 8 + lane / 4];
        }
    };
    auto mma_frags = [&](const Frags &f) {
        const uint32_t words[4] = {(uint32_t)f.q.x, (uint32_t)f.q.y, (uint32_t)f.q.z, (uint32_t)f.q.w};
        const half *sh = reinterpret_cast<const half *>(&f.s);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            uint32_t b_lo[2], b_hi[2];       // n8 columns 16j + c and 16j + 8 + c
            dequant_u4b8(words[j], b_lo);
            dequant_u4b8(words[j] >> 8, b_hi);
            if constexpr (GROUPED) {
                const half2 s_lo = __half2half2(sh[2 * j]), s_hi = __half2half2(sh[2 * j + 1]);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    b_lo[h] = as_u32(__hmul2(as_half2(b_lo[h]), s_lo));
                    b_hi[h] = as_u32(__hmul2(as_half2(b_hi[h]), s_hi));
                }
            }
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) {
                mma_m16n8k16(f.a[mb], b_lo, *reinterpret_cast<float(*)[4]>(&acc[(mb * 8 + 2 * j) * 4]));
                mma_m16n8k16(f.a[mb], b_hi, *reinterpret_cast<float(*)[4]>(&acc[(mb * 8 + 2 * j + 1) * 4]));
            }
        }
    };
    // Swapped: one k-tile into the run (fresh: the run starts here, at zero). `rows`: the B
    // operand, rows 0..7 of A: b0 = k 2i.., b1 = k 2i+8...
    auto mma_swapped = [&](const int4 &q, const uint32_t (&rows)[2], bool fresh) {
        const uint32_t words[4] = {(uint32_t)q.x, (uint32_t)q.y, (uint32_t)q.z, (uint32_t)q.w};
        float *sums = GROUPED ? run : acc;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            uint32_t x[4];
            nibbles_plus64(words[j], x);
            // A fragment: rows g, g+8 = columns 16j + c, 16j + 8 + c; k 2i.. then 2i+8..
            const uint32_t w[4] = {x[0], x[2], x[1], x[3]};
            float(&d)[4] = *reinterpret_cast<float(*)[4]>(&sums[j * 4]);
            if (GROUPED && fresh) mma_m16n8k16_fresh(w, rows, d);
            else mma_m16n8k16(w, rows, d);
        }
        constexpr uint32_t kMinus72 = 0xd480d480u;   // fp16 -72 in both halves: -(64 + 8)
        const uint32_t bias[4] = {kMinus72, kMinus72, kMinus72, kMinus72};
        if (GROUPED && fresh) mma_m16n8k16_fresh(bias, rows, corr);
        else mma_m16n8k16(bias, rows, corr);
    };
    // Swapped, grouped: acc += the stage's run x its group's scales (FP32).
    auto close_run = [&](int stage, int kt) {
        const int k = kt * TK + 16 * kt16_of(0);
        const int g_row = (k >> p.group_shift) - ((kt * TK) >> p.group_shift);
        const int4 sv = s_sh[stage * T::kSStageVecs + g_row * (TN / 8) + chunk * 8 + lane / 4];
        const half *sh = reinterpret_cast<const half *>(&sv);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float s_lo = __half2float(sh[2 * j]), s_hi = __half2float(sh[2 * j + 1]);
#pragma unroll
            for (int v = 0; v < 4; ++v)
                acc[j * 4 + v] = fmaf(v < 2 ? s_lo : s_hi, run[j * 4 + v] + corr[v], acc[j * 4 + v]);
        }
        const float s0 = __half2float(sh[0]);   // column g's scale stands for the lane's eight
        err2 = fmaf(live_corr2() + amax_term(), s0 * s0, err2);
    };
    auto compute_stage = [&](int stage, int kt) {
        if (!chunk_live) return;   // warp-uniform
        if constexpr (SWAP8) {
            // Rows 0..7 of A for the whole run, two k-tiles per ldmatrix.x4: lane l addresses
            // row l%8 of matrix l/8 = (k-tile l/16, k-half (l/8)%2), so registers 0, 1 are the
            // first k-tile's b0, b1 and registers 2, 3 the second's.
            const int4 *a_src = a_sh + stage * T::kAStageVecs;
            uint32_t rows[kRun][2];
#pragma unroll
            for (int pr = 0; pr < kRun / 2; ++pr) {
                const int r = lane % 8;
                const int v = 2 * kt16_of(2 * pr) + lane / 8;
                ldmatrix_x4(*reinterpret_cast<uint32_t(*)[4]>(&rows[2 * pr][0]),
                            a_src + r * T::kARowVecs + (v ^ (r & 7)));
            }
            const int4 *b_src = b_sh + stage * T::kBStageVecs + chunk * 32 + lane;
            int4 q[2];
            q[0] = b_src[kt16_of(0) * T::kChunks * 32];
#pragma unroll
            for (int kk = 0; kk < kRun; ++kk) {
                if (kk + 1 < kRun) q[(kk + 1) & 1] = b_src[kt16_of(kk + 1) * T::kChunks * 32];
                mma_swapped(q[kk & 1], rows[kk], kk == 0);
                amax = __hmax2(amax, __habs2(as_half2(rows[kk][0])));
                amax = __hmax2(amax, __habs2(as_half2(rows[kk][1])));
            }
            if constexpr (GROUPED) close_run(stage, kt);
            else err2 += live_corr2() + amax_term();
        } else {
            Frags f[2];
            load_frags(f[0], stage, kt, 0);
#pragma unroll
            for (int kk = 0; kk < kRun; ++kk) {
                if (kk + 1 < kRun) load_frags(f[(kk + 1) & 1], stage, kt, kk + 1);
                mma_frags(f[kk & 1]);
            }
        }
    };

    // ---- the pipeline: kStages-1 stages in flight while one is computed (mm_common.cuh) ----
    run_pipeline<kStages, kStages - 1, false>(iters, kt_begin, p.weights_early, fetch_acts, fetch_weights, compute_stage,
                                              [] {});
    cp_async_wait<0>();
    __syncthreads();
    if constexpr (SWAP8) {
        if constexpr (!GROUPED) {   // channelwise: one run over the K range
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int v = 0; v < 4; ++v) acc[j * 4 + v] += corr[v];
        }
        // The warp recomputes its share exactly (swapped_exact) where A held inf or NaN, or
        // where the run sums' rounding (err2) is large against the result (the sum of the live
        // acc squared): an activation far above the rest of its run on weights that give little,
        // e.g. 6e4 among N(0, 1) values on zero weights, of one sign or of both (the runs' sums
        // of A see values of one sign adding up, their largest |a| values of both signs that
        // cancel in the sums). Calibrated on the H200 (csrc/NOTES.md):
        // the extra relative error is about 5e-8 x sqrt(8 x err2 / mag2) over a warp, so the
        // bound below takes the exact path from about 1e-4; N(0, 1) activations gave a ratio
        // near 30 with the sums alone (the bound is 5e5; their largest |a| adds an estimated third),
        // LLM-sized outliers (2000) on zero weights near it.
        float mag2 = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int v = 0; v < 4; ++v)
                if (bias_live[v & 1]) mag2 = fmaf(acc[j * 4 + v], acc[j * 4 + v], mag2);
        float e = err2;
#pragma unroll
        for (int off = 16; off >= 1; off /= 2) {
            e += __shfl_xor_sync(0xffffffffu, e, off);
            mag2 += __shfl_xor_sync(0xffffffffu, mag2, off);
        }
        constexpr float kExactFrom = 2e-6f;   // err2 > 5e5 x mag2 (see above)
        if (!(e * kExactFrom <= mag2))         // also where either is NaN or inf
            swapped_exact<T>(p, work, chunk, kgroup, acc);
    }

    // ---- stage 3: block reduce -- the k-groups fold in halves through shared memory --------
    // (groups [h, 2h) add into [0, h) for h = kKGroups/2, ..., 1: log2 rounds, a fixed order)
    float *red = reinterpret_cast<float *>(smem);
#pragma unroll
    for (int h = T::kKGroups / 2; h >= 1; h /= 2) {
        if (kgroup >= h && kgroup < 2 * h) {
            float *slot = red + (kgroup - h) * T::kRedFloats;
#pragma unroll
            for (int i = 0; i < kAcc; ++i) slot[i * (T::kChunks * 32) + chunk * 32 + lane] = acc[i];
        }
        __syncthreads();
        if (kgroup < h) {
            const float *slot = red + kgroup * T::kRedFloats;
#pragma unroll
            for (int i = 0; i < kAcc; ++i) acc[i] += slot[i * (T::kChunks * 32) + chunk * 32 + lane];
        }
        __syncthreads();
    }

    // The block's partial C tile, FP32, in shared memory (row-major, padded rows).
    float *ctile = reinterpret_cast<float *>(smem);
    if (kgroup == 0) {
        if constexpr (SWAP8) {   // register v: row 2i + v%2, column 16j + g + 8(v/2)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int v = 0; v < 4; ++v) {
                    const int row = 2 * (lane % 4) + (v & 1);
                    const int col = 64 * chunk + 16 * j + lane / 4 + 8 * (v >> 1);
                    ctile[row * T::kCStride + col] = acc[j * 4 + v];
                }
        } else {
#pragma unroll
            for (int mb = 0; mb < MB; ++mb)
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int row = 16 * mb + lane / 4 + 8 * h;
                        const int col = 64 * chunk + 8 * j + 2 * (lane % 4);
                        *reinterpret_cast<float2 *>(&ctile[row * T::kCStride + col]) =
                            make_float2(acc[(mb * 8 + j) * 4 + 2 * h], acc[(mb * 8 + j) * 4 + 2 * h + 1]);
                    }
        }
    }
    __syncthreads();

    // ---- stage 4: write C, through the ordered global reduce when K is split ---------------
    write_c_tile<16 * MB, TN, T::kCStride, T::kThreads, GROUPED>(p, work, ctile);
}

// The kernel: one tile's K range per block (split-K), or with stream-K (SK, p.sk_iters) a run
// of iterations that may cover the end of one tile and the start of the next: one mm_tile each.
// (SK is its own instance: the loop around the body costs the split-K kernel ~15 registers.)
template <int MB, int TK_BLOCKS, int TN_BLOCKS, bool GROUPED, int SWAP8, bool SK>
__global__ void __launch_bounds__(256, (MB <= 2 ? 2 : 1))
    marlin_mm_kernel(const MmParams p) {
    extern __shared__ int4 smem[];
    constexpr int kRows = 16 * MB, TN = 16 * TN_BLOCKS;
    if constexpr (!SK) {
        mm_tile<MB, TK_BLOCKS, TN_BLOCKS, GROUPED, SWAP8>(p, block_work(p, kRows, TN), smem);
    } else {
        long long it = (long long)blockIdx.x * p.sk_iters;
        const long long end = min(it + p.sk_iters, (long long)p.m_slices * p.n_tiles_total * p.k_tiles);
        while (it < end) {
            const BlockWork work = stream_k_work(p, kRows, TN, it, end);
            mm_tile<MB, TK_BLOCKS, TN_BLOCKS, GROUPED, SWAP8>(p, work, smem);
            it += work.iters;
            if (it < end) __syncthreads();   // the next segment's copies overwrite what this one read
        }
    }
}

// ---- host side: one entry per kernel instance ----------------------------------------------

template <int MB, int TK_BLOCKS, int TN_BLOCKS, bool GROUPED, int SWAP8 = 0, bool SK = false>
struct Instance {
    using T = Tile<MB, TK_BLOCKS, TN_BLOCKS, GROUPED, SWAP8>;
    static int launch(const MmParams &p, int grid, cudaStream_t stream, bool pdl, int smem_bytes) {
        return launch_mm<T::kThreads, T::kSmemBytes>(
            marlin_mm_kernel<MB, TK_BLOCKS, TN_BLOCKS, GROUPED, SWAP8, SK>, p, grid, stream, pdl, smem_bytes);
    }
    static KernelEntry entry() {
        return {reinterpret_cast<const void *>(&marlin_mm_kernel<MB, TK_BLOCKS, TN_BLOCKS, GROUPED, SWAP8, SK>),
                T::kSmemBytes, &launch};
    }
};

// tile 1: k=128 x n=128 (few rows: more blocks over N);
// tiles 4, 5, 6: the wgmma kernel (mm_wgmma.cu), k=64 / k=128 / k=128 x n=256, 64 or 128 rows
// (m_blocks 4 or 8; tile 6: 64 rows, two blocks per SM);
// tile 2: k=128 x n=256 (more rows: each A fragment feeds more columns, 4 k-tiles per warp
//         between barriers); tile 3: k=64 x n=256 (half the shared memory of tile 2);
// tile 7: k=256 x n=64 (one 64-column chunk, the 8 warps split K: four times the column tiles
//         of tile 2, so fewer splits and smaller partials for the same grid);
// tile 8: the wgmma kernel with k=128 x n=128, its two warpgroups splitting K (tile 7's idea
//         for wgmma; 16, 32 or 64 rows);
// tile 9: the same with k=256 x n=64 (one chunk; 16 or 32 rows; K % 256 == 0): at few rows a
//         grid fills the GPU with half tile 8's splits, each partial half as wide.
constexpr int kTiles = 9;
static bool is_wgmma_tile(int tile) { return (tile >= 4 && tile <= 6) || tile == 8 || tile == 9; }

template <int TK_BLOCKS, int TN_BLOCKS, bool GROUPED>
static KernelEntry entry_for_mb(int mb, int swap8, bool sk) {
    if (sk) return swap8 ? Instance<1, TK_BLOCKS, TN_BLOCKS, GROUPED, 1, true>::entry()
                         : Instance<1, TK_BLOCKS, TN_BLOCKS, GROUPED, 0, true>::entry();
    if (swap8) return Instance<1, TK_BLOCKS, TN_BLOCKS, GROUPED, 1>::entry();
    switch (mb) {
        case 1: return Instance<1, TK_BLOCKS, TN_BLOCKS, GROUPED>::entry();
        case 2: return Instance<2, TK_BLOCKS, TN_BLOCKS, GROUPED>::entry();
        case 3: return Instance<3, TK_BLOCKS, TN_BLOCKS, GROUPED>::entry();
        default: return Instance<4, TK_BLOCKS, TN_BLOCKS, GROUPED>::entry();
    }
}

// swap8: the swapped kernel (mma.sync tiles, m_blocks 1) for blocks of up to 8 rows; sk: the
// stream-K instance (mma.sync tiles, m_blocks 1).
// f32s_fold: the wgmma kernel's FP32-scales instances (16- and 32-row blocks; 8: groups of 128
// rows, 4: of 64).
static KernelEntry select_kernel(int tile, int mb, bool grouped, int swap8 = 0, bool sk = false,
                                 int f32s_fold = 0) {
    if (is_wgmma_tile(tile)) return wgmma_entry(tile, mb, grouped, f32s_fold, sk);
    if (tile == 7) return grouped ? entry_for_mb<16, 4, true>(mb, swap8, sk) : entry_for_mb<16, 4, false>(mb, swap8, sk);
    if (tile == 1) return grouped ? entry_for_mb<8, 8, true>(mb, swap8, sk) : entry_for_mb<8, 8, false>(mb, swap8, sk);
    if (tile == 2) return grouped ? entry_for_mb<8, 16, true>(mb, swap8, sk) : entry_for_mb<8, 16, false>(mb, swap8, sk);
    return grouped ? entry_for_mb<4, 16, true>(mb, swap8, sk) : entry_for_mb<4, 16, false>(mb, swap8, sk);
}

// FERRUM_NO_F32S=1 keeps 16- and 32-row wgmma blocks on fp16 scales (for comparisons).
static const bool g_f32s_enabled = [] {
    const char *v = getenv("FERRUM_NO_F32S");
    return !(v && v[0] && v[0] != '0');
}();

// FERRUM_NO_TILE9=1 leaves tile 9 (k=256 x n=64) out of the planner's choices (for comparisons).
static const bool g_tile9_enabled = [] {
    const char *v = getenv("FERRUM_NO_TILE9");
    return !(v && v[0] && v[0] != '0');
}();

// FERRUM_NO_SWAP=1 keeps one-slice launches on the fp16 dequantize-and-scale path (for
// comparisons).
static const bool g_swap_enabled = [] {
    const char *v = getenv("FERRUM_NO_SWAP");
    return !(v && v[0] && v[0] != '0');
}();

// Whether a launch of `rows` rows with (tile, m_blocks) takes the swapped kernel: up to 8 rows
// (one 8-row block). H200, same-machine A/B (tools/ab.py, FERRUM_NO_SWAP=1), µs at M = 1 / 8:
// 70B gate_up 91.3 -> 82.0 / 93.3 -> 85.9, 70B down 44.5 -> 40.4 / 46.6 -> 42.5, 8B o 8.2 -> 7.7 /
// 8.5 -> 8.4. Two 8-row blocks (M = 9..16) lost 10-16% (70B gate_up M=16 98.3 -> 112.3): the
// second block's run sums take the kernel to the 128-register cap of two blocks per SM.
// A swapped warp's run of k-tiles must lie inside one group of scales: the K rows of a run
// (tile 2: 64; tiles 1, 3 and 7: 32) are the smallest group the swapped kernel takes.
static int swap_min_group(int tile) {
    switch (tile) {
        case 1: return 16 * Tile<1, 8, 8, true, 1>::kKTilesPerWarp;
        case 2: return 16 * Tile<1, 8, 16, true, 1>::kKTilesPerWarp;
        case 7: return 16 * Tile<1, 16, 4, true, 1>::kKTilesPerWarp;
        default: return 16 * Tile<1, 4, 16, true, 1>::kKTilesPerWarp;
    }
}

// Whether a wgmma launch takes an FP32-scales instance, and which: 16- and 32-row blocks of
// the k=128 tiles, with groups of 128 or 64 rows (a fold every 8 or 4 k16 steps; 0: none).
// (Groups of 32 would fold every other step: four FFMA a word, as many as the fp16 multiplies.)
static int wgmma_f32s_fold(int tile, int mb, bool grouped, int group_size) {
    if (!g_f32s_enabled || !is_wgmma_tile(tile) || tile == 4 || mb > 2 || !grouped) return 0;
    return group_size == 128 ? 8 : group_size == 64 ? 4 : 0;
}

static int swap8_for(int tile, int mb, int rows, bool grouped, int group_size) {
    return g_swap_enabled && !is_wgmma_tile(tile) && mb == 1 && rows <= 8 &&
           (!grouped || group_size >= swap_min_group(tile)) ? 1 : 0;
}

static int tile_k(int tile) { return tile == 3 || tile == 4 ? 64 : tile == 7 || tile == 9 ? 256 : 128; }   // 1, 2, 5, 6, 8: 128
static int tile_n(int tile) {
    return tile == 1 ? 128 : tile == 7 ? 64 : tile == 8 ? kWgmmaSplitTileN : tile == 9 ? kWgmmaNarrowTileN
                     : tile >= 4 ? kWgmmaTileN : 256;
}

// Per device and kernel instance: the dynamic shared memory limit is raised once, and the
// number of blocks an SM holds is measured once (the heuristic needs it).
constexpr int kMaxDevices = 64;
static std::atomic<int> g_occupancy[kMaxDevices][kTiles][8][2];   // 0 = not yet known

// A spread launch (ferrum_mm) asks for the most dynamic shared memory a block may have (less
// the kernels' static 16 bytes and a margin), so that no SM holds two of its blocks. A kernel's
// limit is raised to that on its first spread launch on a device, not before: the limit stays
// what the kernel needs wherever it is never spread.
static int spread_smem(const DeviceProps &dev) { return dev.max_smem_optin - 1024; }
static std::mutex g_spread_mutex;
static std::vector<std::pair<int, const void *>> g_spread_ready;   // (device, kernel)
static int allow_spread(const DeviceProps &dev, const KernelEntry &k) {
    std::lock_guard<std::mutex> guard(g_spread_mutex);
    for (const auto &e : g_spread_ready)
        if (e.first == dev.device && e.second == k.fn) return FERRUM_OK;
    FERRUM_CUDA_CHECK(cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, spread_smem(dev)));
    g_spread_ready.emplace_back(dev.device, k.fn);
    return FERRUM_OK;
}

// The occupancy caches (g_occupancy, g_occupancy_sk): a slot (null for a device past
// kMaxDevices) holds a kernel's blocks an SM once measured, 0 before.
static bool occupancy_known(const std::atomic<int> *slot, int *blocks_per_sm) {
    const int known = slot ? slot->load(std::memory_order_relaxed) : 0;
    if (known > 0) *blocks_per_sm = known;
    return known > 0;
}
static int measure_occupancy(std::atomic<int> *slot, const KernelEntry &k, int *blocks_per_sm) {
    int occ = 0;
    FERRUM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, k.fn, 256, k.smem_bytes));   // both kernels: 256 threads
    if (occ < 1) occ = 1;
    if (slot) slot->store(occ, std::memory_order_relaxed);
    *blocks_per_sm = occ;
    return FERRUM_OK;
}

static int prepare_kernel(const DeviceProps &dev, int tile, int mb, bool grouped, int *blocks_per_sm) {
    std::atomic<int> *const slot = dev.device >= 0 && dev.device < kMaxDevices
                                       ? &g_occupancy[dev.device][tile - 1][mb - 1][grouped ? 1 : 0]
                                       : nullptr;
    if (occupancy_known(slot, blocks_per_sm)) return FERRUM_OK;
    const KernelEntry k = select_kernel(tile, mb, grouped);
    FERRUM_REQUIRE(k.smem_bytes <= dev.max_smem_optin,
                   "ferrum_mm: the tile needs %d bytes of shared memory, the device allows %d",
                   k.smem_bytes, dev.max_smem_optin);
    FERRUM_CUDA_CHECK(cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           k.smem_bytes));
    if (is_wgmma_tile(tile) && tile != 4) {   // the stream-K and FP32-scales instances too
        for (const int fold : {0, 4, 8}) {
            if (fold && !(grouped && mb <= 2)) continue;
            for (const bool sk : {false, true}) {
                if (!fold && !sk) continue;
                const KernelEntry kv = select_kernel(tile, mb, grouped, 0, sk, fold);
                FERRUM_CUDA_CHECK(cudaFuncSetAttribute(kv.fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                       kv.smem_bytes));
            }
        }
    }
    if (!is_wgmma_tile(tile) && mb == 1) {   // the swapped and stream-K kernels launch in its place
        for (int variant = 1; variant < 4; ++variant) {
            const KernelEntry kv = select_kernel(tile, mb, grouped, variant & 1, variant & 2);
            FERRUM_REQUIRE(kv.smem_bytes <= dev.max_smem_optin,
                           "ferrum_mm: the tile needs %d bytes of shared memory, the device allows %d",
                           kv.smem_bytes, dev.max_smem_optin);
            FERRUM_CUDA_CHECK(cudaFuncSetAttribute(kv.fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   kv.smem_bytes));
        }
    }
    return measure_occupancy(slot, k, blocks_per_sm);
}

// FERRUM_NO_SPREAD=1: grids of at most one block an SM launch as they are (see ferrum_mm).
static const bool g_spread_enabled = [] {
    const char *v = getenv("FERRUM_NO_SPREAD");
    return !(v && v[0] && v[0] != '0');
}();

// Blocks an SM of a wgmma tile's stream-K instance (with the F32S fold its launches take):
// the loop over segments holds more registers than the split-K instance (tile 8's 16-row
// blocks: 150 against 109, one block an SM instead of two).
static std::atomic<int> g_occupancy_sk[kMaxDevices][kTiles][8][2][3];   // 0 = not yet known
static int sk_occupancy(const DeviceProps &dev, int tile, int mb, bool grouped, int fold, int *blocks_per_sm) {
    std::atomic<int> *const slot = dev.device >= 0 && dev.device < kMaxDevices
                                       ? &g_occupancy_sk[dev.device][tile - 1][mb - 1][grouped ? 1 : 0][fold / 4]
                                       : nullptr;
    if (occupancy_known(slot, blocks_per_sm)) return FERRUM_OK;
    return measure_occupancy(slot, select_kernel(tile, mb, grouped, 0, true, fold), blocks_per_sm);
}

// FERRUM_NO_CLUSTER=1 keeps split-K on the workspace reduction (for comparisons).
static const bool g_clusters_enabled = [] {
    const char *v = getenv("FERRUM_NO_CLUSTER");
    return !(v && v[0] && v[0] != '0');
}();

// How many blocks of a kernel run at once when its grid is made of clusters of `size` blocks
// (clusters must fit a GPC, so this can be less than SMs x blocks per SM). 0: none fit.
static std::atomic<int> g_cluster_slots[kMaxDevices][kTiles][8][2][kMaxClusterSplits + 1];   // slots + 1; 0 = unknown

static int cluster_slots(const DeviceProps &dev, int tile, int mb, bool grouped, int size, int *slots) {
    std::atomic<int> *slot = nullptr;
    if (dev.device >= 0 && dev.device < kMaxDevices) {
        slot = &g_cluster_slots[dev.device][tile - 1][mb - 1][grouped ? 1 : 0][size];
        const int known = slot->load(std::memory_order_relaxed);
        if (known > 0) {   // stored as slots + 1
            *slots = known - 1;
            return FERRUM_OK;
        }
    }
    const KernelEntry k = select_kernel(tile, mb, grouped);
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(size * dev.sm_count);
    config.blockDim = dim3(256);
    config.dynamicSmemBytes = k.smem_bytes;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = size;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    int clusters = 0;
    const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, k.fn, &config);
    if (err != cudaSuccess) {   // e.g. clusters unsupported: treat as no cluster fits
        cudaGetLastError();
        clusters = 0;
    }
    *slots = clusters * size;
    if (slot) slot->store(*slots + 1, std::memory_order_relaxed);
    return FERRUM_OK;
}

// Split-K as clusters: for the wgmma kernel (many rows, where the partials are large) on
// sm_90. Measured on an H100 (FERRUM_NO_CLUSTER A/B): 8B o M=256 34.3 -> 25.9 us, 70B o M=256
// 84.6 -> 74.8; but the mma.sync kernel at M <= 16 lost, twice (70B down M=16 56 -> 75 us;
// later 8B o M=1 tile 7 with 4 splits 8.8 -> 12.4, 70B down M=16 52.5 -> 73.8 at best): its
// partials are a few rows, and a cluster waits for its slowest block.
// Not for 16-row wgmma blocks either: at M = 16 (H200, session 16, tools/tune.py-style sweep of
// tiles 5/6 x 1-12 splits with and without clusters) the best plan without clusters beat the
// best with them on 5 of 8 layers by 3-10% (70B down 39.2 against 43.6 µs) and lost on 8B
// gate_up only by 8% (24.7 against 22.8).
static bool cluster_eligible(const DeviceProps &dev, int tile, int mb) {
    return g_clusters_enabled && dev.major >= 9 && is_wgmma_tile(tile) && mb > 1;
}

static size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Rows handled by one launch: bounds the act-order copy of A and the partial sums.
constexpr int kMaxRowsPerLaunch = 8192;
// Partial sums above this many bytes are not worth it: fall back to fewer splits.
constexpr size_t kMaxPartialBytes = size_t(256) << 20;

// The wgmma kernel runs where its sm_90a build runs: compute capability 9.0 exactly.
static bool wgmma_available(const DeviceProps &dev) {
    return wgmma_built() && dev.major == 9 && dev.minor == 0;
}

// Rows from which the wgmma kernel (where available) runs; below it the mma.sync kernel's
// smaller tiles and the swapped kernel's fewer instructions a weight win or tie. H200,
// tools/tune.py over tiles 5/6 with 16-, 32- and 64-row blocks and 1-12 splits (session 14): at
// M = 24 and 32 the best 32-row wgmma plan beat the planner's mma.sync plan on 15 of 16 layer
// cells, by up to 24% (70B gate_up M=32 105 against 137 µs, 70B down M=24 55 against 69;
// 4096x4096 M=24 12.3 against 11.9 the exception). At M = 16 the best 16-row plan won on 4 of 8
// by 2-9% and lost on 4 by 2-13% (session 14); with the scales applied in FP32 per group
// (mm_wgmma.cu, F32S: groups of 64 and 128 rows) it beat the planner's mma.sync plan on all 8 at
// G = 128, by 2-26% (session 16: 70B down 39.2 against 49.2 µs, 8B gate_up 22.8 against 30.2,
// 8B o 9.3 against 9.6), so the wgmma kernel takes 9..16 rows as well, in 16-row blocks.
// With 128-row groups it takes 2..8 rows too (16-row F32S blocks, most rows idle): they cost
// about what they cost at 16 rows, while the swapped kernel's time grows with the rows. Session
// 16's A/B (the planner's plans, H200): at each M = 2-8 faster on 7 or 8 of the eight layers, by
// up to 18% (8192x10240 M=8 21.2 -> 17.4 µs, 28672x8192 M=2 42.6 -> 36.6); slower on 8192x8192
// at M = 2-3 (6-8%) and 4096x4096 at M = 8 (9%). One row stays on the swapped kernel (5 of 8
// faster, but 8192x8192 7.6% and 14336x4096 5% slower). Channelwise and with 64-row groups the
// 16-row blocks were mixed at 2-8 rows (13 and 12 of 24 cells faster), so those started at 9.
// Session 21, after tile 8, spread launches, stream-K and the split-model refits had made the
// wgmma plans faster (same-machine A/B of the planner's plans with FERRUM_WGMMA_MIN_ROWS=1, H200,
// the eight bench layers, best of two rounds): one row on the wgmma kernel took 0.88-0.95 of the
// swapped kernel's time on 7 of 8 layers with 128-row groups (8192x8192 14.95 -> 13.57 µs,
// 8192x10240 17.58 -> 16.38, 4096x6144 9.22 -> 8.10), 14336x4096 the exception (14.40 ->
// 14.93); with 64-row groups at 1, 4 and 8 rows geometric means 0.953, 0.900, 0.900
// (14336x4096 M=1 +3.3% the one loss); channelwise 0.945, 0.923, 0.914 (4096x4096 M=1 +3.4%
// and M=4 +0.5% the losses). So the wgmma kernel takes every row count from one, except with
// groups of 32 rows (fp16 scales; from kWgmma16Rows + 1) and grouped without F32S
// (FERRUM_NO_F32S=1: fp16 scales, from 9 as before).
constexpr int kWgmmaMinRows = 1;
constexpr int kWgmmaMinRowsFp16Scales = 9;
// FERRUM_WGMMA_MIN_ROWS=n (1..17) replaces both, for groups of 64 or 128 rows and channelwise
// scales (for tuning; groups of 32 rows keep kWgmma16Rows + 1).
static const int g_wgmma_min_rows_env = [] {
    const char *v = getenv("FERRUM_WGMMA_MIN_ROWS");
    const int n = v && v[0] ? atoi(v) : 0;
    return n >= 1 && n <= 17 ? n : 0;
}();
// Up to this many rows the wgmma candidates are 16-row blocks (m_blocks 1; wgmma n16), then
// 32-row blocks (m_blocks 2; wgmma n32) up to kWgmmaFewRows.
constexpr int kWgmma16Rows = 16;
constexpr int kWgmmaFewRows = 32;
// Tile 9's 32-row blocks stay candidates up to this many rows, in row slices (session 29: on
// layers of a few thousand columns they beat every 64-row plan, 1024x4096 at M = 64 4.3 µs
// against 6.9 for the best 64-row one; up to 64 rows in session 29, where an A/B of 3-4 slices
// lost 12-27% on 3072x3072 with 32-row groups; session 30, with kFp16ScalesKtile pricing those
// groups, took it to 128 rows: the planner's plans at 65-128 rows on 24 shapes, same-machine
// A/B against 64, 0.82 of the time at G = 128 on the 34 cells that changed, 0.86 at G = 64,
// 0.89 channelwise, 0.88 at G = 32; what still loses is 3072x3072, tile 9 in 3-4 slices against
// tile 8's 64-row blocks with two clustered splits: +2-4% at G = 128, +7-9% at G = 64, +13-15%
// channelwise, and 2048x3072 at G = 32, +8-10%; csrc/NOTES.md session 30).
constexpr int kTile9SlicedRows = 128;

// Split-K choice for one (tile, m_blocks): the fewest waves x (k-tiles per block x cost of a
// k-tile + fixed cost + partial-sum traffic) + a reduction tail per split, over the splits that
// keep the partials small. Constants fitted to tools/tune.py runs on an H100. Returns the cost.
// Cost of the partials' exchange through distributed shared memory, as a share of the
// workspace path's (a guess to be fitted: SM-to-SM traffic, no L2 round trip).
constexpr double kClusterPartialShare = 0.25;
// The same exchange through the workspace (write, fence, counter; the last block sums) for
// 32- and 64-row wgmma blocks, as a share of the traffic estimate. Fitted on the H200 (session
// 20, csrc/tune_h200.txt: the eight layers at M = 4-256, tiles 5/6/8, split-K 1-8 with and
// without clusters and stream-K, G = 128; the planner replayed in Python): at the full estimate
// the planner took 3 clustered splits where 4 unclustered ones were 10-15% faster (14336x4096,
// M = 32-64: 128 blocks in one wave, which clusters of 4 do not fit) and tile 6 with 5
// clustered splits on 8192x10240 at M = 48-64 (7% slower than tile 5 with 3); at 0.25 the
// replayed picks are within 9% of the best measured on all 72 cells and 1.0% above it on
// average (at the full estimate: 18% and 1.9%). 16- and 128-row blocks keep the estimate
// their constants were fitted with.
constexpr double kUnclusteredPartialShare = 0.25;

// What each block of a split-K cluster adds to every wave of it, in k-tiles (the cluster's
// barriers and its blocks' reads of each other's partials through distributed shared memory;
// a cluster also waits for its slowest block), so s clustered splits cost s times this a wave.
// Fitted on the H200 (session 28: choose_splits replayed in Python over tools/tune.py sweeps of
// tiles 5, 6 and 8 at 32-, 64- and 128-row blocks with 1-8 splits, clusters as asked and
// FERRUM_NO_CLUSTER=1, and stream-K, G = 128, on the eight bench layers and 16 more shapes at
// M = 24-64 (session 27) and 80-512): without it the planner took tile 5 with 5-8 clustered
// 128-row splits on layers of small K, where tile 8 with one or two 64-row splits ran up to 1.7x
// faster (2048x3072 at M = 128: 17.1 µs against 10.2), and the replayed picks were 3.8% above the
// best timed variant on average at M = 80-512 (68% at worst) and 2.2% at M = 24-64 (14%); with
// it 1.1% (13%) and 1.3% (13%). 0.2-0.35 fit about as well; 0.4 and above lose.
constexpr double kClusterSplitCost = 0.25;

// A lone block's share of the cost of a block that shares its SM with another (choose_splits),
// with all its rows live. Fitted on the H200 (session 19; csrc/NOTES.md): tile 8's 16-row
// blocks, 4096 x 4096 at M = 16, 4 splits spread over 128 SMs took 8.5 µs against 9.6 for 8
// splits two an SM; a flat 0.9 (at any live rows) moved 2-4 rows there too, 7% slower.
constexpr double kLoneBlockShare = 0.9;

// The 16-row blocks' reduction tail (the last block's serial sum of the splits' partials) at one
// live row, as a share of its cost with all 16 rows live; linear in between. Fitted on the H200
// (session 26: choose_splits replayed in Python over session 25's tune sweeps, the eight layers
// at M = 1, 4, 8, 16, 32, tiles 6, 8, 9 with 1-16 splits and stream-K, G = 128): at 0.75 the one
// pick that changes is 14336x4096 at one row (tile 8 with 8 splits -> tile 6 with 16; 15.6 ->
// 13.5 µs as swept), the replayed picks 0.9% above the best measured on average (1.4% with a flat
// tail); at 0.7 4096x4096 at one row also moves, to a plan 4-6% slower (tile 8 with 8 splits
// instead of tile 9 with 4); at 0.5 (session 22) 4096x6144 took 11 splits at M = 1-2 (+11-13%).
constexpr double kTailOneRow = 0.75;

// What any split-K exchange of 16-row blocks costs once, however many splits (each block's
// partial stored, fenced and counted, the last block's loads waited for), in k-tiles: the
// split-K and stream-K plans pay it, one split does not. Fitted on the H200 (session 27:
// choose_splits replayed in Python over tools/tune.py sweeps of tiles 5, 6, 8 and 9 with 1-16
// splits and stream-K at M = 1, 4, 8, 16, G = 128, on the eight bench layers and 16 more
// shapes, 96 cells; with tile 8's fixed cost 2 -> 2.5 and tile 9's 3 -> 2.75 at 16 rows, see
// wgmma_split_model): the replayed picks 0.9% above the best measured variant on average, 10%
// at worst, against 3.0% and 52% before (1024x4096 at M = 1-8 took tile 6 with 4 splits, 4.2-4.9
// µs, where tile 9 with one split ran 3.2; the long-K narrow layers took tile 8 with 8-9 splits,
// 5-13% slower than tile 6 with 15-17: 11008x4096 at M = 1-8, 14336x4096 and 18944x3584 at 4-8).
// Fitted on the 16 other shapes alone it comes out the same and takes the bench layers' picks
// from 0.9% to 0.4% above the best.
constexpr double kExchange16Rows = 1.25;

// What scales in fp16, multiplied into every dequantized word, add to a k-tile of 16- and 32-row
// wgmma blocks, whose constants were fitted with 128-row groups and so on F32S (FP32 scales per
// group): these blocks with groups of 32 rows (or with F32S off). Fitted on the H200 (session 30:
// the 24 shapes at M = 24, 48, 96, 128 with G = 32, tiles 5, 6, 8, 9 with 1-8 splits, clusters as
// asked and FERRUM_NO_CLUSTER=1, and stream-K; choose_splits replayed in Python): tile 9's
// 32-row blocks run 12-19% slower at G = 32 than at G = 128 where the 64-row blocks (fp16 scales
// at every group size) do not (3072x3072 at M = 96: 15.2 against 12.8 µs, tile 8's 64-row blocks
// 12.3 at both). With 0.2 the replayed picks at G = 32 come 1.9% above the best timed variant on
// average, 2.8% without the term.
constexpr double kFp16ScalesKtile = 0.2;

struct SplitModel {
    double kt_cost;      // one k-tile of one block, relative
    double fixed;        // prologue + epilogue of a block, in k-tiles
    double tail;         // the last block's serial sum, per split
    double hysteresis;   // a larger split must win by this factor
    double exchange;     // a split-K exchange at all (kExchange16Rows for 16-row blocks, else 0)
    int min_kt;          // the k-tiles a split-K block costs at least (its pipeline's depth), or 0
    double fill;         // how much cheaper a k-tile is on an emptier GPU (0: not at all)
    double slice_share;  // a k-tile's cost in the row slices after the first, as a share (0: all)
};

static double choose_splits(const DeviceProps &dev, int occ, int sk_occ, int size_m, int size_k,
                            int size_n, int num_experts, int tile, int mb, bool grouped,
                            const SplitModel &model, int *splits, int *cluster, int *stream_k) {
    const int tk = tile_k(tile), tn = tile_n(tile);
    const long long tiles = (long long)((size_m + 16 * mb - 1) / (16 * mb)) * num_experts *
                            ((size_n + tn - 1) / tn);
    const int k_tiles = size_k / tk;
    const size_t tile_bytes = size_t(16) * mb * tn * sizeof(float);
    const long long slots = (long long)dev.sm_count * occ;
    const double live_rows = std::min(size_m, 16 * mb);
    // Row slices after the first read the weights their first slice's blocks, launched next to
    // them, brought into L2.
    const int m_slices = (size_m + 16 * mb - 1) / (16 * mb);
    const double kt_cost = model.slice_share > 0.0
        ? model.kt_cost * (1.0 + model.slice_share * (m_slices - 1)) / m_slices : model.kt_cost;
    const double tail = mb == 1 ? model.tail * (kTailOneRow + (1.0 - kTailOneRow) * (live_rows - 1) / 15.0)
                                : model.tail;
    double best_cost = 1e300;
    *splits = 1;
    *cluster = 0;
    *stream_k = 0;
    // A block alone on its SM (a grid of at most one block an SM, spread over the SMs by
    // ferrum_mm, of a kernel two of whose blocks fit an SM) runs faster than the two an SM
    // the constants were fitted on: kLoneBlockShare of their cost with every row of the block
    // live, less of a gain with fewer.
    const double lone_share = g_spread_enabled && occ > 1
                                  ? 1.0 - (1.0 - kLoneBlockShare) * live_rows / (16.0 * mb) : 1.0;
    // Split K only while the grid does not fill the GPU: beyond, a split adds partial traffic
    // and a serial tail for nothing (the wave count alone misjudges this near 1-2 waves).
    const int max_splits = tiles >= slots ? 1 : std::min(k_tiles, 32);
    for (int s = 1; s <= max_splits; ++s) {
        if (s > 1 && tiles * s * tile_bytes > kMaxPartialBytes) break;
        const long long waves = (tiles * s + slots - 1) / slots;
        // A split also writes and re-reads its FP32 partial (live rows only), counted in
        // k-tiles of A and B traffic.
        const double partial_cost = s == 1 ? 0.0
            : 2.0 * live_rows * tn * 4 / (tk * tn / 2 + live_rows * tk * 2);
        const double workspace_partial = (mb == 2 || mb == 4) ? kUnclusteredPartialShare * partial_cost : partial_cost;
        const double reduce_tail = s == 1 ? 0.0 : tail * s + model.exchange;
        const double share = tiles * s <= dev.sm_count ? lone_share : 1.0;
        // A block's k-tiles: at least its pipeline's depth (a shorter run is all fill and
        // drain), each cheaper by `fill` times the share of the block slots left idle.
        const double block_kt = std::max((k_tiles + s - 1) / s, std::min(k_tiles, model.min_kt)) *
                                (1.0 - model.fill * (1.0 - std::min(1.0, (double)(tiles * s) / slots)));
        const double cost = waves * (block_kt * kt_cost + model.fixed + workspace_partial) * share + reduce_tail;
        if (cost < best_cost * model.hysteresis) {
            best_cost = cost;
            *splits = s;
            *cluster = 0;
        }
        // The same split as clusters: the partials cross distributed shared memory instead of
        // L2, and the sum is spread over the cluster (no serial tail); but clusters must fit
        // in a GPC, which can leave SMs idle.
        if (s > 1 && s <= kMaxClusterSplits && cluster_eligible(dev, tile, mb)) {
            int cslots = 0;
            if (cluster_slots(dev, tile, mb, grouped, s, &cslots) != FERRUM_OK) cslots = 0;
            if (cslots > 0) {
                const long long cwaves = (tiles * s + cslots - 1) / cslots;
                const double ccost = cwaves * (block_kt * kt_cost + model.fixed +
                                               kClusterPartialShare * partial_cost + kClusterSplitCost * s);
                if (ccost < best_cost * model.hysteresis) {
                    best_cost = ccost;
                    *splits = s;
                    *cluster = 1;
                }
            }
        }
    }
    // Stream-K (sk_occ > 0: the wgmma tiles 5, 6, 8): one wave of equal runs of the (tile,
    // k-tile) sequence, so no SM idles for want of a tile or a split; a run crossing a tile's
    // end pays a block's fixed cost and a partial per segment, and a tile's last contributor
    // adds all of its partials. H200 (session 19), where it wins: 8192 x 57344 at M = 2-16
    // (tile 6, 261 blocks) 67-70 µs against 73-74 for one split of 224 tiles; 8192 x 10240 at
    // M = 256 (tile 5, 128 rows) 94 against 105.
    if (sk_occ > 0) {
        const long long sk_slots = (long long)dev.sm_count * sk_occ;
        const long long total = tiles * k_tiles;
        const long long iters = (total + sk_slots - 1) / sk_slots;
        const long long blocks = (total + iters - 1) / iters;
        const int shared_by = (int)std::min<long long>(std::min<long long>(blocks, k_tiles), (k_tiles - 1) / iters + 2);
        const long long segments = (iters + k_tiles - 1) / k_tiles + 1;
        const double partial_cost = 2.0 * live_rows * tn * 4 / (tk * tn / 2 + live_rows * tk * 2);
        if (shared_by > 1 && tiles * shared_by * tile_bytes <= kMaxPartialBytes) {
            const double share = blocks <= dev.sm_count ? lone_share : 1.0;
            const double cost = (iters * kt_cost + segments * (model.fixed + partial_cost)) * share +
                                tail * shared_by + model.exchange;
            if (cost < best_cost * model.hysteresis) {
                best_cost = cost;
                *splits = shared_by;
                *cluster = 0;
                *stream_k = 1;
            }
        }
    }
    return best_cost;
}

// The wgmma kernel's split model constants, per (tile, m_blocks): a k-tile's cost relative to
// a 128-row tile-5 block's 0.9 and a block's fixed cost in k-tiles (see plan_one). The 32-row
// blocks' were fitted to 16 tools/tune.py cells at M = 24 and 32 (H200, session 14: the eight
// layers, tiles 5/6, 1-12 splits with and without clusters; the replayed pick is within 6% of
// the best measured on all 16, mean 0.7%; a flat optimum: tile 5 0.8-0.9 with fixed cost 0-4,
// tile 6 1.1 with 2-6 fit as well). Tile 8 (its k-tile is half a tile-5 one) and the 16-row
// blocks of tile 6 were fitted in session 18 (H200, 128-row groups, tools/tune.py over tiles
// 5/6/8 and 1-12 splits on the eight layers at M = 4, 8, 16, 32, 64, 128, 256; the planner
// replayed in Python with the GPU's cluster slots): at M = 4-16 the replayed pick is within 8%
// of the best measured on all 24 cells, mean 0.5% (tile 6 at 16 rows had 1.1 and 4, which
// left 8192x8192 at M = 4 and 8 on tile 5, 12-17% slower); at M = 32 and 64 within 6% and 2%
// where measured (64-row tile-8 blocks at 0.35 left 28672x8192 at M = 64 on tile 6 with 7
// splits, 83.5 µs against 78.5 for tile 8 with 2; 32-row ones at 0.33 would take tile 8 there
// at M = 32, 61.4 against 52.5).
static SplitModel wgmma_split_model(int tile, int mb, bool fp16_scales) {
    double kt_cost, fixed;
    // Tile 9's 16-row blocks (its k-tile of 256 rows costs twice kt_cost): fitted in session 24
    // (H200, G = 128, tools/tune.py over tiles 6, 8 and 9 with 1-16 splits and stream-K on the
    // eight layers at M = 1, 4, 8, 16; choose_splits replayed in Python): with 0.36 and 3 the
    // replayed picks are 1.2% above the best measured variant on average (2.3% without tile 9),
    // 14% at worst (14336x4096 at M = 1, item 10's, as before); 0.33-0.40 with 2-4 fit about as
    // well. Session 27 refitted the 16-row blocks' fixed costs of tiles 8 (2 -> 2.5) and 9
    // (3 -> 2.75) together with kExchange16Rows (see there).
    // Its 32-row blocks (session 29; H200, G = 128, tools/tune.py over tiles 5, 6, 8 and 9 with
    // 1-8 splits, with and without clusters, and stream-K, on 24 shapes at M = 17, 24, 28, 32):
    // a k-tile costs 0.375, a block 0.25, and a split block at least the 4 k-tiles of its
    // pipeline's 4 stages; a k-tile costs up to 40% less the fewer of the GPU's block slots the
    // grid fills. The two terms are what let one k-tile cost pick tile 9 where it wins (up to
    // 12288 columns: 1024x4096 at M = 17 3.5 µs against 5.1 for the best other tile) and tile 6
    // where tile 9 streams ~30% slower (4096x28672, 8192x57344, 28672x8192): without them the
    // replay's optimum was one point (0.35) and either side of it lost 26-30% on one of the two
    // kinds of shape; with them the replayed picks are 2.2% above the best timed variant on
    // average over the 96 cells (13.4% for the planner without these blocks), 16% at worst, and
    // k-tile costs 0.35-0.4 with block costs 0-0.5 come within 3.3%. (Session 30 refitted
    // them with row slices up to 128 rows and at other group sizes: better replays, but in the
    // A/B other cells lost what those won; csrc/NOTES.md session 30.)
    if (tile == 9) {
        kt_cost = mb == 1 ? 0.36 : 0.375;
        fixed = mb == 1 ? 2.75 : 0.25;
    } else if (tile == 8) {
        kt_cost = mb == 1 ? 0.6 : mb == 2 ? 0.35 : 0.33;
        fixed = mb == 1 ? 2.5 : 1.0;
    } else if (mb == 1 && tile == 6) {
        kt_cost = 0.9;
        fixed = 1.0;
    } else if (mb <= 2) {
        kt_cost = tile == 6 ? 1.1 : 0.8;
        fixed = tile == 6 ? 4.0 : 2.0;
    } else {
        kt_cost = tile == 6 ? 1.0 : mb == 8 ? 0.9 : 0.65;
        fixed = tile == 6 ? 6.0 : 1.0;
    }
    if (fp16_scales && mb <= 2) kt_cost *= 1.0 + kFp16ScalesKtile;
    const bool tile9_32 = tile == 9 && mb == 2;
    return SplitModel{kt_cost * tile_k(tile) / 128.0, fixed, 0.5, 1.0, mb == 1 ? kExchange16Rows : 0.0,
                      tile9_32 ? 4 : 0, tile9_32 ? 0.4 : 0.0, tile9_32 ? 0.6 : 0.0};
}

// The mma.sync kernel's cost model: estimated µs of one launch of (tile, m_blocks, splits),
// with constants fitted to 1485 tools/tune.py timings of tiles 1, 2 and 7 on two H100s (M 1-32,
// the eight Llama layer shapes and two smaller ones; mean error 10%; on each of the 38
// problems the pick is within 6% of the measured best, on 33 within 1%). Only its ranking of
// configs is used. Three streams overlap -- all weights from DRAM, all weights plus every
// block's A tiles from L2, and one block's own bytes at what one block sustains, per wave --
// and the launch takes about their 4-norm (a soft maximum); to that add a cost per pipeline
// iteration and per block, and the split-K exchange: the partials written, and the last
// block's serial read of all of them.
struct MmaCostModel {
    static constexpr double kDramKBPerUs = 2440;    // the H100's measured copy bandwidth (fixed)
    static constexpr double kL2KBPerUs = 5283;
    static constexpr double kBlockKBPerUs = 23.73;  // one block's weight (+A) stream
    static constexpr double kAShare = 1.612;        // an A byte in a block's stream, vs a weight byte
    static constexpr double kPerIter = 0.1284;      // a pipeline iteration (barrier, waits)
    static constexpr double kPerBlock = 3.161;      // a block's prologue and epilogue, per wave
    static constexpr double kSplit = 0.3648;        // the counter round trip of a split tile
    static constexpr double kPartialRead = 0.0353;  // per KB the last block sums
    static constexpr double kPartialWrite = 0.1064; // per KB of a block's partial
};

static double mma_cost(const DeviceProps &dev, int occ, int size_m, int size_k, int size_n,
                       int num_experts, int tile, int mb, int s) {
    using C = MmaCostModel;
    const int tk = tile_k(tile), tn = tile_n(tile);
    const double tiles = (double)((size_m + 16 * mb - 1) / (16 * mb)) * num_experts * ((size_n + tn - 1) / tn);
    const double blocks = tiles * s;
    const double waves = std::ceil(blocks / ((double)dev.sm_count * occ));
    const double iters = (size_k / tk + s - 1) / s;
    const double live = std::min(size_m, 16 * mb);
    const double w_kb = tk * tn / 2 / 1024.0, a_kb = live * tk * 2 / 1024.0, p_kb = live * tn * 4 / 1024.0;
    const double total_w_kb = (double)size_k * size_n * num_experts / 2 / 1024.0;
    const double dram = total_w_kb / C::kDramKBPerUs;
    const double l2 = (total_w_kb + blocks * iters * a_kb) / C::kL2KBPerUs;
    const double block = waves * iters * (w_kb + C::kAShare * a_kb) / C::kBlockKBPerUs;
    const double stream = std::sqrt(std::sqrt(dram * dram * dram * dram + l2 * l2 * l2 * l2 +
                                              block * block * block * block));
    const double split = s == 1 ? 0.0 : C::kSplit + C::kPartialRead * s * p_kb + C::kPartialWrite * p_kb;
    return stream + waves * (C::kPerIter * iters + C::kPerBlock) + split;
}

// The mma.sync kernel's split-K: the cheapest by mma_cost, a larger split winning by 1% at least.
static double mma_choose_splits(const DeviceProps &dev, int occ, int size_m, int size_k, int size_n,
                                int num_experts, int tile, int mb, int *splits) {
    const int tn = tile_n(tile);
    const long long tiles = (long long)((size_m + 16 * mb - 1) / (16 * mb)) * num_experts *
                            ((size_n + tn - 1) / tn);
    const size_t tile_bytes = size_t(16) * mb * tn * sizeof(float);
    const int max_splits = tiles >= (long long)dev.sm_count * occ ? 1 : std::min(size_k / tile_k(tile), 32);
    double best = 1e300;
    *splits = 1;
    for (int s = 1; s <= max_splits; ++s) {
        if (s > 1 && tiles * s * tile_bytes > kMaxPartialBytes) break;
        const double cost = mma_cost(dev, occ, size_m, size_k, size_n, num_experts, tile, mb, s);
        if (cost < best * 0.99) {
            best = cost;
            *splits = s;
        }
    }
    return best;
}

// The heuristic, readable as a table (measured on an H100, tools/tune.py):
//   rows M               kernel, block tile (k x n)         rows per block (m_blocks), splits
//   1..8 (any M without  mma.sync: tile 2 (128 x 256), and  16*ceil(M/16), at most 64; tile and
//   sm_90a; 1 with       for M <= 64 also tiles 1           splits by mma_cost (up to 8 rows
//   128-row groups)      (128 x 128) and 7 (256 x 64)       the swapped kernel)
//   9..16 on sm_90a      wgmma, 128 x 256 (tiles 5, 6),     16 rows (wgmma n16): tile 5, 6, 8 or 9
//   (2..16 with 128-row  128 x 128 (8), 256 x 64 (9)        by the split model, no clusters
//   groups)
//   17..32 on sm_90a     the same four tiles                32 rows (wgmma n32): tile 5, 6, 8 or 9
//                                                           by the split model
//   >= 33 on sm_90a      wgmma, 128 x 256 or 128 x 128      whichever of tile 5 with 64 or 128 rows
//                        (and 256 x 64 up to 64 rows)       and tiles 6 and 8 (64 rows), and up to
//                                                           64 rows tile 9's 32-row blocks in two
//                                                           row slices, the split model costs least
// with the wgmma split model's constants, per k-tile: 0.65 for a 64-row tile-5 block, 1.0 for a
// tile-6 one (it shares its SM), fitted to 90 tune and bench timings on an H100 (the fit picks
// the measured best, within 3%, on 20 of 24 shapes); 0.9 for a 128-row tile-5 block (1.0
// before its stages stopped draining; an H100 A/B of the cells that changed plan won 6 of 7 by
// 10-31% and lost 8B o M=256 by 12%). A block's fixed cost (prologue, epilogue) is 1 k-tile,
// except 6 for tile 6: refitted on 26 shapes at M = 40-128 (H200, tools/tune.py over tiles 5/6
// and 1-8 splits), where 1 picked tile 6 with 7-8 short splits on 8B qkv and 70B o (24.6 and
// 38.1 µs against 16.6 and 32.8 for tile 5 with 3-4); with 6 the model's pick is within 4% of
// the best measured on all 26, and a same-machine A/B on 21 cells (M = 40-300) was 13 faster
// by 2-42%, 3 slower by 2-4% (csrc/NOTES.md). Any field of
// `requested` overrides (tiles 3: 64 x 256 and 4: wgmma 64 x 256 are there for tuning).
// group_size: rows per scale group, 0 for channelwise scales.
static int plan_one(const DeviceProps &dev, int size_m, int size_k, int size_n, int num_experts,
                    int act_order, const ferrum_mm_config *req, int group_size,
                    ferrum_mm_plan_info *plan) {
    ferrum_mm_config cfg = req ? *req : ferrum_mm_config{0, 0, 0, 0, 0};
    FERRUM_REQUIRE(cfg.tile >= 0 && cfg.tile <= kTiles, "ferrum_mm: tile=%d (use 0..%d)", cfg.tile, kTiles);
    const bool grouped = group_size > 0;
    // The wgmma kernel from kWgmmaMinRows rows (channelwise, and groups of 64 or 128 rows with
    // F32S on; kWgmmaMinRowsFp16Scales with it off), from kWgmma16Rows + 1 with groups of 32 rows
    // (fp16 scales in 16-row blocks; with G = 64 at M = 16, before F32S took 64-row groups,
    // 4096x4096 was 13.6% and 14336x4096 6.7% slower than the mma.sync plan, the others within
    // -6..+3%; session 16), where its block height for these rows fits the GPU's shared memory
    // in tile 6 (the smaller tile).
    const int wgmma_min_rows = grouped && group_size < 64 ? kWgmma16Rows + 1
                               : g_wgmma_min_rows_env ? g_wgmma_min_rows_env
                               : !grouped || g_f32s_enabled ? kWgmmaMinRows
                                                            : kWgmmaMinRowsFp16Scales;
    const int wgmma_mb = size_m <= kWgmma16Rows ? 1 : size_m <= kWgmmaFewRows ? 2 : 4;
    const bool wgmma = is_wgmma_tile(cfg.tile) ||
                       (cfg.tile == 0 && wgmma_available(dev) && size_m >= wgmma_min_rows &&
                        select_kernel(6, wgmma_mb, grouped).smem_bytes <= dev.max_smem_optin);
    if (wgmma) {
        FERRUM_REQUIRE(wgmma_available(dev),
                       "ferrum_mm: tile=%d (wgmma) needs a compute capability 9.0 GPU and a build "
                       "with sm_90a (FERRUM_CUDA_ARCHS including 90)", cfg.tile);
        FERRUM_REQUIRE(cfg.m_blocks == 0 || (cfg.m_blocks == 4 && cfg.tile != 9) ||
                       (cfg.m_blocks == 8 && (cfg.tile == 4 || cfg.tile == 5)) ||
                       ((cfg.m_blocks == 1 || cfg.m_blocks == 2) && cfg.tile != 4),
                       "ferrum_mm: m_blocks=%d with tile=%d (tile 4 takes 0, 4 or 8; tile 5 0, 1, 2, 4 "
                       "or 8; tiles 6 and 8 0, 1, 2 or 4; tile 9 0, 1 or 2)", cfg.m_blocks, cfg.tile);
        if (cfg.tile == 9 && cfg.m_blocks == 0) cfg.m_blocks = size_m <= kWgmma16Rows ? 1 : 2;
    } else {
        if (cfg.m_blocks == 0) cfg.m_blocks = std::min(4, (size_m + 15) / 16);
        FERRUM_REQUIRE(cfg.m_blocks >= 1 && cfg.m_blocks <= 4, "ferrum_mm: m_blocks=%d (use 0..4)",
                       cfg.m_blocks);
    }

    // Candidate (tile, m_blocks) pairs: what was asked for, the rest filled in.
    // Left to the planner: wgmma tiles 5 (64 and 128 rows; 16 rows up to kWgmma16Rows rows,
    // 32 rows up to kWgmmaFewRows), 6 and 8 (64 rows; 16 and 32 rows likewise), 9 (16 rows,
    // and 32 rows likewise and in row slices up to kTile9SlicedRows, where K % 256 == 0);
    // mma.sync tile 2,
    // and for few rows (one slice) also tiles 1 and 7 where K fits them; tile 3 where none of
    // those fits the GPU's shared memory.
    struct Candidate { int tile, mb; };
    constexpr int kMaxCandidates = 5;   // the most any row count takes: tiles 5 (64, 128 rows), 6, 8, 9 (32)
    Candidate candidates[kMaxCandidates];
    int n_candidates = 0;
    const bool few_rows = size_m <= 64;
    const bool wgmma_16 = size_m <= kWgmma16Rows;
    const bool wgmma_few = size_m <= kWgmmaFewRows;
    const int mmb = cfg.m_blocks;
    for (const Candidate c : {Candidate{5, 1}, Candidate{6, 1}, Candidate{5, 2}, Candidate{6, 2},
                              Candidate{5, 4}, Candidate{5, 8},
                              Candidate{6, 4}, Candidate{4, 4}, Candidate{4, 8},
                              Candidate{8, 1}, Candidate{8, 2}, Candidate{8, 4}, Candidate{9, 1},
                              Candidate{9, 2}, Candidate{2, mmb},
                              Candidate{1, mmb}, Candidate{7, mmb}, Candidate{3, mmb},
                              Candidate{cfg.tile, cfg.m_blocks}}) {
        if (n_candidates == kMaxCandidates) break;
        const bool auto_mma = !wgmma && (c.tile == 2 || c.tile == 3 || (few_rows && c.tile == 1) ||
                                         (few_rows && c.tile == 7 && size_k % tile_k(7) == 0));
        const bool tile_ok = cfg.tile ? c.tile == cfg.tile
                                      : (wgmma ? c.tile == 5 || c.tile == 6 || c.tile == 8 ||
                                                     (c.tile == 9 && g_tile9_enabled && size_k % tile_k(9) == 0)
                                               : auto_mma);
        const bool mb_ok = cfg.m_blocks ? c.mb == cfg.m_blocks
                                        : !is_wgmma_tile(c.tile) ||
                                          (wgmma_16 ? c.mb == 1 : wgmma_few ? c.mb == 2
                                                    : c.mb >= 4 || (c.tile == 9 && c.mb == 2 && size_m <= kTile9SlicedRows));
        if (c.tile > 0 && c.mb > 0 && tile_ok && mb_ok) {
            bool seen = false;
            for (int i = 0; i < n_candidates; ++i)
                seen |= candidates[i].tile == c.tile && candidates[i].mb == c.mb;
            if (!seen) candidates[n_candidates++] = c;
        }
    }
    FERRUM_REQUIRE(n_candidates > 0, "ferrum_mm: no kernel for tile=%d m_blocks=%d", cfg.tile, cfg.m_blocks);
    double best_cost = 1e300;
    int best_splits = 1, best_cluster = 0, best_stream_k = 0;
    Candidate best = candidates[0];
    bool any_fits = false;
    for (int i = 0; i < n_candidates; ++i) {
        const Candidate c = candidates[i];
        FERRUM_REQUIRE(size_k % tile_k(c.tile) == 0, "ferrum_mm: size_k=%d is not a multiple of %d",
                       size_k, tile_k(c.tile));
        // The planner's own choices: only kernels this GPU's shared memory holds (tiles 1 and 7
        // need 102-106 KB, more than sm_86/sm_89 give a block), and tile 3 only where nothing
        // before it fits. A tile asked for is prepared regardless and fails with the sizes if it
        // does not fit.
        if (!cfg.tile) {
            if (c.tile == 3 && any_fits) continue;
            if (select_kernel(c.tile, c.mb, grouped).smem_bytes > dev.max_smem_optin) continue;
        }
        any_fits = true;
        int occ = 1;
        int status = prepare_kernel(dev, c.tile, c.mb, grouped, &occ);
        if (status != FERRUM_OK) return status;
        int splits = 1, cluster = 0, stream_k = 0;
        double cost;
        if (is_wgmma_tile(c.tile)) {
            const SplitModel model = wgmma_split_model(
                c.tile, c.mb, grouped && wgmma_f32s_fold(c.tile, c.mb, grouped, group_size) == 0);
            // stream-K where the caller leaves it to the planner (and not tile 4, tuning only)
            int sk_occ = 0;
            if (cfg.stream_k == 0 && cfg.splits == 0 && c.tile != 4) {
                status = sk_occupancy(dev, c.tile, c.mb, grouped, wgmma_f32s_fold(c.tile, c.mb, grouped, group_size), &sk_occ);
                if (status != FERRUM_OK) return status;
            }
            cost = choose_splits(dev, occ, sk_occ, size_m, size_k, size_n, num_experts, c.tile, c.mb, grouped,
                                 model, &splits, &cluster, &stream_k);
        } else {
            cost = mma_choose_splits(dev, occ, size_m, size_k, size_n, num_experts, c.tile, c.mb, &splits);
        }
        if (cost < best_cost) {
            best_cost = cost;
            best = c;
            best_splits = splits;
            best_cluster = cluster;
            best_stream_k = stream_k;
        }
    }
    if (!any_fits) {   // nothing the planner may choose fits: report the sizes of the first
        int occ = 1;
        const int status = prepare_kernel(dev, candidates[0].tile, candidates[0].mb, grouped, &occ);
        if (status != FERRUM_OK) return status;
    }
    cfg.tile = best.tile;
    cfg.m_blocks = best.mb;
    const int tk = tile_k(cfg.tile), tn = tile_n(cfg.tile);
    const int m_slices = (size_m + 16 * cfg.m_blocks - 1) / (16 * cfg.m_blocks);
    const long long tiles = (long long)m_slices * num_experts * ((size_n + tn - 1) / tn);
    const int k_tiles = size_k / tk;
    const size_t tile_bytes = size_t(16) * cfg.m_blocks * tn * sizeof(float);
    const bool splits_auto = cfg.splits == 0;
    // at most one split a k-tile (splits asked for are cut to that before they are planned)
    cfg.splits = std::max(1, std::min(splits_auto ? best_splits : cfg.splits, k_tiles));
    FERRUM_REQUIRE(tiles * cfg.splits < INT_MAX, "ferrum_mm: grid too large");
    if (!splits_auto) {   // splits asked for: as clusters wherever they may, fit, and take no more waves
        // than the plain grid (clusters must fit a GPC: 128 blocks in clusters of 4 of a tile-8
        // 32-row kernel make two waves of 120 slots, 35.9 µs on 14336x4096 at M = 32 on an H200,
        // where the same 128 blocks unclustered, as stream-K, took 20.2)
        int cslots = 0;
        const bool eligible = cfg.splits > 1 && cfg.splits <= kMaxClusterSplits &&
                              cluster_eligible(dev, cfg.tile, cfg.m_blocks);
        if (eligible && cluster_slots(dev, cfg.tile, cfg.m_blocks, grouped, cfg.splits, &cslots) != FERRUM_OK)
            cslots = 0;
        int occ = 1;
        if (eligible && cslots > 0) {
            const int status = prepare_kernel(dev, cfg.tile, cfg.m_blocks, grouped, &occ);
            if (status != FERRUM_OK) return status;
        }
        const long long blocks = tiles * cfg.splits;
        const long long slots = (long long)dev.sm_count * occ;
        best_cluster = eligible && cslots > 0 && (blocks + cslots - 1) / cslots <= (blocks + slots - 1) / slots;
    }

    // Stream-K on the wgmma tiles (5, 6, 8, 9): asked for, or the split model's pick
    // (choose_splits), with the stream-K instance's occupancy. On the mma.sync tiles (one
    // slice): asked for, or (splits left to the planner) where one
    // split's tiles leave more than a tenth of the block slots idle and every tile is a long run
    // (>= 32 k-tiles): there one wave of blocks with equal runs beat every split-K plan. H200,
    // tools/tune.py: 70B gate_up (224 tiles of 64 k-tiles, 264 slots) M=1 76.7 against 81.1 µs
    // for the best split-K plan, M=16 93.8 against 97.9. Elsewhere the best split-K plan was as
    // fast or faster (8B gate_up M=1 25.3 against 24.9 µs, 70B qkv 20.4 against 19.0): a stream-K
    // block crosses tile ends (a prologue and a partial each) and takes ~15 more registers.
    const bool sk_wgmma = is_wgmma_tile(cfg.tile) && cfg.tile != 4;
    FERRUM_REQUIRE(cfg.stream_k <= 0 || sk_wgmma || (!is_wgmma_tile(cfg.tile) && cfg.m_blocks == 1),
                   "ferrum_mm: stream_k=%d applies to the mma.sync tiles (1, 2, 3, 7) with m_blocks=1 "
                   "and the wgmma tiles 5, 6, 8 and 9, not tile %d with m_blocks=%d", cfg.stream_k, cfg.tile,
                   cfg.m_blocks);
    long long sk_iters = 0, sk_blocks = 0;
    if ((cfg.stream_k >= 0 && !is_wgmma_tile(cfg.tile) && cfg.m_blocks == 1) ||
        (sk_wgmma && (cfg.stream_k >= 1 || (cfg.stream_k == 0 && splits_auto && best_stream_k)))) {
        int occ = 1;
        int status = prepare_kernel(dev, cfg.tile, cfg.m_blocks, grouped, &occ);
        if (status == FERRUM_OK && sk_wgmma)
            status = sk_occupancy(dev, cfg.tile, cfg.m_blocks, grouped,
                                  wgmma_f32s_fold(cfg.tile, cfg.m_blocks, grouped, group_size), &occ);
        if (status != FERRUM_OK) return status;
        const long long total = tiles * k_tiles;
        const long long slots = (long long)dev.sm_count * occ;
        const long long want = cfg.stream_k >= 2 ? cfg.stream_k : slots;
        const long long iters = (total + want - 1) / want;
        const long long blocks = (total + iters - 1) / iters;
        // the most blocks one tile's k-tiles can meet (at least one k-tile each)
        const int shared_by = (int)std::min<long long>(std::min<long long>(blocks, k_tiles), (k_tiles - 1) / iters + 2);
        const bool use = cfg.stream_k >= 1 || (sk_wgmma && best_stream_k) ||
                         (splits_auto && cfg.splits == 1 && tiles < 0.9 * slots && k_tiles >= 32 &&
                          tiles * shared_by * tile_bytes <= kMaxPartialBytes);
        if (use) {
            sk_iters = iters;
            sk_blocks = blocks;
            cfg.splits = shared_by;
            best_cluster = 0;
        }
    }
    cfg.stream_k = sk_blocks ? static_cast<int>(sk_blocks) : -1;
    plan->config = cfg;
    plan->m_slices = m_slices;
    plan->grid = sk_blocks ? static_cast<int>(sk_blocks) : static_cast<int>(tiles * cfg.splits);
    plan->sk_iters = static_cast<int>(sk_iters);
    plan->cluster_reduce = cfg.splits > 1 && best_cluster;
    const bool workspace = cfg.splits > 1 && !plan->cluster_reduce;
    plan->counter_bytes = workspace ? align_up(tiles * sizeof(int), 256) : 0;
    const size_t partial_bytes = workspace ? align_up(tiles * cfg.splits * tile_bytes, 256) : 0;
    const size_t a_bytes = act_order ? align_up(size_t(size_m) * size_k * 2, 256) : 0;
    plan->data_bytes = partial_bytes + a_bytes;
    return FERRUM_OK;
}

// plan_one costs 2-3 µs of host time (every candidate tile and split is costed), more than
// the launch itself on some hosts, and a serving loop asks for the same few problems over and
// over. So each thread keeps its last plans: the key is everything plan_one reads (the
// device, the problem, the fields asked for); the device's properties, occupancies and
// cluster slots it also reads are fixed per device for the process. Errors are not cached.
struct PlanKey {
    int device, rows, size_k, size_n, num_experts, act_order, group_size, has_request;
    ferrum_mm_config request;
};
constexpr int kPlanCacheEntries = 16;
struct PlanCacheEntry {
    PlanKey key;
    ferrum_mm_plan_info plan;
    bool valid;
};
static thread_local PlanCacheEntry g_plan_cache[kPlanCacheEntries];
static thread_local int g_plan_cache_next = 0;

static int cached_plan(const DeviceProps &dev, int rows, int size_k, int size_n, int num_experts,
                       int act_order, const ferrum_mm_config *req, int group_size,
                       ferrum_mm_plan_info *plan) {
    PlanKey key;
    memset(&key, 0, sizeof key);   // all ints, no padding: compared bytewise
    key.device = dev.device;
    key.rows = rows;
    key.size_k = size_k;
    key.size_n = size_n;
    key.num_experts = num_experts;
    key.act_order = act_order != 0;
    key.group_size = group_size;
    key.has_request = req != nullptr;
    if (req) key.request = *req;
    for (const PlanCacheEntry &e : g_plan_cache) {
        if (e.valid && memcmp(&e.key, &key, sizeof key) == 0) {
            *plan = e.plan;
            return FERRUM_OK;
        }
    }
    const int status = plan_one(dev, rows, size_k, size_n, num_experts, act_order, req, group_size, plan);
    if (status == FERRUM_OK) {
        PlanCacheEntry &e = g_plan_cache[g_plan_cache_next];
        g_plan_cache_next = (g_plan_cache_next + 1) % kPlanCacheEntries;
        e.key = key;
        e.plan = *plan;
        e.valid = true;
    }
    return status;
}

// FERRUM_NO_PDL=1 turns programmatic dependent launch off (for comparisons and debugging).
static const bool g_pdl_enabled = [] {
    const char *v = getenv("FERRUM_NO_PDL");
    return !(v && v[0] && v[0] != '0');
}();

static bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

static int check_problem(int size_m, int size_k, int size_n, int num_experts, int num_groups,
                         int group_size) {
    FERRUM_REQUIRE(size_m >= 0, "ferrum_mm: size_m=%d", size_m);
    FERRUM_REQUIRE(size_k > 0 && size_k % 128 == 0, "ferrum_mm: size_k=%d is not a positive multiple of 128", size_k);
    FERRUM_REQUIRE(size_n > 0 && size_n % 64 == 0, "ferrum_mm: size_n=%d is not a positive multiple of 64", size_n);
    FERRUM_REQUIRE(num_experts >= 1, "ferrum_mm: num_experts=%d", num_experts);
    FERRUM_REQUIRE(num_groups >= 1, "ferrum_mm: num_groups=%d (1 for channelwise scales)", num_groups);
    if (num_groups > 1) {
        FERRUM_REQUIRE(group_size == 32 || group_size == 64 || group_size == 128,
                       "ferrum_mm: group_size=%d (grouped scales need 32, 64 or 128)", group_size);
        FERRUM_REQUIRE((long long)num_groups * group_size == size_k,
                       "ferrum_mm: %d groups of %d rows do not cover size_k=%d", num_groups, group_size, size_k);
    }
    return FERRUM_OK;
}

static int group_shift_of(int group_size) {
    int s = 0;
    while ((1 << s) < group_size) ++s;
    return s;
}

}  // namespace ferrum

// Both plan entry points: the problem checked as ferrum_mm checks it, then the cached plan for a
// full launch of its rows (plan_group: rows per scale group as the planner takes it, 0 channelwise).
static int checked_plan(const char *fn, int size_m, int size_k, int size_n, int num_experts,
                        int act_order, int num_groups, int group_size, int plan_group,
                        const ferrum_mm_config *requested, ferrum_mm_plan_info *plan) {
    using namespace ferrum;
    FERRUM_REQUIRE(plan, "%s: null plan", fn);
    int status = check_problem(size_m, size_k, size_n, num_experts, num_groups, group_size);
    if (status) return status;
    DeviceProps dev;
    if ((status = current_device_props(&dev))) return status;
    const int rows = std::max(1, std::min(size_m, kMaxRowsPerLaunch));
    return cached_plan(dev, rows, size_k, size_n, num_experts, act_order, requested, plan_group, plan);
}

extern "C" int ferrum_mm_plan(int size_m, int size_k, int size_n, int num_experts, int act_order,
                              const ferrum_mm_config *requested, ferrum_mm_plan_info *plan) {
    return checked_plan("ferrum_mm_plan", size_m, size_k, size_n, num_experts, act_order, 1, size_k,
                        128, requested, plan);
}

extern "C" int ferrum_mm_plan_groups(int size_m, int size_k, int size_n, int num_experts,
                                     int act_order, int num_groups, int group_size,
                                     const ferrum_mm_config *requested, ferrum_mm_plan_info *plan) {
    return checked_plan("ferrum_mm_plan_groups", size_m, size_k, size_n, num_experts, act_order,
                        num_groups, group_size, num_groups > 1 ? group_size : 0, requested, plan);
}

extern "C" int ferrum_mm(const void *a, const void *b, const void *scales, void *c,
                         const int32_t *perm, int size_m, int size_k, int size_n, int expert0,
                         int num_experts, int num_groups, int group_size, int ldc,
                         const ferrum_mm_config *requested, void *counters, size_t counter_bytes,
                         void *data, size_t data_bytes, ferrum_mm_plan_info *plan_out,
                         void *stream_handle) {
    using namespace ferrum;
    int status = check_problem(size_m, size_k, size_n, num_experts, num_groups, group_size);
    if (status) return status;
    if (size_m == 0) return FERRUM_OK;
    FERRUM_REQUIRE(a && b && scales && c, "ferrum_mm: null pointer");
    FERRUM_REQUIRE(aligned16(a) && aligned16(b) && aligned16(scales) && aligned16(c),
                   "ferrum_mm: a, b, scales and c must be 16-byte aligned");
    FERRUM_REQUIRE(!perm || (reinterpret_cast<uintptr_t>(perm) & 3) == 0,
                   "ferrum_mm: perm must be 4-byte aligned");
    FERRUM_REQUIRE((!counters || aligned16(counters)) && (!data || aligned16(data)),
                   "ferrum_mm: the workspace buffers must be 16-byte aligned");
    FERRUM_REQUIRE(expert0 >= 0, "ferrum_mm: expert0=%d", expert0);
    FERRUM_REQUIRE(ldc >= (long long)num_experts * size_n && ldc % 8 == 0,
                   "ferrum_mm: ldc=%d (needs >= %lld and a multiple of 8)", ldc,
                   (long long)num_experts * size_n);
    const bool grouped = num_groups > 1;
    cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
    DeviceProps dev;
    if ((status = current_device_props(&dev))) return status;

    // Plans for a full launch of rows and for the last, shorter one; the workspace must hold
    // the larger of each.
    const int full_rows = std::min(size_m, kMaxRowsPerLaunch);
    const int last_rows = size_m % kMaxRowsPerLaunch == 0 ? full_rows : size_m % kMaxRowsPerLaunch;
    ferrum_mm_plan_info full, last;
    const int plan_group = grouped ? group_size : 0;
    if ((status = cached_plan(dev, full_rows, size_k, size_n, num_experts, perm != nullptr, requested, plan_group, &full)))
        return status;
    if (last_rows == full_rows)
        last = full;
    else if ((status = cached_plan(dev, last_rows, size_k, size_n, num_experts, perm != nullptr, requested, plan_group, &last)))
        return status;
    ferrum_mm_plan_info need = full;
    need.counter_bytes = std::max(full.counter_bytes, last.counter_bytes);
    need.data_bytes = std::max(full.data_bytes, last.data_bytes);
    if (plan_out) *plan_out = need;
    if (counter_bytes < need.counter_bytes || data_bytes < need.data_bytes ||
        (need.counter_bytes && !counters) || (need.data_bytes && !data))
        return set_error(FERRUM_ERR_WORKSPACE, "ferrum_mm: workspace too small (%zu + %zu bytes needed)",
                         need.counter_bytes, need.data_bytes);

    for (int row0 = 0; row0 < size_m; row0 += kMaxRowsPerLaunch) {
        const int rows = std::min(kMaxRowsPerLaunch, size_m - row0);
        const ferrum_mm_plan_info &plan = rows == full_rows ? full : last;
        const int tile = plan.config.tile, mb = plan.config.m_blocks;
        const half *a_rows = static_cast<const half *>(a) + (long long)row0 * size_k;
        const int tiles_per_expert = (size_n + tile_n(tile) - 1) / tile_n(tile);
        const size_t partial_bytes = plan.config.splits > 1 && !plan.cluster_reduce
            ? align_up((size_t)plan.m_slices * num_experts * tiles_per_expert * plan.config.splits *
                       16 * mb * tile_n(tile) * sizeof(float), 256) : 0;
        if (perm) {
            void *a_perm = static_cast<char *>(data) + partial_bytes;
            if ((status = ferrum_permute_cols(a_rows, perm, a_perm, rows, size_k, stream))) return status;
            a_rows = static_cast<const half *>(a_perm);
        }
        MmParams p;
        p.a = a_rows;
        p.b = static_cast<const int4 *>(b);
        p.scales = static_cast<const half *>(scales);
        p.c = static_cast<half *>(c) + (long long)row0 * ldc;
        p.partials = static_cast<float *>(data);
        p.counters = static_cast<int *>(counters);
        p.M = rows;
        p.K = size_k;
        p.N = size_n;
        p.ldc = ldc;
        p.expert0 = expert0;
        p.tiles_per_expert = tiles_per_expert;
        p.n_tiles_total = p.tiles_per_expert * num_experts;
        p.m_slices = plan.m_slices;
        p.splits = plan.config.splits;
        p.cluster_reduce = plan.cluster_reduce;
        p.weights_early = !(requested && requested->weights_pending);
        p.sk_iters = plan.sk_iters;
        p.k_tiles = size_k / tile_k(tile);
        p.group_shift = grouped ? group_shift_of(group_size) : 0;
        p.b_expert_int4 = (long long)(size_k / 16) * 2 * size_n / 4;
        p.s_expert_halves = (long long)(grouped ? num_groups : 1) * size_n;
        const KernelEntry k = select_kernel(tile, mb, grouped, swap8_for(tile, mb, rows, grouped, group_size),
                                             plan.sk_iters > 0, wgmma_f32s_fold(tile, mb, grouped, group_size));
        // A grid of at most one block an SM, of a kernel two of whose blocks fit an SM: each
        // block asks for the most shared memory a block may have, so no SM gets two of them
        // while another stays idle (the block scheduler fills SMs up to their occupancy).
        int smem_bytes = 0;
        if (g_spread_enabled && plan.grid <= dev.sm_count && !plan.cluster_reduce) {
            int occ = 1;
            if ((status = prepare_kernel(dev, tile, mb, grouped, &occ))) return status;
            if (occ > 1 && spread_smem(dev) > k.smem_bytes) {
                if ((status = allow_spread(dev, k))) return status;
                smem_bytes = spread_smem(dev);
            }
        }
        if ((status = k.launch(p, plan.grid, stream, dev.major >= 9 && g_pdl_enabled, smem_bytes))) return status;
    }
    return FERRUM_OK;
}
