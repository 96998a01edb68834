"""The format rules every backend shares: GPTQ on-disk tensors and vLLM's gptq_marlin layout.

This module owns the layouts. Backends import the tables below; none of them re-derives a layout.
Everything here is plain numpy and doubles as the slow, obviously-correct reference.

GPTQ on disk
    qweight int32 [K/8, N]: bits 4i..4i+3 of qweight[r, n] hold q[8r + i, n] (uint4b8).
    scales  [K/G, N] float16/float32, one row per group (a single row when channelwise, G = -1).
    g_idx   int32 [K] (act-order checkpoints only): the group of each row.
    The weight is w[k, n] = (q[k, n] - 8) * scales[group(k), n].

Marlin (vLLM's gptq_marlin, 4 bits)
    int32 [K/16, 2N]. Row kt holds the 16 weight rows 16kt..16kt+15. Along the row, each chunk of 64
    columns takes 128 consecutive words; word w = 4*t + j of a chunk is what lane t of a warp loads
    for n-tile j (columns 16j..16j+15 of the chunk) when it builds the B fragment of an
    mma.m16n8k16: lane t owns k rows {r0, r0+1, r0+8, r0+9} (r0 = 2*(t % 4)) and columns
    {c, c+8} (c = t // 4) of that 16x16 tile. The eight nibbles of the word are ordered so that
    nibble pairs (0,4), (1,5), (2,6), (3,7) are the halves of the four 2xfp16 fragment registers
    after the lop3 dequantization trick: low nibbles give (r0, c), (r0+8, c), (r0, c+8), (r0+8, c+8)
    and nibbles 4..7 the same places one row down.
    With act-order the rows are taken in `perm` order before tiling: Marlin row k is GPTQ row
    perm[k], and mm permutes the activations' columns the same way.

Permuted scales (vLLM's marlin_permute_scales), [G, N] float16, a column permutation inside
    chunks: grouped (1 < groups) within each 64 columns, channelwise (one group) within each 32.
"""

from __future__ import annotations

import numpy as np

TILE = 16                 # Marlin tile edge: k rows per packed row, columns per n-tile
CHUNK_N = 64              # columns per 1024-value permutation chunk (4 n-tiles)
WORDS_PER_CHUNK = 128     # int32 words a 16x64 chunk packs into (1024 nibbles / 8)
PACK = 8                  # 4-bit values per int32
NUM_BITS = 4
MIN_K_MULTIPLE = 128
MIN_N_MULTIPLE = 64
GROUP_SIZES = (-1, 32, 64, 128)   # G == K is accepted too (one group, like -1)


def _chunk_nibble_positions() -> np.ndarray:
    """[128, 8] int: for word w of a 16x64 chunk and nibble s, the position 64*k + n it holds."""
    pos = np.empty((WORDS_PER_CHUNK, PACK), dtype=np.int32)
    # Nibble s -> (row offset from r0, column offset from c) inside the 16x16 n-tile.
    nibble_place = [(0, 0), (8, 0), (0, 8), (8, 8), (1, 0), (9, 0), (1, 8), (9, 8)]
    for t in range(32):
        r0, c = 2 * (t % 4), t // 4
        for j in range(4):
            for s, (dr, dc) in enumerate(nibble_place):
                pos[4 * t + j, s] = (r0 + dr) * CHUNK_N + 16 * j + c + dc
    return pos


#: CHUNK_POS[w, s] = 64*k + n: the place of nibble s of word w inside its 16x64 chunk.
CHUNK_POS = _chunk_nibble_positions()
#: Same information split into the k row (0..15) and the column (0..63).
CHUNK_ROW = (CHUNK_POS // CHUNK_N).astype(np.int32)
CHUNK_COL = (CHUNK_POS % CHUNK_N).astype(np.int32)


def _scale_perms() -> tuple[np.ndarray, np.ndarray]:
    # Grouped: permuted column 8i + j of a 64-chunk holds original column i + 8j, so that the
    # scales a thread needs for its n-tiles sit side by side. Channelwise: within 32 columns,
    # permuted 8i + jj holds 2i + [0, 1, 8, 9, 16, 17, 24, 25][jj].
    grouped = np.array([i + 8 * j for i in range(8) for j in range(8)], dtype=np.int64)
    single = np.array([2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)],
                      dtype=np.int64)
    return grouped, single


SCALE_PERM_GROUPED, SCALE_PERM_CHANNEL = _scale_perms()


def num_groups(size_k: int, group_size: int) -> int:
    return 1 if group_size in (-1, size_k) else size_k // group_size


def effective_group_size(size_k: int, group_size: int) -> int:
    """Rows per scale group: K for channelwise weights."""
    return size_k if group_size == -1 else group_size


def scale_column_perm(size_n: int, groups: int) -> np.ndarray:
    """[N] int: permuted scale column c holds original column perm[c] (same for every group row)."""
    base = SCALE_PERM_GROUPED if groups > 1 else SCALE_PERM_CHANNEL
    width = base.size
    return (np.arange(size_n // width)[:, None] * width + base[None, :]).reshape(-1)


def scale_column_inverse(size_n: int, groups: int) -> np.ndarray:
    """[N] int32: original column n lives at permuted column inv[n]."""
    perm = scale_column_perm(size_n, groups)
    inv = np.empty(size_n, dtype=np.int32)
    inv[perm] = np.arange(size_n, dtype=np.int32)
    return inv


# ----------------------------------------------------------------------------------------------
# Reference (numpy) implementations: the definition of the layouts, used by tests and as the
# fallback for host-side helpers. Backends have their own fast kernels.

def unpack_gptq(qweight: np.ndarray, size_k: int) -> np.ndarray:
    """GPTQ int32 [K/8, N] -> uint8 [K, N] of 4-bit values."""
    shifts = (np.arange(PACK, dtype=np.uint32) * NUM_BITS)[None, :, None]
    q = (qweight.view(np.uint32)[:, None, :] >> shifts) & 0xF
    return q.reshape(size_k, -1).astype(np.uint8)


def pack_gptq(q: np.ndarray) -> np.ndarray:
    """uint [K, N] of 4-bit values -> GPTQ int32 [K/8, N]."""
    size_k, size_n = q.shape
    q = q.astype(np.uint32).reshape(size_k // PACK, PACK, size_n)
    out = np.zeros((size_k // PACK, size_n), dtype=np.uint32)
    for i in range(PACK):
        out |= q[:, i, :] << (NUM_BITS * i)
    return out.view(np.int32)


def repack_reference(qweight: np.ndarray, size_k: int, size_n: int,
                     perm: np.ndarray | None = None) -> np.ndarray:
    q = unpack_gptq(qweight, size_k)
    if perm is not None:
        q = q[perm]
    chunks = q.reshape(size_k // TILE, TILE, size_n // CHUNK_N, CHUNK_N).transpose(0, 2, 1, 3)
    vals = chunks.reshape(size_k // TILE, size_n // CHUNK_N, TILE * CHUNK_N)[:, :, CHUNK_POS]
    vals = vals.astype(np.uint32)
    words = np.zeros(vals.shape[:3], dtype=np.uint32)
    for s in range(PACK):
        words |= vals[..., s] << (NUM_BITS * s)
    return words.reshape(size_k // TILE, 2 * size_n).view(np.int32)


def unpack_marlin_reference(marlin: np.ndarray, size_k: int, size_n: int) -> np.ndarray:
    """Marlin int32 [K/16, 2N] -> uint8 [K, N] (rows in Marlin, i.e. perm, order)."""
    words = marlin.view(np.uint32).reshape(size_k // TILE, size_n // CHUNK_N, WORDS_PER_CHUNK)
    shifts = (np.arange(PACK, dtype=np.uint32) * NUM_BITS)
    vals = (words[..., None] >> shifts) & 0xF
    flat = np.empty((size_k // TILE, size_n // CHUNK_N, TILE * CHUNK_N), dtype=np.uint8)
    flat[:, :, CHUNK_POS] = vals
    q = flat.reshape(size_k // TILE, size_n // CHUNK_N, TILE, CHUNK_N).transpose(0, 2, 1, 3)
    return q.reshape(size_k, size_n)


def permute_scales_reference(scales: np.ndarray, size_k: int, size_n: int,
                             group_size: int) -> np.ndarray:
    groups = num_groups(size_k, group_size)
    cols = scale_column_perm(size_n, groups)
    return np.ascontiguousarray(np.asarray(scales, dtype=np.float16)[:, cols])


def unpermute_scales(scales: np.ndarray, size_k: int, size_n: int, group_size: int) -> np.ndarray:
    groups = num_groups(size_k, group_size)
    return np.ascontiguousarray(scales[:, scale_column_inverse(size_n, groups)])


def act_order_perm(g_idx: np.ndarray) -> np.ndarray:
    """The Marlin row order for an act-order checkpoint: rows sorted by group, stable."""
    return np.argsort(g_idx, kind="stable").astype(np.int32)


def expert_perm(perm: np.ndarray | None, expert: int) -> np.ndarray | None:
    """A weight's act-order row order for one expert: its perm ([K]: a single layer's), its row
    `expert` ([E, K]: a stack whose experts each have their own), or None (no act-order)."""
    if perm is None or perm.ndim == 1:
        return perm
    return perm[expert]


def dequantize_reference(q: np.ndarray, scales: np.ndarray, size_k: int, group_size: int,
                         g_idx: np.ndarray | None = None) -> np.ndarray:
    """uint [K, N] values and unpermuted scales [groups, N] -> float64 [K, N] (GPTQ row order).

    Row k belongs to group g_idx[k] when given (act-order), else to k // group_size.
    """
    g = effective_group_size(size_k, group_size)
    groups = np.arange(size_k) // g if g_idx is None else np.asarray(g_idx)
    return (q.astype(np.float64) - 8.0) * np.asarray(scales, np.float64)[groups]
