/* ferrum_marlin.h -- the C API of ferrum's CUDA W4A16 library.
 *
 * Every function returns a FERRUM_* status code and never aborts. On failure,
 * ferrum_get_last_error() gives a message (thread-local) and, for CUDA failures,
 * ferrum_get_last_cuda_status() the cudaError_t value. Shapes are checked by the Python
 * front API before anything reaches here; the checks below are a second, cheap guard that
 * returns FERRUM_ERR_INVALID instead of launching a kernel on a bad problem.
 *
 * Layouts (see ferrum/format.py, which owns them):
 *   GPTQ qweight  int32 [K/8, N]      bits 4i..4i+3 of [r, n] hold row 8r+i
 *   Marlin        int32 [K/16, 2N]    16x64 chunks of 128 words, in mma.m16n8k16 fragment order
 *   scales        fp16  [groups, N]   permuted like vLLM's marlin_permute_scales
 *   stacked       Marlin [E, K/16, 2n], scales [E, groups, n]
 * All pointers are device pointers; "stream" is a cudaStream_t (NULL = legacy default).
 */
#ifndef FERRUM_MARLIN_H
#define FERRUM_MARLIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum ferrum_status {
    FERRUM_OK = 0,
    FERRUM_ERR_INVALID = 1,     /* bad argument: shape, alignment, unsupported option */
    FERRUM_ERR_CUDA = 2,        /* a CUDA call failed; the message carries CUDA's text */
    FERRUM_ERR_WORKSPACE = 3    /* workspace too small: the sizes needed are written back */
};

/* Tile choice for ferrum_mm. Zero fields are chosen by the heuristic (ferrum_mm_plan). */
typedef struct ferrum_mm_config {
    int tile;        /* 0 auto; mma.sync block tiles 1: k=128 x n=128, 2: k=128 x n=256,
                        3: k=64 x n=256, 7: k=256 x n=64 (K % 256 == 0); the wgmma kernel 4: k=64 x n=256, 5: k=128 x n=256,
                        6: k=128 x n=256 with two 64-row blocks per SM, 8: k=128 x n=128 with
                        the two warpgroups splitting K, 9: k=256 x n=64 likewise (compute
                        capability 9.0 with an sm_90a build only) */
    int m_blocks;    /* 0 auto; rows of 16 per block (a "slice" of M): 1..4; 4 or 8 for tile
                        4; 1, 2, 4 or 8 for tile 5; 1, 2 or 4 for tiles 6 and 8; 1 or 2 for
                        tile 9 */
    int splits;      /* 0 auto; >= 1: split-K factor (partials reduced in FP32, in order);
                        with stream-K, resolved to the most blocks that share one C tile */
    int weights_pending;  /* 0: b and scales were complete before the previous kernel on the
                        stream began, so on sm_90 the kernel may start reading them before that
                        kernel ends (programmatic dependent launch); 1: that kernel may have
                        written them, so they are read only after it has finished */
    int stream_k;    /* 0 auto; -1 off (split-K as `splits` says); 1 on: the (tile, k-tile)
                        iterations are cut into equal runs, one per block of one wave on the
                        GPU, a run crossing tile ends where it must (mma.sync tiles 1, 2, 3, 7
                        with m_blocks 1; wgmma tiles 5, 6, 8, 9); n >= 2: on, with n blocks.
                        Resolved: -1 or the blocks (grid) */
} ferrum_mm_config;

/* What ferrum_mm will do for a problem: the resolved config and the workspace it needs. */
typedef struct ferrum_mm_plan_info {
    ferrum_mm_config config;
    int m_slices;            /* slices of M processed by one launch, 16*m_blocks rows each */
    int grid;                /* thread blocks launched */
    size_t counter_bytes;    /* zero-initialised lock/counter buffer (ferrum leaves it zero) */
    size_t data_bytes;       /* FP32 split-K partials + the act-order permuted copy of A */
    int cluster_reduce;      /* 1: the splits of a C tile run as one thread block cluster and
                                add their partials through distributed shared memory (sm_90;
                                no partials in the workspace); FERRUM_NO_CLUSTER=1 turns it off */
    int sk_iters;            /* stream-K: (tile, k-tile) iterations per block; 0: split-K */
} ferrum_mm_plan_info;

const char *ferrum_get_last_error(void);
int ferrum_get_last_cuda_status(void);
const char *ferrum_version(void);

/* GPTQ int32 [K/8, N] -> Marlin int32 [K/16, 2N]; perm (int32 [K]) may be NULL. */
int ferrum_repack(const int32_t *gptq, const int32_t *perm, int32_t *marlin,
                  int size_k, int size_n, void *stream);

/* out[m, k] = a[m, perm[k]] for fp16 a [M, K] (the act-order gather). */
int ferrum_permute_cols(const void *a, const int32_t *perm, void *out,
                        int size_m, int size_k, void *stream);

/* dst (C-contiguous [d0, d1, d2] elements of elem_bytes bytes) = the elements of src at byte
 * offsets i0*s0 + i1*s1 + i2*s2 (strides of any sign; any alignment). A 2-D array is
 * d0 = 1; fewer dims likewise. Runs on `stream`. */
int ferrum_copy_strided(const void *src, void *dst, int64_t d0, int64_t d1, int64_t d2,
                        int64_t s0, int64_t s1, int64_t s2, int elem_bytes, void *stream);

/* The bench's bandwidth probes on the current device, queued on `stream`: with dst, copy
 * nbytes from src to dst; with dst NULL, read src only. 16-byte vectors, sm_blocks (1..8)
 * blocks of 256 threads an SM; nbytes a multiple of 16, both pointers 16-byte aligned. */
int ferrum_stream_probe(const void *src, void *dst, int64_t nbytes, int sm_blocks, void *stream);

/* Resolve the config and workspace sizes for ferrum_mm on the current device, for grouped
 * scales of 128 rows (on sm_90a ferrum_mm plans 2-16 rows differently for other scales). */
int ferrum_mm_plan(int size_m, int size_k, int size_n, int num_experts, int act_order,
                   const ferrum_mm_config *requested, ferrum_mm_plan_info *plan);

/* The same for the scales ferrum_mm is given: num_groups and group_size as ferrum_mm takes
 * them (num_groups 1: channelwise). */
int ferrum_mm_plan_groups(int size_m, int size_k, int size_n, int num_experts, int act_order,
                          int num_groups, int group_size, const ferrum_mm_config *requested,
                          ferrum_mm_plan_info *plan);

/* C[:, e*n:(e+1)*n] = A @ W_e for e in [expert0, expert0 + num_experts), fp16 in and out.
 *   a        fp16 [M, K] row-major (columns are permuted by perm first when perm != NULL)
 *   b        Marlin int32 of expert 0 of the stack, [E_total, K/16, 2n]
 *   scales   fp16 [E_total, groups, n]
 *   c        fp16 [M, ldc]; expert expert0+i writes columns i*n .. (i+1)*n
 *   group_size  rows per scale group; == size_k (or num_groups == 1) means channelwise
 * counters/data: the workspace (sizes from ferrum_mm_plan). If too small, returns
 * FERRUM_ERR_WORKSPACE and writes the sizes needed into *plan_out (when not NULL). */
int ferrum_mm(const void *a, const void *b, const void *scales, void *c, const int32_t *perm,
              int size_m, int size_k, int size_n, int expert0, int num_experts,
              int num_groups, int group_size, int ldc,
              const ferrum_mm_config *requested,
              void *counters, size_t counter_bytes, void *data, size_t data_bytes,
              ferrum_mm_plan_info *plan_out, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* FERRUM_MARLIN_H */
