// mm_common.cuh -- what the two mm kernels share: their parameters, the output epilogue
// (FP32 C tile in shared memory -> fp16 C, through the ordered split-K reduction) and the
// launch plumbing. mm.cu holds the mma.sync kernel (every GPU from sm_80) and the planner;
// mm_wgmma.cu the wgmma kernel (sm_90a, many rows).
#pragma once

#include <cooperative_groups.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "ptx.cuh"

namespace ferrum {

constexpr int kMaxClusterSplits = 8;   // the portable cluster size

struct MmParams {
    const half *a;          // [M, K] row-major, this launch's rows
    const int4 *b;          // Marlin words of expert 0 of the stack
    const half *scales;     // [E, groups, N] of expert 0
    half *c;                // [M, ldc], this launch's rows
    float *partials;        // [splits, tiles, rows_per_block*TN] FP32, when splits > 1
    int *counters;          // [tiles], zero between calls
    int M, K, N, ldc;
    int expert0;            // first expert of the launch; C column block i is expert expert0+i
    int tiles_per_expert;   // column tiles of one expert (ceil(N / TN))
    int n_tiles_total;      // tiles_per_expert * experts in this launch
    int m_slices;           // row slices of rows_per_block
    int splits;             // split-K factor
    int k_tiles;            // K / TK
    int group_shift;        // log2(group size) for grouped scales
    int cluster_reduce;     // 1: the splits of a C tile are one thread block cluster and add
                            // their partials through distributed shared memory (sm_90)
    int weights_early;      // 1: the prologue's weight copies start before griddepcontrol.wait
    int sk_iters;           // > 0: stream-K -- block b computes iterations [b, b+1) * sk_iters of
                            // the (tile, k-tile) sequence (tile-major), see stream_k_work; then
                            // splits is the most blocks any tile is shared by
    long long b_expert_int4;    // Marlin int4 per expert: (K/16) * 2N / 4
    long long s_expert_halves;  // scale entries per expert: groups * N
};

// Which C tile and which K range a block owns. Block order: m slice fastest, so the blocks
// that read the same B tile run together and share it through L2; then column tile; split-K
// slowest. With cluster_reduce, split fastest: the splits of a tile are consecutive blocks,
// one cluster, and a block's rank in its cluster is its split. `split` is the block's place
// among the `contributors` blocks that share the tile (their partials are added in that order).
struct BlockWork {
    int m_slice, ntile, split, contributors, e_local, n0, m0, kt_begin, iters;
    const int4 *B;     // this expert's Marlin words
    const half *S;     // this expert's scales
};

// The tile's place: expert, first column and row, and the expert's weights and scales.
__device__ __forceinline__ void locate_tile(const MmParams &p, int rows_per_block, int tn, BlockWork &w) {
    w.e_local = w.ntile / p.tiles_per_expert;
    w.n0 = (w.ntile % p.tiles_per_expert) * tn;     // first column inside the expert
    w.m0 = w.m_slice * rows_per_block;
    w.B = p.b + (long long)(p.expert0 + w.e_local) * p.b_expert_int4;
    w.S = p.scales + (long long)(p.expert0 + w.e_local) * p.s_expert_halves;
}

__device__ __forceinline__ BlockWork block_work(const MmParams &p, int rows_per_block, int tn) {
    BlockWork w;
    int bid = blockIdx.x;
    if (p.cluster_reduce) {
        w.split = bid % p.splits;
        bid /= p.splits;
        w.m_slice = bid % p.m_slices;
        w.ntile = bid / p.m_slices;
    } else {
        w.m_slice = bid % p.m_slices;
        bid /= p.m_slices;
        w.ntile = bid % p.n_tiles_total;
        w.split = bid / p.n_tiles_total;
    }
    locate_tile(p, rows_per_block, tn, w);
    w.contributors = p.splits;
    w.kt_begin = (int)((long long)w.split * p.k_tiles / p.splits);
    const int kt_end = (int)((long long)(w.split + 1) * p.k_tiles / p.splits);
    w.iters = kt_end - w.kt_begin;
    return w;
}

// Stream-K: the (tile, k-tile) iterations in order (tile-major; tile t = m_slice + m_slices *
// ntile, as the partials index them) are cut into equal runs of p.sk_iters, one a block, so
// every block has the same work however the tiles divide among the SMs. A block's run may
// cross into the next tile: one segment per tile it touches, from iteration `it` (< end) on.
// The blocks that share a tile add their partials in block order.
__device__ __forceinline__ BlockWork stream_k_work(const MmParams &p, int rows_per_block, int tn,
                                                   long long it, long long end) {
    BlockWork w;
    const int t = (int)(it / p.k_tiles);
    w.m_slice = t % p.m_slices;
    w.ntile = t / p.m_slices;
    locate_tile(p, rows_per_block, tn, w);
    w.kt_begin = (int)(it % p.k_tiles);
    w.iters = (int)min((long long)(p.k_tiles - w.kt_begin), end - it);
    const long long first = (long long)t * p.k_tiles / p.sk_iters;
    const long long last = ((long long)(t + 1) * p.k_tiles - 1) / p.sk_iters;
    w.split = (int)(blockIdx.x - first);
    w.contributors = (int)(last - first + 1);
    return w;
}

// Stage 1 of both kernels: one thread's share of the asynchronous copies that fill a pipeline
// stage (a K tile of A, B and the group scales) in shared memory. Each thread's sources and
// destinations are fixed up to a per-stage offset, so they are computed once, at construction:
// thread t copies vectors t, t + kThreads, ... of each stage.
//   A: kRows rows of TK halves, 16-byte vectors; vector v of row r goes to slot v ^ (r % 8) of
//      the row (XOR swizzle: the 8 rows that one ldmatrix phase reads at the same k land in 8
//      different 16-byte bank groups). With T::kAAtomMajor (the wgmma kernel) the stage is
//      TK/64 blocks of kRows x 64 halves instead of rows of TK: each 8 rows x 128 bytes is one
//      atom of wgmma's 128-byte swizzle.
//   B: the global order, TK/16 k-tiles x kChunks chunks of 64 columns x 32 vectors (128 words);
//      read once per call, so the copies carry the L2 evict-first policy.
//   scales: group rows g0 .. g0+rows-1 of the stage, TN/8 vectors each.
template <class T, bool GROUPED>
struct StageCopy {
    static_assert(T::kBStageVecs % T::kThreads == 0 && T::kThreads % (T::kChunks * 32) == 0, "B copy");
    static_assert(T::kThreads % T::kARowVecs == 0 && (T::kThreads / T::kARowVecs) % 8 == 0, "A copy");
    static constexpr int kBVecsPerThread = T::kBStageVecs / T::kThreads;
    static constexpr int kBRowsPerPass = T::kThreads / (T::kChunks * 32);   // k-tiles per pass
    static constexpr int kARowsPerPass = T::kThreads / T::kARowVecs;        // multiple of 8
    static constexpr int kAPasses = (T::kAStageVecs + T::kThreads - 1) / T::kThreads;
    static constexpr int kADstPerPass = T::kAAtomMajor ? kARowsPerPass * 8 : T::kThreads;

    const int4 *b_src0;
    const half *a_src0;
    const half *s_src0;
    long long b_row_vecs;   // a Marlin row: 2N words = N/2 int4
    uint64_t evict_first;
    int a_row0, a_dst0, a_rows_live, tid, K, N, group_shift;
    bool b_live, s_live;

    __device__ __forceinline__ StageCopy(const MmParams &p, const BlockWork &w, int t)
        : tid(t), K(p.K), N(p.N), group_shift(p.group_shift) {
        evict_first = evict_first_policy();
        b_row_vecs = p.N / 2;
        const int b_chunk = (t / 32) % T::kChunks;
        b_live = w.n0 + 64 * b_chunk < p.N;
        b_src0 = w.B + (long long)(t / (T::kChunks * 32)) * b_row_vecs + (w.n0 + 64 * b_chunk) / 2 + t % 32;
        a_row0 = t / T::kARowVecs;
        const int a_vec = t % T::kARowVecs;
        a_rows_live = min(T::kRows, p.M - w.m0);
        a_src0 = p.a + (long long)(w.m0 + a_row0) * p.K + 8 * a_vec;
        a_dst0 = T::kAAtomMajor
            ? (a_vec / 8) * (T::kRows * 8) + a_row0 * 8 + ((a_vec % 8) ^ (a_row0 & 7))
            : a_row0 * T::kARowVecs + (a_vec ^ (a_row0 & 7));
        const int s_rows = GROUPED ? ((1 << p.group_shift) >= T::TK ? 1 : (T::TK >> p.group_shift)) : 0;
        const int s_col = w.n0 + 8 * (t % (T::TN / 8));
        s_live = GROUPED && t < s_rows * (T::TN / 8) && s_col < p.N;
        s_src0 = w.S + (long long)(t / (T::TN / 8)) * p.N + s_col;
    }

    // The activations of k tile kt (what an earlier kernel on the stream may still be
    // writing). Rows past M are not loaded: whatever their shared memory holds only reaches
    // accumulator rows that are never written out (row m of C depends on row m of A alone).
    __device__ __forceinline__ void acts(int4 *a_stage, int kt) const {
        int4 *a_dst = a_stage + a_dst0;
        const half *a_src = a_src0 + kt * T::TK;
#pragma unroll
        for (int j = 0; j < kAPasses; ++j) {
            if (a_row0 + j * kARowsPerPass < a_rows_live)
                cp_async16_zfill(a_dst + j * kADstPerPass, a_src + (long long)j * kARowsPerPass * K, true);
        }
    }

    // The weights and scales of k tile kt (never written by any kernel during a call).
    __device__ __forceinline__ void weights(int4 *b_stage, int4 *s_stage, int kt) const {
        if (b_live) {
            int4 *b_dst = b_stage + tid;
            const int4 *b_src = b_src0 + (long long)kt * (T::TK / 16) * b_row_vecs;
#pragma unroll
            for (int j = 0; j < kBVecsPerThread; ++j)
                cp_async16_hint(b_dst + j * T::kThreads, b_src + j * kBRowsPerPass * b_row_vecs, evict_first);
        }
        if constexpr (GROUPED) {
            if (s_live)
                cp_async16_zfill(s_stage + tid, s_src0 + (long long)((kt * T::TK) >> group_shift) * N, true);
        }
    }
};

// The pipeline both kernels run: kAhead stages of A, B and scales in flight while one is
// computed, unrolled over the kStages shared-memory slots so that each slot's offsets are
// constants: iteration `it` computes slot it % kStages and refills slot (it + kAhead) % kStages.
// (At few rows the mma.sync kernel is bound by instruction issue, and the per-stage address
// arithmetic was a large share of it; the wgmma kernel keeps a stage's last wgmma in flight
// into the next stage, with no loop back edge in between.)
// Programmatic dependent launch (sm_90): the next kernel on the stream may launch at once, and
// (weights_early: unless the caller says the previous kernel may have written them) the weights
// of the prologue stages stream before the previous kernel has finished; A, C and the
// workspace are touched only after the wait. (Commit groups still complete in order: group
// 0 holds the weights of every prologue stage and the activations of stage 0.)
// ASYNC_PROXY: the tensor cores read the stages (wgmma), so the cp.async writes are fenced to
// the async proxy before the barrier. end_of_round() runs before each loop back edge.
template <int kStages, int kAhead, bool ASYNC_PROXY, class FetchActs, class FetchWeights, class Compute,
          class EndOfRound>
__device__ __forceinline__ void run_pipeline(int iters, int kt_begin, bool weights_early, FetchActs fetch_acts,
                                             FetchWeights fetch_weights, Compute compute_stage,
                                             EndOfRound end_of_round) {
    static_assert(kAhead >= 1 && kAhead < kStages, "stages in flight");
    grid_dependents_launch();
    if (weights_early) {
#pragma unroll
        for (int s = 0; s < kAhead; ++s)
            if (s < iters) fetch_weights(s, kt_begin + s);
    }
    grid_dependency_wait();
    if (!weights_early) {
#pragma unroll
        for (int s = 0; s < kAhead; ++s)
            if (s < iters) fetch_weights(s, kt_begin + s);
    }
#pragma unroll
    for (int s = 0; s < kAhead; ++s) {
        if (s < iters) fetch_acts(s, kt_begin + s);
        cp_async_commit();
    }
    for (int it0 = 0; it0 < iters; it0 += kStages) {
#pragma unroll
        for (int st = 0; st < kStages; ++st) {
            const int it = it0 + st;
            if (it < iters) {
                cp_async_wait<kAhead - 1>();   // stage `it` has landed (this thread's copies) ...
                if constexpr (ASYNC_PROXY) fence_proxy_async_shared();   // ... for the tensor cores ...
                __syncthreads();               // ... for every thread's copies; the slot to refill is free
                if (it + kAhead < iters) {
                    fetch_acts((st + kAhead) % kStages, kt_begin + it + kAhead);
                    fetch_weights((st + kAhead) % kStages, kt_begin + it + kAhead);
                }
                cp_async_commit();
                compute_stage(st, kt_begin + it);
            }
        }
        end_of_round();
    }
}

// Where the scale of original column n sits in a channelwise (one group) permuted row: within
// each 32 columns, permuted 8i + jj holds 2i + [0, 1, 8, 9, 16, 17, 24, 25][jj] (format.py).
__device__ __forceinline__ int channel_scale_index(int n) {
    const int x = n & 31;
    return (n & ~31) + 8 * ((x & 7) >> 1) + 2 * (x >> 3) + (x & 1);
}

// The block's FP32 C tile (ROWS x TN, row stride C_STRIDE floats, in shared memory, complete
// for every thread after a barrier) -> fp16 C. With split-K, either
//   * (cluster_reduce) the splits of the tile are one cluster: after a cluster barrier, block
//     q sums rows q, q + splits, ... of all the splits' tiles, read from their shared memory
//     (split 0, 1, 2, ... in order), and writes them; no workspace, and the reduction is
//     spread over the cluster instead of left to one block; or
//   * every block writes its partial to the workspace and bumps a per-tile counter; the block
//     that finds itself last sums the partials split 0, 1, 2, ... and writes C; no block
//     ever waits for another.
// Both sums are deterministic, and the same: 0 + p0 + p1 + ... in FP32. Channelwise scales
// multiply the FP32 sums here.
template <int ROWS, int TN, int C_STRIDE, int THREADS, bool GROUPED>
__device__ __forceinline__ void write_c_tile(const MmParams &p, const BlockWork &w,
                                             const float *ctile) {
    __shared__ int s_is_last;
    const int tid = threadIdx.x;
    const int rows = min(ROWS, p.M - w.m0);
    const int cols = min(TN, p.N - w.n0);
    half *const C = p.c + (long long)w.m0 * p.ldc + (long long)w.e_local * p.N + w.n0;
    constexpr int kVecsPerRow = TN / 8;   // 8 outputs (one 16-byte store) per vector

    auto store_out = [&](int r, int c8, float (&v)[8]) {
        if constexpr (!GROUPED) {
#pragma unroll
            for (int x = 0; x < 8; ++x)
                v[x] *= __half2float(w.S[channel_scale_index(w.n0 + c8 + x)]);
        }
        half2 h[4];
#pragma unroll
        for (int x = 0; x < 4; ++x) h[x] = __floats2half2_rn(v[2 * x], v[2 * x + 1]);
        *reinterpret_cast<int4 *>(C + (long long)r * p.ldc + c8) = *reinterpret_cast<int4 *>(h);
    };

    if (w.contributors == 1) {
        for (int i = tid; i < rows * kVecsPerRow; i += THREADS) {
            const int r = i / kVecsPerRow, c8 = 8 * (i % kVecsPerRow);
            if (c8 >= cols) continue;
            float v[8];
            const float4 lo = *reinterpret_cast<const float4 *>(&ctile[r * C_STRIDE + c8]);
            const float4 hi = *reinterpret_cast<const float4 *>(&ctile[r * C_STRIDE + c8 + 4]);
            v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
            v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
            store_out(r, c8, v);
        }
        return;
    }

    if (p.cluster_reduce) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        namespace cg = cooperative_groups;
        cg::cluster_group cluster = cg::this_cluster();
        cluster.sync();   // every split's C tile is complete in its shared memory
        const int my_rows = rows > w.split ? (rows - w.split + p.splits - 1) / p.splits : 0;
        for (int i = tid; i < my_rows * kVecsPerRow; i += THREADS) {
            const int r = w.split + p.splits * (i / kVecsPerRow), c8 = 8 * (i % kVecsPerRow);
            if (c8 >= cols) continue;
            float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int q = 0; q < kMaxClusterSplits; ++q) {   // fixed order: deterministic
                if (q >= p.splits) break;
                const float *src = cluster.map_shared_rank(ctile + r * C_STRIDE + c8, q);
                const float4 lo = *reinterpret_cast<const float4 *>(src);
                const float4 hi = *reinterpret_cast<const float4 *>(src + 4);
                v[0] += lo.x; v[1] += lo.y; v[2] += lo.z; v[3] += lo.w;
                v[4] += hi.x; v[5] += hi.y; v[6] += hi.z; v[7] += hi.w;
            }
            store_out(r, c8, v);
        }
        cluster.sync();   // no block leaves (freeing its shared memory) while others read it
#else
        __trap();   // the planner asks for clusters on sm_90 and later only
#endif
        return;
    }

    const int tile_id = w.m_slice + p.m_slices * w.ntile;
    const long long tile_floats = (long long)ROWS * TN;
    const long long num_tiles = (long long)p.m_slices * p.n_tiles_total;
    float *const mine = p.partials + ((long long)w.split * num_tiles + tile_id) * tile_floats;
    for (int i = tid; i < rows * kVecsPerRow; i += THREADS) {
        const int r = i / kVecsPerRow, c8 = 8 * (i % kVecsPerRow);
        if (c8 >= cols) continue;
        float4 *dst = reinterpret_cast<float4 *>(mine + r * TN + c8);
        __stcg(dst, *reinterpret_cast<const float4 *>(&ctile[r * C_STRIDE + c8]));
        __stcg(dst + 1, *reinterpret_cast<const float4 *>(&ctile[r * C_STRIDE + c8 + 4]));
    }
    __threadfence();   // our partial is visible device-wide before the counter says so
    __syncthreads();
    if (tid == 0) s_is_last = atomicAdd(&p.counters[tile_id], 1) == w.contributors - 1;
    __syncthreads();
    if (!s_is_last) return;
    __threadfence();
    // The serial tail of the reduction: each thread sums kBatch of its vectors at once, so
    // kBatch x 4 partial loads are in flight instead of a few (L2 latency, not bandwidth,
    // bounds this loop).
    constexpr int kBatch = ROWS >= 64 ? 4 : 2;
    for (int i0 = tid; i0 < rows * kVecsPerRow; i0 += kBatch * THREADS) {
        float v[kBatch][8];
#pragma unroll
        for (int u = 0; u < kBatch; ++u)
#pragma unroll
            for (int x = 0; x < 8; ++x) v[u][x] = 0.f;
#pragma unroll 4
        for (int s = 0; s < w.contributors; ++s) {   // fixed order: the sum is deterministic
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                const int i = i0 + u * THREADS;
                const int r = i / kVecsPerRow, c8 = 8 * (i % kVecsPerRow);
                if (i >= rows * kVecsPerRow || c8 >= cols) continue;
                const float4 *src = reinterpret_cast<const float4 *>(
                    p.partials + ((long long)s * num_tiles + tile_id) * tile_floats + r * TN + c8);
                const float4 lo = __ldcg(src), hi = __ldcg(src + 1);
                v[u][0] += lo.x; v[u][1] += lo.y; v[u][2] += lo.z; v[u][3] += lo.w;
                v[u][4] += hi.x; v[u][5] += hi.y; v[u][6] += hi.z; v[u][7] += hi.w;
            }
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            const int i = i0 + u * THREADS;
            const int r = i / kVecsPerRow, c8 = 8 * (i % kVecsPerRow);
            if (i < rows * kVecsPerRow && c8 < cols) store_out(r, c8, v[u]);
        }
    }
    if (tid == 0) p.counters[tile_id] = 0;   // ready for the next call on this workspace
}

// One compiled kernel instance: its address, its dynamic shared memory and its launcher.
struct KernelEntry {
    const void *fn;
    int smem_bytes;
    int (*launch)(const MmParams &, int grid, cudaStream_t stream, bool pdl, int smem_bytes);
};

// Launch `kernel` with programmatic dependent launch when asked (sm_90+), and the splits of
// each tile as one cluster when p.cluster_reduce; with smem_bytes dynamic shared memory where
// that is more than the kernel needs (a spread launch, ferrum_mm).
template <int THREADS, int SMEM_BYTES>
inline int launch_mm(void (*kernel)(const MmParams), const MmParams &p, int grid,
                     cudaStream_t stream, bool pdl, int smem_bytes) {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(grid);
    config.blockDim = dim3(THREADS);
    config.dynamicSmemBytes = smem_bytes > SMEM_BYTES ? smem_bytes : SMEM_BYTES;
    config.stream = stream;
    cudaLaunchAttribute attribute[2];
    int n = 0;
    if (pdl) {
        attribute[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attribute[n++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (p.cluster_reduce) {
        attribute[n].id = cudaLaunchAttributeClusterDimension;
        attribute[n].val.clusterDim.x = p.splits;
        attribute[n].val.clusterDim.y = 1;
        attribute[n++].val.clusterDim.z = 1;
    }
    config.attrs = attribute;
    config.numAttrs = n;
    FERRUM_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
    return FERRUM_OK;
}

// The wgmma kernel's entries (mm_wgmma.cu): tiles 4 (k=64), 5 (k=128) with 16 * m_blocks
// rows per block (m_blocks 1, 2, 4 or 8), 6 (k=128, up to 64 rows, two blocks per SM), 8
// (k=128 x n=128, the warpgroups splitting K; up to 64 rows), 9 (k=256 x n=64 likewise; 16 or
// 32 rows); stream_k: the instance that runs stream-K segments (tiles 5, 6, 8 and 9).
bool wgmma_built();
KernelEntry wgmma_entry(int tile, int m_blocks, bool grouped, int f32s_fold = 0, bool stream_k = false);
constexpr int kWgmmaTileN = 256;
constexpr int kWgmmaSplitTileN = 128;
constexpr int kWgmmaNarrowTileN = 64;

}  // namespace ferrum
