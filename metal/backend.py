"""The metal backend: WGSL compute shaders run by wgpu (Metal on macOS, Vulkan elsewhere).

Host side of the kernels in this folder. Shapes are classified in one place, ``_kernel_for``:

    M <= VECTOR_MAX_M   gemv.wgsl   stream the packed weight once per M_TILE rows, split over k
    M >  VECTOR_MAX_M   tiled.wgsl  register-blocked 16 TM x 64 tiles (TM = 2, 4, 8 by M), A and
                                    dequantized B staged in workgroup memory

Both write fp32 partial sums per k-split ("slot") into a scratch buffer, and reduce.wgsl adds the
slots and writes fp16; with one k-split (and one weight piece) the kernel writes C itself.
Everything a call needs (bind groups, uniform parameters, dispatch grids) is planned once per
(weight, M, expert) and cached in ``weight._aux``; workspace buffers (A, scratch, C, read-back)
are kept by the backend and only grow.

Storage bindings are limited (``maxStorageBufferBindingSize``, 128 MiB on many adapters): a
weight whose experts or kt rows do not fit one binding is cut into pieces, each bound as its own
range of the one weight buffer and dispatched separately into its own scratch slots. Where whole
rows (of the weight, A or C) do not fit, ``_window_layout`` cuts the weight into windows of kt
rows x 64-column multiples, A along k and C into column blocks (the k-pieces adding into the
same scratch slots where need be); repack splits along K as well as N. So no weight is refused
for the binding limit, down to its minimum of 1024 bytes. The limit the planner uses is
``MetalBackend.binding_limit`` (FERRUM_METAL_BINDING_LIMIT overrides it), so tests can exercise
the split paths on small weights.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferrum import format as F
from ferrum._registry import Backend, BackendInfo

try:  # importing this module must never fail: info() reports a missing wgpu instead
    import wgpu
    _WGPU_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the machine
    wgpu = None
    _WGPU_ERROR = f"wgpu is not importable ({type(exc).__name__}: {exc}); pip install wgpu"

HERE = Path(__file__).resolve().parent

#: Oldest wgpu-py whose shader compiler (naga in wgpu-native 26) takes gemv.wgsl: older ones
#: reject ``select`` in a const expression. pyproject.toml's metal extra asks for the same.
MIN_WGPU = (0, 26)


def _version_tuple(text: str) -> tuple[int, ...]:
    """(0, 26, 1) from "0.26.1" (a piece's leading digits; parsing stops at one without)."""
    parts = []
    for piece in text.split("."):
        digits = piece[:len(piece) - len(piece.lstrip("0123456789"))]
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _env(name: str, parse, rule: str):
    """Environment variable ``name`` parsed by ``parse``, None when unset; a ValueError naming
    the variable, its value and ``rule`` when parse rejects it (raises or returns None)."""
    raw = os.environ.get(name, "")
    if not raw:
        return None
    try:
        value = parse(raw.strip())
    except (TypeError, ValueError):
        value = None
    if value is None:
        raise ValueError(f"{name}={raw!r}: {rule}")
    return value


def _int_at_least(low: int):
    return lambda text: int(text) if int(text) >= low else None


def _int_in(low: int, high: int):
    return lambda text: int(text) if low <= int(text) <= high else None


def _flag(text: str):
    return {"0": False, "1": True, "false": False, "true": True, "off": False, "on": True,
            "no": False, "yes": True}.get(text.lower())


_FLAG_RULE = "must be 0 or 1 (or false/true, off/on, no/yes)"


#: Largest M served by the vector kernel (gemv.wgsl); larger M uses the tiled kernel.
VECTOR_MAX_M = 16
#: Rows of A one gemv workgroup handles (the kernel keeps M_TILE x 8 accumulators per lane). At
#: M = 16 two m-tiles of 8 rows beat one of 16 on an H100 (Vulkan): 8192x57344 757 against 834
#: µs, 4096x6144 63 against 101 (tools/metal_sweep.py small): the kernel is bound by fp32
#: arithmetic there, and 16 rows of accumulators (128 registers a lane) halve the warps an SM
#: holds. The m-tiles of a chunk are launched side by side, so the second can find the weight in
#: cache.
VECTOR_M_TILE = 8
#: Quads (16-byte loads) each gemv lane keeps in flight, by M_TILE. More is no faster on an H100
#: (M = 1: 1 or 2 best, 4 a few % slower, 8 up to 40% slower: code size and registers), and
#: none matters once the rows' arithmetic dominates.
GEMV_LOADS = {1: 2, 2: 1, 4: 1, 8: 1, 16: 1}
#: Largest FERRUM_METAL_GEMV_LOADS: gemv.wgsl repeats its per-quad step once per load, so a
#: large value only grows the shader (8 was already up to 40% slower on the H100; 200 took 94 s
#: to build on lavapipe, a million never finished).
MAX_GEMV_LOADS = 16
#: Share of the workgroup target gemv aims for, by M_TILE: fewer, longer k-splits were faster on
#: an H100 as M grows (the k-split's partial sums and their reduction cost more rows), e.g.
#: 8192x8192 M=16 128 µs at ~256 workgroups against 151 at ~1024; M=1 best at ~512.
GEMV_TARGET_SHARE = {1: 0.5, 2: 0.5, 4: 0.25, 8: 0.25, 16: 0.25}
#: k-slots per gemv workgroup (32 invocations each): more, in fewer workgroups, would let one
#: workgroup cover all of k (gemv writes C, no reduce pass) and still fill a large GPU.
GEMV_K_SLOTS = 8
#: M = 1 when the chunk workgroups number between these shares of the workgroup target (96 to
#: 128 of an H100's 1024): 32 k-slots a workgroup and no k-split, so gemv writes C itself (no
#: reduce pass, ~10 µs on the H100) and the 1024-invocation workgroups still fill the GPU in one
#: wave (H100: 8192x8192 31.4 against 35.8 µs, 28672x8192 81.8 against 90.1, 4096x6144 22.3
#: against 30.3; with fewer chunks SMs idle, with more a second wave: 8192x10240's 160 chunks
#: 53.9 against 42.5).
GEMV_WIDE_SHARE = (3 / 32, 1 / 8)
#: Workgroups a dispatch aims for when choosing the k-split (enough to fill a large GPU); on a
#: CPU adapter (lavapipe) every workgroup costs scheduling, and a few per core are enough.
TARGET_WORKGROUPS = 1024
TARGET_WORKGROUPS_CPU = 32
#: gemv scales the dequantized pairs once (shared by the rows) above this M_TILE, and at or
#: below it takes uint4b8's 72 out of the column sums (fewer multiplies: H200, M = 1 3-10%
#: faster). Those sums round at the size of 72 |a| rather than of the result, so mm takes them
#: only for rows of A that _column_sums_fit; other rows are prescaled at every M_TILE.
PRESCALE_FROM_M_TILE = 2
#: _column_sums_fit: rows of A may use the column sums when they are finite and no |a| exceeds
#: COLUMN_SUM_SPAN times the median of the row's |a| (zeros included). A value of that size on a
#: zero weight (where it adds nothing) rounds its quad's sum at ~72 x 4 x 64 x median x 2^-24 =
#: 1e-3 median, against a column whose ordinary terms (at least half the row is >= the median)
#: add up to ~4.6 sqrt(K / 2) median s: a relative 3e-5 at K = 128 even if a sixteenth of the row
#: is that large. A row mostly of zeros has no such terms to outweigh that rounding (ReLU-like
#: activations: two 3e4 values on zero weights and one N(0, 1) value in their quads gave 2e-2 when
#: the median was taken over the nonzero |a| only), so it is prescaled unless it is all zeros.
#: The median must itself be within COLUMN_SUM_SPAN times the row's |a| a sixteenth of the way up
#: (N(0, 1): 8.6 times): when half the row or more is large, the median is one of the large
#: values, and on zero weights they left no ordinary terms of its size (6e4 on every other row,
#: all q = 8, N(0, 1) elsewhere: 5e-2). A row more than 15/16 large still passes.
COLUMN_SUM_SPAN = 64
#: tiled.wgsl: rows per invocation (TM; a workgroup's tile is 16 TM rows x 64 columns) by the
#: largest M of the m-block it serves, and k per step (BK) by TM. Larger tiles reuse each
#: dequantized weight and each A value for more fmas; smaller ones waste less on rows past M.
#: H100 (Vulkan, tools/metal_sweep.py kernels, k loop as a WGSL loop): M=64 8192x8192 TM=4 BK=16
#: 547 µs, BK=32 601, TM=8 872 (half its rows wasted), TM=2 809; M=256 TM=8 BK=16 1724, BK=32
#: 1905, TM=4 2114. Written out (TILED_UNROLL): M=32 TM=2 317 against TM=4 424, M=64 TM=4
#: BK=16 440 against BK=32 474.
TILED_TM = ((32, 2), (64, 4), (1 << 30, 8))
TILED_BK = {2: 32, 4: 16, 8: 16}
#: tiled.wgsl's loop over the BK k of a step written out by the host (constant workgroup-memory
#: offsets, loads free to move ahead of the fmas) instead of a WGSL loop: 10-25% faster on every
#: bench shape on the H100 (8192x8192 M=32 317 against 417 µs, M=64 440 against 544, M=256 1481
#: against 1723).
TILED_UNROLL = True
#: Share of the workgroup target the tiled kernel's k-split aims for.
TILED_TARGET_SHARE = 0.5
#: Workgroup memory every kernel keeps within: WebGPU's guaranteed minimum (Apple GPUs and
#: lavapipe offer 32 KiB; a tile that needs more is used only where the device allows it).
WORKGROUP_STORAGE = 16384
#: Workgroups per grid dimension WebGPU guarantees (maxComputeWorkgroupsPerDimension).
MAX_GRID = 65535
#: Largest FERRUM_METAL_TARGET_WORKGROUPS: the workgroups one dispatch can hold. The planner
#: scales the target by float shares, so an integer past float range failed every mm.
MAX_TARGET_WORKGROUPS = MAX_GRID ** 3
#: C columns a reduce.wgsl workgroup writes (256 invocations, two columns each).
REDUCE_COLUMNS = 2 * 256
#: Seconds mm's wait polls the device without blocking before it blocks in the driver (a GPU
#: adapter; a CPU adapter blocks at once). FERRUM_METAL_SPIN_US overrides it (0: always block).
SPIN_SECONDS = 0.005
#: Units of work (passes, copies) per command buffer when the bench times a batch (_batch).
BATCH_UNITS = 32
#: Plans kept per weight (one per distinct M and expert), and per expert of a stack (a
#: mixture-of-experts layer calls each expert at many M); the least recently used goes first.
PLANS_PER_WEIGHT = 64
PLANS_PER_EXPERT = 16

# ------------------------------------------------------------------------------------------------
# Uniform parameters: one struct shared by gemv, tiled and reduce; the WGSL text is generated
# from this list so host and shaders cannot disagree on the layout.
PARAM_FIELDS = (
    "M",            # rows of A in this m-block
    "K",            # halves per row of A in the A workspace (size_k, or a k-piece's width)
    "n",            # columns per expert
    "n_total",      # columns per row of C and of a scratch slot (n, E*n for all experts, or
                    # a column block's width)
    "kt_begin",     # first kt row (within the expert) of this weight piece
    "kt_count",     # kt rows in this piece
    "kt_per_split",
    "splits",       # k-splits of this dispatch (reduce: slots to add)
    "group_shift",  # log2(kt rows per scale group) (grouped weights: 2, 4 or 8 kt rows)
    "g_begin",      # first scale group held by the scale binding
    "w_base",       # u32 offset of the piece in the weight binding
    "w_expert",     # u32 words between experts
    "s_base",       # half offset of the piece's first scale row in the scale binding
    "s_expert",     # halves between experts
    "a_base",       # u32 offset of the piece's first k of the m-block's first row in the A
                    # binding (tiled indexes A by kt within the piece); for gemv, which
                    # indexes it by kt within the expert, that less kt_begin * 8, modulo 2^32
    "col_base",     # column of C where this piece's first expert starts
    "slot_base",    # first scratch slot of this piece
    "slot_stride",  # fp32 values per scratch slot (M * n_total)
    "out_base",     # fp32 offset of slot 0 in the scratch binding
    "c_base",       # u32 offset of the m-block in the C binding (reduce)
)
_PARAM_WORDS = 4 * math.ceil(len(PARAM_FIELDS) / 4)
PARAMS_WGSL = "struct Params {\n" + "".join(f"    {f}: u32,\n" for f in PARAM_FIELDS) + "".join(
    f"    _pad{i}: u32,\n" for i in range(_PARAM_WORDS - len(PARAM_FIELDS))) + "}"


def _pack_params(**values) -> np.ndarray:
    words = np.zeros(_PARAM_WORDS, dtype=np.uint32)
    for name, value in values.items():
        words[PARAM_FIELDS.index(name)] = value
    return words


# ------------------------------------------------------------------------------------------------
# Layout facts the kernels rely on, read from ferrum.format (the one owner of the format) and
# checked here, once, at import.

def _layout_tables() -> dict[str, str]:
    row, col = F.CHUNK_ROW, F.CHUNK_COL
    dr, dc = row[0], col[0]
    for t in range(32):
        for j in range(4):
            w = 4 * t + j
            assert (row[w] == 2 * (t % 4) + dr).all() and (col[w] == 16 * j + t // 4 + dc).all()
    # nibbles p and p + 4 are the same column, k rows r and r + 1 (one fp16 pair of A)
    assert (row[0, 4:] == dr[:4] + 1).all() and (col[0, 4:] == dc[:4]).all()
    pair = {(int(dr[p]), int(dc[p])): p for p in range(4)}
    assert set(pair) == {(0, 0), (8, 0), (0, 8), (8, 8)}
    inv_grouped = F.scale_column_inverse(64, 2)
    inv_channel = F.scale_column_inverse(64, 1)
    # gemv's single vec4 scale load: columns 16j + c + 8h sit at permuted 8c + 2j + h
    for c in range(8):
        for j in range(4):
            for h in range(2):
                assert inv_grouped[16 * j + c + 8 * h] == 8 * c + 2 * j + h

    # scale_pos(col): where column col of a 64-column chunk finds its scale in a permuted row
    # (tiled.wgsl and gemv.wgsl compute it; no per-invocation table), checked against format.
    def grouped_pos(col):
        return 8 * (col % 8) + 2 * (col // 16) + (col // 8) % 2

    def channel_pos(col):
        return 32 * (col // 32) + 8 * ((col % 8) // 2) + 2 * ((col // 8) % 4) + col % 2
    for col in range(64):
        assert grouped_pos(col) == inv_grouped[col] and channel_pos(col) == inv_channel[col]
    grouped_fn = ("fn scale_pos(col: u32) -> u32 {\n"
                  "    return 8u * (col % 8u) + 2u * (col / 16u) + (col / 8u) % 2u;\n}")
    channel_fn = ("fn scale_pos(col: u32) -> u32 {\n"
                  "    return 32u * (col / 32u) + 8u * ((col % 8u) / 2u) + 2u * ((col / 8u) % 4u)"
                  " + col % 2u;\n}")

    def arr(name, values, kind="private"):
        body = ", ".join(f"{int(v)}u" for v in values)
        return f"var<{kind}> {name}: array<u32, {len(values)}> = array<u32, {len(values)}>({body});"

    common = "\n".join([
        arr("NIB_DR", dr[:4]), arr("NIB_DC", dc[:4]),
        f"const NIB_PAIR_LO_H0: u32 = {pair[(0, 0)]}u;",
        f"const NIB_PAIR_HI_H0: u32 = {pair[(8, 0)]}u;",
        f"const NIB_PAIR_LO_H1: u32 = {pair[(0, 8)]}u;",
        f"const NIB_PAIR_HI_H1: u32 = {pair[(8, 8)]}u;",
    ])
    return {"grouped": common + "\n" + arr("SCALE_POS", inv_grouped) + "\n" + grouped_fn,
            "channel": common + "\n" + arr("SCALE_POS", inv_channel) + "\n" + channel_fn}


TABLES = _layout_tables()


def _repack_tables() -> str:
    """repack.wgsl's nibble placement: nibble s of word w = 4t + j of a chunk holds k row
    2 (t % 4) + CHUNK_DR[s] and column 16 j + t / 4 + CHUNK_DC[s] (eight entries each, not a
    1024-entry table in a storage binding: that alone would exceed a small binding limit)."""
    dr, dc = F.CHUNK_ROW[0], F.CHUNK_COL[0]
    t, j = np.divmod(np.arange(F.CHUNK_ROW.shape[0]), 4)
    assert (F.CHUNK_ROW == 2 * (t % 4)[:, None] + dr[None, :]).all()
    assert (F.CHUNK_COL == (16 * j + t // 4)[:, None] + dc[None, :]).all()
    return "\n".join(f"var<private> {name}: array<u32, 8> = array<u32, 8>("
                     f"{', '.join(f'{int(v)}u' for v in values)});"
                     for name, values in (("CHUNK_DR", dr), ("CHUNK_DC", dc)))


REPACK_TABLES = _repack_tables()


def _gemv_blocks(m_tile: int, loads: int, k_slots: int,
                 accumulate: bool = False) -> dict[str, str]:
    """The generated, unrolled parts of gemv.wgsl for M_TILE = m_tile rows, LOADS = loads quads
    in flight per lane and K_SLOTS = k_slots: accumulators and A offsets per row, the loads, the
    per-row statements that accumulate one quad and reduce the tile. With ``accumulate`` the
    partial sums are added to what the scratch slot holds (a later weight piece along k, when
    every piece's own slots would not fit one binding) instead of replacing it."""
    decl, acc, red = [], [], []
    for m in range(m_tile):
        decl.append(f"    var acc{m}a = vec4<f32>(0.0);\n    var acc{m}b = vec4<f32>(0.0);\n"
                    f"    let arow{m} = min(m0 + {m}u, P.M - 1u) * a_row;")
        # PRESCALE: the scaled weights of the quad times A, straight into the accumulators (one
        # fma per weight and row: the least arithmetic a row can cost); else the column sums of
        # the quad's 64 + q, started at -72 x the row's sum over the four k rows, are scaled
        # once per row (fewer multiplies when only 1 or 2 rows share them).
        acc.append(
            f"        {{\n"
            f"            let al = unpack2x16float(A[a_k + arow{m}]);\n"
            f"            let ah = unpack2x16float(A[a_k + arow{m} + 4u]);\n"
            f"            if (PRESCALE) {{\n"
            f"                acc{m}a = fma(w.a0, vec4<f32>(al.x), acc{m}a);\n"
            f"                acc{m}a = fma(w.a1, vec4<f32>(al.y), acc{m}a);\n"
            f"                acc{m}a = fma(w.a8, vec4<f32>(ah.x), acc{m}a);\n"
            f"                acc{m}a = fma(w.a9, vec4<f32>(ah.y), acc{m}a);\n"
            f"                acc{m}b = fma(w.b0, vec4<f32>(al.x), acc{m}b);\n"
            f"                acc{m}b = fma(w.b1, vec4<f32>(al.y), acc{m}b);\n"
            f"                acc{m}b = fma(w.b8, vec4<f32>(ah.x), acc{m}b);\n"
            f"                acc{m}b = fma(w.b9, vec4<f32>(ah.y), acc{m}b);\n"
            f"            }} else {{\n"
            f"                let bias = vec4<f32>(-72.0 * ((al.x + al.y) + (ah.x + ah.y)));\n"
            f"                acc{m}a = fma(sa, fma(q.a9, vec4<f32>(ah.y), fma(q.a8, vec4<f32>(ah.x),\n"
            f"                          fma(q.a1, vec4<f32>(al.y), fma(q.a0, vec4<f32>(al.x), bias)))),\n"
            f"                          acc{m}a);\n"
            f"                acc{m}b = fma(sb, fma(q.b9, vec4<f32>(ah.y), fma(q.b8, vec4<f32>(ah.x),\n"
            f"                          fma(q.b1, vec4<f32>(al.y), fma(q.b0, vec4<f32>(al.x), bias)))),\n"
            f"                          acc{m}b);\n"
            f"            }}\n"
            f"        }}")
        red.append(
            f"    {{\n"
            f"        var ra = acc{m}a;\n"
            f"        var rb = acc{m}b;\n"
            f"        if (SUBGROUPS) {{\n"
            f"            ra += subgroupShuffleXor(ra, 1u);\n"
            f"            ra += subgroupShuffleXor(ra, 2u);\n"
            f"            rb += subgroupShuffleXor(rb, 1u);\n"
            f"            rb += subgroupShuffleXor(rb, 2u);\n"
            f"        }}\n"
            f"        for (var half = K_SLOTS / 2u; half >= FINAL_SLOTS; half = half / 2u) {{\n"
            f"            workgroupBarrier();\n"
            f"            if (slot >= half && slot < 2u * half) {{\n"
            f"                red[((slot - half) * 32u + lane) * 2u] = ra;\n"
            f"                red[((slot - half) * 32u + lane) * 2u + 1u] = rb;\n"
            f"            }}\n"
            f"            workgroupBarrier();\n"
            f"            if (slot < half) {{\n"
            f"                ra += red[(slot * 32u + lane) * 2u];\n"
            f"                rb += red[(slot * 32u + lane) * 2u + 1u];\n"
            f"            }}\n"
            f"        }}\n"
            f"        workgroupBarrier();\n"
            f"        if (slot < FINAL_SLOTS) {{\n"
            f"            red[(slot * 32u + lane) * 2u] = ra;\n"
            f"            red[(slot * 32u + lane) * 2u + 1u] = rb;\n"
            f"        }}\n"
            f"        workgroupBarrier();\n"
            f"        let row = m0 + {m}u;\n"
            f"        if (DIRECT) {{\n"
            f"            if (li < 32u && row < P.M) {{\n"
            f"                OUT[P.c_base + (row * P.n_total + col_out) / 2u + li] = pack2x16float(\n"
            f"                    vec2<f32>(column_sum(col_a), column_sum(col_a + 1u)) * scale);\n"
            f"            }}\n"
            f"        }} else if (li < 64u && row < P.M) {{\n"
            + (f"            let at = slot_at + row * P.n_total + col_out + li;\n"
               f"            OUT[at] = bitcast<u32>(bitcast<f32>(OUT[at]) + column_sum(col_a) * scale.x);\n"
               if accumulate else
               f"            OUT[slot_at + row * P.n_total + col_out + li] =\n"
               f"                bitcast<u32>(column_sum(col_a) * scale.x);\n")
            + f"        }}\n"
            f"    }}")
    xs = range(loads)
    load_decl = ("".join(f"    var xn{u} = vec4<u32>(0u);\n" for u in xs)
                 + "    if (kt < kt_hi) {\n"
                 + "".join(f"        xn{u} = W[w_at + min(kt + K_SLOTS * {u}u, kt_last) * w_row];\n"
                           for u in xs) + "    }")
    load_next = ("".join(f"        let x{u} = xn{u};\n" for u in xs)
                 + "        if (kt_next < kt_hi) {\n"
                 + "".join(f"            xn{u} = W[w_at + min(kt_next + K_SLOTS * {u}u, kt_last)"
                           f" * w_row];\n"
                           for u in xs) + "        }")
    return {"ACC_DECL": "\n".join(decl), "ACCUMULATE": "\n".join(acc), "REDUCE": "\n".join(red),
            "LOAD_DECL": load_decl, "LOAD_NEXT": load_next, "LOADS": loads, "K_SLOTS": k_slots,
            "WORKGROUP_SIZE": 32 * k_slots, "RED_VEC4S": 64 * max(8, k_slots // 2)}


def _tiled_blocks(tm: int, bk: int, unroll: bool = False,
                  accumulate: bool = False) -> dict[str, str]:
    """The generated, unrolled parts of tiled.wgsl for TM = tm rows per invocation and BK = bk:
    the accumulators (one vec4 of 4 columns per row), the multiply stage (a loop over k whose
    body is the fmas of one k, or with ``unroll`` every k written out) and the writes (with
    ``accumulate`` added to what the scratch slot holds, as in _gemv_blocks)."""
    aw = min(tm, 4)
    decl = "\n".join(f"    var acc{r} = vec4<f32>(0.0);" for r in range(tm))

    def one_k(k: str, pad: str) -> list[str]:
        lines = [f"{pad}let b = Bs[{k} * 16u + tn];",
                 f"{pad}let a_at = ({k} * BM + tm * TM) / AW;"]
        lines += [f"{pad}let a{i} = As[a_at + {i}u];" for i in range(tm // aw)]
        lines += [f"{pad}acc{r} = fma(vec4<f32>(a{r // aw}.{'xyzw'[r % aw]}), b, acc{r});"
                  for r in range(tm)]
        return lines
    if unroll:
        fma = []
        for k in range(bk):
            fma += ["        {"] + one_k(f"{k}u", "            ") + ["        }"]
    else:
        fma = (["        for (var k = 0u; k < BK; k++) {"] + one_k("k", "            ")
               + ["        }"])
    write = []
    for r in range(tm):
        write.append(
            f"    {{\n"
            f"        let row = m0 + tm * TM + {r}u;\n"
            f"        if (row < P.M) {{\n"
            f"            if (DIRECT) {{\n"
            f"                let at = P.c_base + (row * P.n_total + col_out) / 2u;\n"
            f"                OUT[at] = pack2x16float(acc{r}.xy);\n"
            f"                OUT[at + 1u] = pack2x16float(acc{r}.zw);\n"
            f"            }} else {{\n"
            f"                let at = slot_at + row * P.n_total + col_out;\n"
            + "".join(f"                OUT[at{off}] = bitcast<u32>(bitcast<f32>(OUT[at{off}])"
                      f" + acc{r}.{c});\n" if accumulate else
                      f"                OUT[at{off}] = bitcast<u32>(acc{r}.{c});\n"
                      for off, c in (("", "x"), (" + 1u", "y"), (" + 2u", "z"), (" + 3u", "w")))
            + 
            f"            }}\n"
            f"        }}\n"
            f"    }}")
    return {"TM": tm, "BK": bk, "AW": aw, "AS_LEN": bk * 16 * tm // aw, "BS_LEN": bk * 16,
            "ACC_DECL": decl, "FMA": "\n".join(fma), "WRITE": "\n".join(write)}


def _tiled_storage(tm: int, bk: int) -> int:
    """Bytes of workgroup memory tiled.wgsl takes for TM = tm, BK = bk (As + Bs, fp32)."""
    return (16 * tm + 64) * bk * 4


def _gemv_source(**subs) -> str:
    """gemv.wgsl with its per-quad step (between the step markers) repeated once per load."""
    text = _shader_source("gemv.wgsl", **subs)
    begin = text.index("        //@step-begin\n")
    end = text.index("        //@step-end\n") + len("        //@step-end\n")
    step = text[begin:end]
    steps = "".join(step.replace("XQ", f"x{u}").replace("KTQ", f"(kt + K_SLOTS * {u}u)")
                    for u in range(int(subs["LOADS"])))
    return text[:begin] + steps + text[end:]


def _shader_source(name: str, **subs) -> str:
    text = (HERE / name).read_text()
    subs.setdefault("PARAMS", PARAMS_WGSL)
    for key, value in subs.items():
        text = text.replace("{{" + key + "}}", str(value))
    return text


# ------------------------------------------------------------------------------------------------
# Resident arrays


class MetalArray:
    """A wgpu storage buffer holding one C-contiguous array (shape and dtype kept beside it)."""

    def __init__(self, buffer, shape, dtype):
        self.buffer = buffer
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"MetalArray(shape={self.shape}, dtype={self.dtype})"


@dataclass
class _Dispatch:
    pipeline: object
    bind_group: object
    grid: tuple[int, int, int]


@dataclass
class _Plan:
    generation: int
    dispatches: list
    out_bytes: int
    a_bytes: int
    summary: str = ""       # e.g. "gemv m8 k16": kernel, rows per workgroup, k-splits (bench)
    upload: _Staging = None  # mapped upload buffer for A (a size class of a_bytes)
    read: _Staging = None   # read-back buffer for C (a size class of out_bytes)
    raw: list = None        # (pipeline, bind group, grid) as wgpu-native handles (_Native)
    column_sums: bool = False  # some gemv dispatch takes the 72 out of the column sums
    a_block: tuple = None   # (kw, k-pieces): A goes up as [k-piece][m][kw] (_Layout.blocked_a)
    col_blocks: list = None     # [(first column, width, offset)]: C comes back in column blocks

    def __post_init__(self):
        self.raw = [(d.pipeline._internal, d.bind_group._internal, tuple(int(g) for g in d.grid))
                    for d in self.dispatches]


@dataclass
class _Layout:
    """How _make_plan cuts a call into dispatches that each bind at most the binding limit."""
    m_block: int            # rows of A per m-block
    k_pieces: int           # weight pieces along k (per column block)
    kt_block: int           # kt rows per k-piece
    width: int              # columns of C per row of a scratch slot (the widest column block)
    # column blocks of C: (first column of C, width, offset in the C workspace in halves,
    # pieces), each piece (first expert, experts, kt_begin, kt_count, k-piece, first column
    # within the expert, columns, column of the block where the piece starts)
    blocks: list
    target_experts: int = 1     # experts the k-split's workgroup target counts
    blocked_a: bool = False     # A in the workspace as [k-piece][m][kt_block * 16]
    blocked_c: bool = False     # C in the workspace as [column block][m][width]
    accumulate: bool = False    # k-pieces add into the same scratch slots


class _Staging:
    """A host-visible buffer mm moves data through: "upload" (MAP_WRITE | COPY_SRC: A is written
    into its mapping and copied to the A workspace on the GPU) or "read" (MAP_READ | COPY_DST: C
    is copied into it and read from its mapping). An upload buffer is mapped again as soon as the
    call that used it is submitted, so the next call finds it mapped (the map resolves when that
    submission is done, which the call waits for anyway) and writes A with one memmove: no staging
    buffer created per call, as queue.write_buffer does inside wgpu."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.size = buffer.size
        self.request = 0            # map request pending on the buffer (0: none)
        self.mapped = False         # mapped for writing, ready


class _Native:
    """mm's per-call path straight through wgpu-native's C API (wgpu-py's ``ffi``/``lib``).

    wgpu-py's Python wrappers cost more than the work they wrap at small M: ``map_async`` builds
    a promise, wakes wgpu-py's poll thread and (in READ mode) submits an extra empty command
    buffer; the result then comes back through a thread hand-off; every encoder call goes
    through an error-capturing proxy. Here the encoder calls are made directly, buffers are
    mapped with one callback made once (each request numbered, so an answer cannot be taken for
    another's), and completion is waited for on the calling thread: ``wgpuDevicePoll`` without
    blocking in a loop (a GPU: no driver sleep on the fence) for up to ``spin_seconds``, then
    blocking (a CPU adapter such as lavapipe: spinning would take a core from the threads
    running the kernel, so spin_seconds is 0 there). finish and submit keep wgpu-py's
    error-raising wrappers (``libf``), so an invalid command still raises.
    Built only when its self-test passes; otherwise mm uses wgpu-py's public API.
    """

    def __init__(self, device, spin_seconds: float):
        from wgpu.backends.wgpu_native import _api
        self.ffi, self.lib, self.libf = _api.ffi, _api.lib, _api.libf
        ffi, lib = self.ffi, self.lib
        self.device_id = device._internal
        self.queue_id = device.queue._internal
        self.spin_seconds = spin_seconds
        self._enc_desc = ffi.new("WGPUCommandEncoderDescriptor *")
        self._pass_desc = ffi.new("WGPUComputePassDescriptor *")
        self._finish_desc = ffi.new("WGPUCommandBufferDescriptor *")
        self._cmds = ffi.new("WGPUCommandBuffer[1]")
        self._wanted = set()        # map requests someone will wait for
        self._done = {}             # map request number -> status, filled by the callback
        self._requests = 0
        wanted, done = self._wanted, self._done

        @ffi.callback("void(WGPUMapAsyncStatus, WGPUStringView, void *, void *)")
        def mapped(status, message, userdata1, userdata2):
            request = int(ffi.cast("uintptr_t", userdata1))
            if request in wanted:   # an abandoned request's answer is dropped
                done[request] = int(status)

        self._callback = mapped     # kept alive as long as this object
        info = ffi.new("WGPUBufferMapCallbackInfo *")
        info.mode = lib.WGPUCallbackMode_AllowProcessEvents
        info.callback = mapped
        self._map_info = info
        self._map_read = lib.WGPUMapMode_Read
        self._map_write = lib.WGPUMapMode_Write
        self._success = lib.WGPUMapAsyncStatus_Success

    def run(self, dispatches, writes, copy, read_bytes, upload=None):
        """Write the uploads ``writes`` [(buffer, numpy array)] through the queue, or ``upload``
        (a _Staging upload buffer, numpy array, destination buffer) through a mapped buffer; run
        ``dispatches`` [(pipeline, bind group, grid)] in one compute pass, copy ``copy`` (src,
        dst read buffer, bytes), submit, wait and map the read buffer; returns the mapped bytes
        (a cffi buffer, valid until ``unmap``)."""
        ffi, lib = self.ffi, self.lib
        for buffer, array in writes:
            lib.wgpuQueueWriteBuffer(self.queue_id, buffer._internal, 0, ffi.from_buffer(array),
                                     array.nbytes)
        if upload is not None:
            up, array, dst = upload
            self._write_mapped(up, array)
        enc = lib.wgpuDeviceCreateCommandEncoder(self.device_id, self._enc_desc)
        try:
            if upload is not None:
                lib.wgpuCommandEncoderCopyBufferToBuffer(enc, up.buffer._internal, 0,
                                                         dst._internal, 0, array.nbytes)
            cp = lib.wgpuCommandEncoderBeginComputePass(enc, self._pass_desc)
            for pipe, group, (x, y, z) in dispatches:
                lib.wgpuComputePassEncoderSetPipeline(cp, pipe)
                lib.wgpuComputePassEncoderSetBindGroup(cp, 0, group, 0, ffi.NULL)
                lib.wgpuComputePassEncoderDispatchWorkgroups(cp, x, y, z)
            lib.wgpuComputePassEncoderEnd(cp)
            lib.wgpuComputePassEncoderRelease(cp)
            src, staging, nbytes = copy
            lib.wgpuCommandEncoderCopyBufferToBuffer(enc, src._internal, 0, staging._internal, 0,
                                                     nbytes)
            cmd = self.libf.wgpuCommandEncoderFinish(enc, self._finish_desc)
        finally:
            lib.wgpuCommandEncoderRelease(enc)
        try:
            self._cmds[0] = cmd
            self.libf.wgpuQueueSubmit(self.queue_id, 1, self._cmds)
        finally:
            lib.wgpuCommandBufferRelease(cmd)
        if upload is not None:      # mapped again for the next call once this one is done
            up.request = self._map_async(up.buffer, self._map_write, up.size)
        return self.map(staging, read_bytes)

    def _write_mapped(self, up: _Staging, array: np.ndarray):
        """Copy array into the upload buffer's mapping (mapping it first if it is not) and unmap."""
        ffi, lib = self.ffi, self.lib
        if up.request:
            request, up.request = up.request, 0
            self._wait(request, up.buffer)
            up.mapped = True
        if not up.mapped:
            self._wait(self._map_async(up.buffer, self._map_write, up.size), up.buffer)
            up.mapped = True
        ptr = lib.wgpuBufferGetMappedRange(up.buffer._internal, 0, up.size)
        if ptr == ffi.NULL:
            raise RuntimeError("the upload buffer has no mapped range")
        ffi.memmove(ptr, ffi.from_buffer(array), array.nbytes)
        up.mapped = False
        lib.wgpuBufferUnmap(up.buffer._internal)

    def _map_async(self, buffer, mode, nbytes) -> int:
        self._requests += 1
        request = self._requests            # the callback says which request it answers
        self._wanted.add(request)
        self._map_info.userdata1 = self.ffi.cast("void *", request)
        self.lib.wgpuBufferMapAsync(buffer._internal, mode, 0, nbytes, self._map_info[0])
        return request

    def _wait(self, request: int, buffer) -> None:
        """Poll until map request ``request`` (on ``buffer``) is answered; raise if it failed."""
        ffi, lib = self.ffi, self.lib
        done = self._done
        try:
            if request not in done and self.spin_seconds > 0:
                clock = time.perf_counter
                deadline = clock() + self.spin_seconds
                while request not in done and clock() < deadline:
                    lib.wgpuDevicePoll(self.device_id, 0, ffi.NULL)
            while request not in done:
                lib.wgpuDevicePoll(self.device_id, 1, ffi.NULL)
        except BaseException:               # e.g. KeyboardInterrupt: leave the buffer unmapped
            self._wanted.discard(request)
            lib.wgpuBufferUnmap(buffer._internal)
            raise
        self._wanted.discard(request)
        status = done.pop(request)
        if status != self._success:
            raise RuntimeError(f"could not map a staging buffer (status {status})")

    def map(self, staging, nbytes):
        """Map [0, nbytes) of a MAP_READ buffer once the queue's work is done; the bytes."""
        ffi, lib = self.ffi, self.lib
        self._wait(self._map_async(staging, self._map_read, nbytes), staging)
        ptr = lib.wgpuBufferGetConstMappedRange(staging._internal, 0, nbytes)
        if ptr == ffi.NULL:
            lib.wgpuBufferUnmap(staging._internal)
            raise RuntimeError("the read-back buffer has no mapped range")
        return ffi.buffer(ffi.cast("char *", ptr), nbytes)

    def unmap(self, staging):
        self.lib.wgpuBufferUnmap(staging._internal)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _column_sums_fit(a: np.ndarray) -> bool:
    """Whether gemv may take uint4b8's 72 out of the column sums for every row of a: each quad
    is summed as sum(a (64 + q)) - 72 sum(a), which rounds at the size of 72 |a|, so a large value
    on a zero weight (q = 8; 6e4 among N(0, 1) values) would round the other terms of its quad
    away, and an inf gives inf - inf. Rows with an inf or NaN, or with a |a| above
    COLUMN_SUM_SPAN times the median of their |a| (zeros included: a sparse row has too few
    ordinary terms to outweigh the rounding), or with a median above COLUMN_SUM_SPAN times their
    |a| a sixteenth of the way up (half the row or more is large: the median is one of them), are
    prescaled instead: fma(64 + q, s, -72 s) is
    exactly (q - 8) s, and each product rounds as in a plain fp32 dot product. (A median, not a
    mean: a few large values must not raise their own bound.)"""
    # |a| as fp16 bits, which order as the values do (-0 becomes 0)
    magnitudes = np.ascontiguousarray(a, dtype=np.float16).view(np.uint16) & np.uint16(0x7FFF)
    magnitudes = magnitudes.reshape(-1, a.shape[-1])
    peak = magnitudes.max(axis=1)
    if (peak >= 0x7C00).any():      # inf or NaN
        return False
    half, sixteenth = magnitudes.shape[1] // 2, magnitudes.shape[1] // 16
    # Two selections, the second among the lower half only: numpy's partition at two ranks at
    # once took 10-20x as long (8192 uint16 a row: 320 µs against 28, on the host's call path).
    ranked = np.partition(magnitudes, half, axis=1)
    lower = np.partition(ranked[:, :half], sixteenth, axis=1)
    low, median, peak = (x.view(np.float16).astype(np.float32)
                         for x in (lower[:, sixteenth], ranked[:, half], peak))
    return bool(((peak <= COLUMN_SUM_SPAN * median) & (median <= COLUMN_SUM_SPAN * low)).all())


def _a_for(plan: _Plan, a: np.ndarray) -> np.ndarray:
    """A as the plan's dispatches read it from the A workspace: as it is ([m][K]), or cut along
    k into the plan's k-pieces, [k-piece][m][kw] (the last piece's columns past K left zero)."""
    if plan.a_block is None:
        return a
    kw, pieces = plan.a_block
    m = a.shape[0]
    blocked = np.zeros((pieces, m, kw), np.float16)
    for p in range(pieces):
        part = a[:, p * kw:(p + 1) * kw]
        blocked[p, :, :part.shape[1]] = part
    return blocked


def _read_c(plan: _Plan, raw, m: int, out):
    """C from the read-back bytes raw (the plan's C workspace): [m][n_total] as it is, or
    gathered from the plan's column blocks ([block][m][width]); into out, or a new array."""
    flat = np.frombuffer(raw, np.float16)
    if plan.col_blocks is None:
        result = flat.reshape(m, -1)
        if out is None:
            return result.copy()
        out[...] = result
        return out
    if out is None:
        out = np.empty((m, plan.out_bytes // (2 * m)), np.float16)
    for col0, width, offset in plan.col_blocks:
        out[:, col0:col0 + width] = flat[offset:offset + m * width].reshape(m, width)
    return out


def _record_plan(encoder, plan) -> None:
    """One compute pass running the plan's dispatches (kernel pieces, then the reduction)."""
    cp = encoder.begin_compute_pass()
    for d in plan.dispatches:
        cp.set_pipeline(d.pipeline)
        cp.set_bind_group(0, d.bind_group)
        cp.dispatch_workgroups(*d.grid)
    cp.end()


class MetalBackend(Backend):
    name = "metal"

    def __init__(self):
        self._lock = threading.RLock()
        self._state = None          # BackendInfo once probed
        self.device = None
        self.adapter = None
        self.subgroups = False
        self.timestamps = False     # the device writes GPU timestamps inside passes
        self.binding_limit = 0      # bytes one storage binding may span (the planner's limit)
        self.target_workgroups = TARGET_WORKGROUPS
        self.vector_m_tile = VECTOR_M_TILE
        self.gemv_loads = 0         # 0: GEMV_LOADS's choice; else quads in flight per gemv lane
        self.gemv_k_slots = GEMV_K_SLOTS   # k-slots (32 invocations each) per gemv workgroup
        self.gemv_wide = True       # M = 1: 32 k-slots, no k-split where GEMV_WIDE_SHARE says
        self.tiled_tm = 0           # 0: TILED_TM's choice; else tiled.wgsl's rows per invocation
        self.tiled_bk = 0           # 0: TILED_BK's choice; else tiled.wgsl's k per step
        self.tiled_unroll = TILED_UNROLL   # tiled.wgsl's k loop written out (generated)
        self.workgroup_storage = WORKGROUP_STORAGE   # bytes of workgroup memory, this device
        self.max_invocations = 256  # per workgroup, on this device
        self.offset_alignment = 256
        self._pipelines: dict = {}
        self._work: dict[str, object] = {}
        self._stagings: dict[tuple[str, int], _Staging] = {}
        self._planned = weakref.WeakSet()     # weights holding plans (trim drops the plans)
        self.mapped_upload = True   # A through a mapped upload buffer (else queue.write_buffer)
        self._generation = 0
        self._native = None         # _Native once its self-test passed
        if hasattr(os, "register_at_fork"):
            forget = weakref.WeakMethod(self._after_fork_in_child)
            os.register_at_fork(after_in_child=lambda: forget() and forget()())

    def _after_fork_in_child(self) -> None:
        """A forked child cannot use the parent's GPU device (wgpu's and the driver's threads
        and mappings do not survive fork(): its first call would wait forever), so the backend
        says so instead, and every call raises with that reason."""
        state = self._state
        if state is not None and state.available:
            self._state = BackendInfo(
                "metal", False, "this process was forked from one that had opened the GPU "
                "device, which does not survive fork(); start worker processes with "
                "multiprocessing's 'spawn' or 'forkserver' method (a MarlinWeight pickles)")
            self._native = None

    # --- device -----------------------------------------------------------------------------------
    def info(self) -> BackendInfo:
        with self._lock:
            if self._state is None:
                try:
                    self._state = self._open()
                except Exception as exc:
                    self._state = BackendInfo("metal", False, f"{type(exc).__name__}: {exc}")
            return self._state

    def _open(self) -> BackendInfo:
        if wgpu is None:
            return BackendInfo("metal", False, _WGPU_ERROR)
        if () < _version_tuple(wgpu.__version__) < MIN_WGPU:     # () when unparsable: let it try
            return BackendInfo("metal", False, f"wgpu-py {wgpu.__version__} is older than "
                               f"{'.'.join(map(str, MIN_WGPU))}, whose shader compiler ferrum's "
                               "kernels need; pip install -U wgpu")
        adapters = wgpu.gpu.enumerate_adapters_sync()
        want = "Metal" if sys.platform == "darwin" else "Vulkan"
        native = [a for a in adapters if a.info.get("backend_type") == want]
        if not native:
            seen = ", ".join(f"{a.info.get('device')} ({a.info.get('backend_type')})"
                             for a in adapters) or "none"
            return BackendInfo("metal", False, f"no {want} adapter found by wgpu (adapters: {seen})")
        rank = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}
        choice = os.environ.get("FERRUM_METAL_ADAPTER", "")
        if choice:
            named = [a for a in native if choice.lower() in a.info.get("device", "").lower()]
            if not named:
                seen = ", ".join(repr(a.info.get("device")) for a in native)
                return BackendInfo("metal", False, f"FERRUM_METAL_ADAPTER={choice!r} matches no "
                                   f"{want} adapter (there are: {seen})")
            native = named
        adapter = min(native, key=lambda a: rank.get(a.info.get("adapter_type"), 4))
        limits = adapter.limits
        features = ["subgroup"] if "subgroup" in adapter.features else []
        # GPU timestamps between dispatches, for pass_gpu_seconds (tools; mm does not use them)
        timestamps = [f for f in ("timestamp-query", "timestamp-query-inside-passes")
                      if f in adapter.features]
        self.timestamps = len(timestamps) == 2
        wanted = {k: limits[k] for k in ("max-storage-buffer-binding-size", "max-buffer-size",
                                         "max-compute-workgroup-storage-size",
                                         "max-compute-invocations-per-workgroup",
                                         "max-compute-workgroup-size-x") if k in limits}
        device = adapter.request_device_sync(
            required_features=features + (timestamps if self.timestamps else []),
            required_limits=wanted)
        self.adapter, self.device = adapter, device
        dl = device.limits
        self.offset_alignment = int(dl.get("min-storage-buffer-offset-alignment", 256))
        self.max_buffer_size = int(dl["max-buffer-size"])
        self.binding_limit = int(dl["max-storage-buffer-binding-size"])
        self.max_invocations = min(int(dl.get("max-compute-invocations-per-workgroup", 256)),
                                   int(dl.get("max-compute-workgroup-size-x", 256)))
        override = _env("FERRUM_METAL_BINDING_LIMIT", _int_at_least(1024),
                        "must be a number of bytes, at least 1024")
        if override is not None:
            self.binding_limit = min(self.binding_limit, override)
        self.workgroup_storage = int(dl.get("max-compute-workgroup-storage-size", 16384))
        if self.workgroup_storage < WORKGROUP_STORAGE:
            return BackendInfo("metal", False, "adapter offers < 16 KiB of workgroup storage")
        self.subgroups = "subgroup" in features and self._subgroups_work()
        cpu = adapter.info.get("adapter_type") == "CPU"
        self.target_workgroups = TARGET_WORKGROUPS_CPU if cpu else TARGET_WORKGROUPS
        # Tuning knobs (for a given GPU, without editing the source); a bad value is an error
        # that names the variable, and leaves the backend unavailable with it as the reason.
        target = _env("FERRUM_METAL_TARGET_WORKGROUPS", _int_in(1, MAX_TARGET_WORKGROUPS),
                      f"must be a positive integer up to {MAX_TARGET_WORKGROUPS}")
        if target is not None:
            self.target_workgroups = target
        loads = _env("FERRUM_METAL_GEMV_LOADS", _int_in(0, MAX_GEMV_LOADS),
                     f"must be an integer from 0 to {MAX_GEMV_LOADS} (0: the table's choice)")
        if loads is not None:
            self.gemv_loads = loads
        unroll = _env("FERRUM_METAL_TILED_UNROLL", _flag, _FLAG_RULE)
        if unroll is not None:
            self.tiled_unroll = unroll
        k_slots = _env("FERRUM_METAL_GEMV_K_SLOTS", lambda t: int(t) if int(t) in (8, 16, 32)
                       else None, "must be 8, 16 or 32")
        if k_slots is not None:
            self.gemv_k_slots = k_slots
        native = _env("FERRUM_METAL_NATIVE", _flag, _FLAG_RULE)
        spin = _env("FERRUM_METAL_SPIN_US", lambda t: float(t) if float(t) >= 0 else None,
                    "must be a number of microseconds >= 0")
        self._native = None if native is False else self._native_path(
            spin * 1e-6 if spin is not None else 0.0 if cpu else SPIN_SECONDS)
        name = adapter.info.get("device", "?")
        api = adapter.info.get("backend_type", "?")
        native_version = getattr(wgpu.backends.wgpu_native, "__version__", "?")
        version = (f"wgpu-py {wgpu.__version__}, wgpu-native {native_version}, "
                   f"subgroups {'on' if self.subgroups else 'off'}, "
                   f"mm path {'native' if self._native else 'wgpu-py'}")
        return BackendInfo("metal", True, "", f"{name} via {api}", version)

    def _subgroups_work(self) -> bool:
        """The gemv reduction shuffles across lanes t ^ 1 and t ^ 2: check that really happens."""
        src = """
@group(0) @binding(0) var<storage, read_write> o: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32) {
    let a = subgroupShuffleXor(li, 1u);
    let b = subgroupShuffleXor(li, 2u);
    o[li] = select(0u, 1u, a == (li ^ 1u) && b == (li ^ 2u));
}"""
        try:
            pipe = self._compile(src)
            buf = self._buffer(1024)
            bg = self._bind_group(pipe, [(buf, 0, 1024)])
            enc = self.device.create_command_encoder()
            cp = enc.begin_compute_pass()
            cp.set_pipeline(pipe)
            cp.set_bind_group(0, bg)
            cp.dispatch_workgroups(1)
            cp.end()
            self.device.queue.submit([enc.finish()])
            return bool(np.frombuffer(self.device.queue.read_buffer(buf), np.uint32).all())
        except Exception:
            return False

    def _native_path(self, spin_seconds: float):
        """A _Native for mm when wgpu-native's C API is reachable and a round trip through it
        (upload, copy, map, read) returns what was written; else None."""
        try:
            native = _Native(self.device, spin_seconds)
            src = self._buffer(256)
            staging = self.device.create_buffer(
                size=256, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
            ok = True
            for seed in (1, 2):
                data = (np.arange(64, dtype=np.uint32) * 2654435761 + seed).astype(np.uint32)
                raw = native.run([], [(src, data)], (src, staging, 256), 256)
                try:
                    ok = ok and bytes(raw) == data.tobytes()
                finally:
                    native.unmap(staging)
            src.destroy()
            staging.destroy()
            return native if ok else None
        except Exception:
            return None

    def _ready(self):
        status = self.info()
        if not status.available:
            raise RuntimeError(f"metal backend is not available: {status.reason}")

    def _compile(self, source: str):
        module = None
        errors = []
        for prefix in ("", "enable subgroups;\n"):   # naga versions differ on the enable line
            try:
                module = self.device.create_shader_module(code=prefix + source)
                break
            except Exception as exc:
                errors.append(exc)
        if module is None:      # both failed: the first error is about the shader itself
            raise RuntimeError(f"the WGSL shader did not compile: {errors[0]}\n(and with "
                               f"'enable subgroups;' first: {errors[1]})") from errors[0]
        return self.device.create_compute_pipeline(
            layout="auto", compute={"module": module, "entry_point": "main"})

    def _pipeline(self, name: str, **subs):
        key = (name, tuple(sorted(subs.items())))
        if key not in self._pipelines:
            source = _gemv_source(**subs) if name == "gemv.wgsl" else _shader_source(name, **subs)
            self._pipelines[key] = self._compile(source)
        return self._pipelines[key]

    def _buffer(self, nbytes: int, usage=None):
        if usage is None:
            usage = (wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC
                     | wgpu.BufferUsage.COPY_DST)
        return self.device.create_buffer(size=max(16, _round_up(nbytes, 16)), usage=usage)

    def _uniform(self, words: np.ndarray):
        buf = self.device.create_buffer(
            size=words.nbytes, usage=wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST)
        self.device.queue.write_buffer(buf, 0, words)
        return buf

    def _bind_group(self, pipeline, entries):
        """entries: (buffer, byte offset, byte size) in binding order; the first may be uniform."""
        return self.device.create_bind_group(
            layout=pipeline.get_bind_group_layout(0),
            entries=[{"binding": i, "resource": {"buffer": b, "offset": int(o), "size": int(s)}}
                     for i, (b, o, s) in enumerate(entries)])

    def _range(self, buffer, offset: int, nbytes: int, unit: int):
        """Bind [offset, offset + nbytes) of buffer: the range starts at an aligned offset below,
        and the returned base (in ``unit``-byte elements) says where the data begins in it."""
        start = offset - offset % self.offset_alignment
        size = min(_round_up(offset + nbytes - start, 16), buffer.size - start)
        return (buffer, start, size), (offset - start) // unit

    def _usable_limit(self) -> int:
        """Bytes of data one binding may carry once _range has aligned its start down and
        rounded its size up."""
        return self.binding_limit - self.offset_alignment - 16

    def _staging(self, kind: str, nbytes: int) -> _Staging:
        """The "upload" or "read" staging buffer for nbytes: one of each kind, sized to a power
        of two at least the largest transfer so far (a call maps only the bytes it moves). When
        it grows, the smaller one goes, and plans bound to it bind again (a new generation)."""
        size = max(256, 1 << (max(nbytes, 1) - 1).bit_length())
        if size > self.max_buffer_size:     # the class past the adapter's largest: just enough
            size = _round_up(nbytes, 256)
        held = [key for key in self._stagings if key[0] == kind]
        if held and held[0][1] >= size:
            return self._stagings[held[0]]
        for key in held:
            del self._stagings[key]
            self._generation += 1
        usage = (wgpu.BufferUsage.MAP_WRITE | wgpu.BufferUsage.COPY_SRC if kind == "upload"
                 else wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        staging = _Staging(self.device.create_buffer(size=size, usage=usage))
        self._stagings[(kind, size)] = staging
        return staging

    def trim(self) -> None:
        """Let go of the workspaces and staging buffers. They grow to the largest call so far
        and are kept for the calls after it; after one unusually large call, trim() returns
        that memory, and the next call makes them anew at its own size."""
        with self._lock:
            self._work.clear()
            self._stagings.clear()
            self._generation += 1
            for weight in list(self._planned):      # their plans bind the old buffers
                weight._aux.pop("metal_plans", None)

    def _fits_one_buffer(self, what: str, nbytes: int) -> None:
        """ValueError (before any GPU work) when nbytes, as workspaces and staging buffers round
        it, exceed the adapter's largest buffer."""
        if _round_up(nbytes, 256) > self.max_buffer_size:
            raise ValueError(f"{what} needs a buffer of {nbytes} bytes, more than this adapter's "
                             f"largest buffer ({self.max_buffer_size} bytes)")

    def _workspace(self, name: str, nbytes: int, usage=None):
        buf = self._work.get(name)
        if buf is None or buf.size < nbytes:
            # doubling (fewer re-plans as M grows), but never past the adapter's largest buffer
            doubled = min(2 * buf.size if buf is not None else 0,
                          self.max_buffer_size // 256 * 256)
            grown = _round_up(max(nbytes, doubled), 256)
            if usage is not None:
                buf = self.device.create_buffer(size=grown, usage=usage)
            else:
                buf = self._buffer(grown)
            self._work[name] = buf
            self._generation += 1
        return buf

    # --- memory -----------------------------------------------------------------------------------
    def from_host(self, array: np.ndarray) -> MetalArray:
        self._ready()
        array = np.ascontiguousarray(array)
        if array.nbytes > self.max_buffer_size:
            raise ValueError(f"array of {array.nbytes} bytes exceeds this adapter's largest "
                             f"buffer ({self.max_buffer_size} bytes)")
        buf = self._buffer(array.nbytes)
        data = array.view(np.uint8).reshape(-1)
        if data.size % 4:
            data = np.concatenate([data, np.zeros(4 - data.size % 4, np.uint8)])
        if data.size:
            self.device.queue.write_buffer(buf, 0, data)
        return MetalArray(buf, array.shape, array.dtype)

    def to_host(self, resident: MetalArray) -> np.ndarray:
        self._ready()
        nbytes = resident.nbytes
        if nbytes == 0:
            return np.empty(resident.shape, resident.dtype)
        raw = self.device.queue.read_buffer(resident.buffer, 0, _round_up(nbytes, 4))
        return np.frombuffer(raw, np.uint8)[:nbytes].view(resident.dtype).reshape(
            resident.shape).copy()

    def owns(self, array) -> bool:
        return isinstance(array, MetalArray)

    # --- repack -----------------------------------------------------------------------------------
    def repack(self, qweight, perm, size_k: int, size_n: int) -> MetalArray:
        self._ready()
        if isinstance(qweight, MetalArray):
            qweight = self.to_host(qweight)
        qweight = np.ascontiguousarray(qweight).view(np.uint32)
        with self._lock:
            return self._repack(qweight, perm, size_k, size_n)

    def _repack(self, qweight, perm, size_k, size_n):
        kt_rows = size_k // F.TILE
        word_rows = size_k // F.PACK
        row_bytes = 2 * size_n * 4              # one kt row of Marlin words
        limit = self._usable_limit()
        # A destination window of kt rows [kt0, kt0 + c) x nb columns spans (c - 1) full rows and
        # 8 bytes a column: at least one 64-column chunk of one kt row must fit.
        dst_cols = (limit // 8) // F.CHUNK_N * F.CHUNK_N
        if dst_cols < F.CHUNK_N:
            raise ValueError(f"repack of K={size_k}, N={size_n}: the binding limit "
                             f"({self.binding_limit} bytes) holds less than one 16 x 64 Marlin "
                             f"chunk ({8 * F.CHUNK_N} bytes)")
        self._fits_one_buffer(f"repack of K={size_k}, N={size_n}", kt_rows * row_bytes)
        # A window's workgroups are its chunks x its kt rows: each at most a dispatch's MAX_GRID.
        dst_cols = min(dst_cols, MAX_GRID * F.CHUNK_N)
        full_k_cols = (limit // (word_rows * 4)) // F.CHUNK_N * F.CHUNK_N
        if full_k_cols >= F.CHUNK_N:
            # Source blocks of nb columns and all K rows, which act-order may read in any order:
            # the perm is applied by the kernel, from the rows of it the window needs.
            nb = min(size_n, full_k_cols, dst_cols)
            kt_block = min(kt_rows, (limit - 8 * nb) // row_bytes + 1, MAX_GRID)
            blocks = [(n0, kt0, 0, word_rows) for n0 in range(0, size_n, nb)
                      for kt0 in range(0, kt_rows, kt_block)]
        else:
            # Not even 64 columns of all K rows fit one binding: split along K too, each source
            # block holding just the word rows its window reads (2 a kt row). Act-order would
            # read any row, so its perm is applied here on the host first (the same nibbles
            # moved, so the result is the same bits).
            if perm is not None:
                qweight = F.pack_gptq(F.unpack_gptq(qweight, size_k)[perm]).view(np.uint32)
                perm = None
            nb = min(size_n, dst_cols)
            kt_block = max(1, min(kt_rows, limit // (8 * nb), (limit - 8 * nb) // row_bytes + 1,
                                  MAX_GRID))
            blocks = [(n0, kt0, 2 * kt0, 2 * min(kt_block, kt_rows - kt0))
                      for kt0 in range(0, kt_rows, kt_block) for n0 in range(0, size_n, nb)]
        # All source blocks back to back in one buffer, each [rows, width] contiguous.
        if len(blocks) == 1 or (blocks[0][3] == word_rows and nb == size_n):
            src_host, offsets = qweight, [0] * len(blocks)
        else:
            pieces, offsets, seen, at = [], [], {}, 0
            for n0, _, r0, rows in blocks:
                key = (n0, r0, rows)
                if key not in seen:
                    seen[key] = at
                    piece = qweight[r0:r0 + rows, n0:n0 + min(nb, size_n - n0)]
                    pieces.append(piece.reshape(-1))
                    at += piece.size
                offsets.append(seen[key])
            src_host = np.concatenate(pieces)
        src = self.from_host(src_host)
        dst = self._buffer(kt_rows * row_bytes)
        perm_buf = self.from_host(np.zeros(1, np.uint32) if perm is None
                                  else np.ascontiguousarray(perm, dtype=np.uint32))
        pipe = self._pipeline("repack.wgsl", CHUNK_TABLES=REPACK_TABLES)
        enc = self.device.create_command_encoder()
        cp = enc.begin_compute_pass()
        cp.set_pipeline(pipe)
        keep = []
        for (n0, kt0, r0, rows), offset in zip(blocks, offsets):
            width = min(nb, size_n - n0)
            count = min(kt_block, kt_rows - kt0)
            src_entry, src_base = self._range(src.buffer, 4 * offset, 4 * rows * width, 4)
            dst_entry, dst_base = self._range(dst, kt0 * row_bytes + 8 * n0,
                                              (count - 1) * row_bytes + 8 * width, 4)
            if perm is None:
                perm_entry, perm_base = (perm_buf.buffer, 0, perm_buf.buffer.size), 0
            else:
                perm_entry, perm_base = self._range(perm_buf.buffer, 4 * F.TILE * kt0,
                                                    4 * F.TILE * count, 4)
            params = np.array([size_n, width, F.TILE * kt0 - F.PACK * r0, perm is not None,
                               dst_base, perm_base, src_base, 0], dtype=np.uint32)
            ubuf = self._uniform(params)
            keep.append(ubuf)
            cp.set_bind_group(0, self._bind_group(pipe, [(ubuf, 0, ubuf.size), src_entry,
                                                         perm_entry, dst_entry]))
            cp.dispatch_workgroups(width // F.CHUNK_N, count, 1)
        cp.end()
        self.device.queue.submit([enc.finish()])
        return MetalArray(dst, (kt_rows, 2 * size_n), np.int32)

    # --- mm ---------------------------------------------------------------------------------------
    def mm(self, a, weight, expert, out, **options):
        self._ready()
        if isinstance(a, MetalArray):
            a = self.to_host(a)
        a = np.asarray(a)
        if weight.perm is not None and weight.perm.ndim == 2 and expert is None:
            # a stack whose experts each have their own act-order: one expert a call, each
            # with A in its order, side by side in C
            n = weight.size_n
            if out is None:
                out = np.empty((a.shape[0], n * weight.num_experts), dtype=np.float16)
            for e in range(weight.num_experts):
                out[:, e * n:(e + 1) * n] = self.mm(a, weight, e, None)
            return out
        perm = F.expert_perm(weight.perm, 0 if expert is None else expert)
        if perm is not None:
            a = a[:, perm]                  # Marlin rows are in perm order: permute A's columns
        a = np.ascontiguousarray(a, dtype=np.float16)
        m = a.shape[0]
        with self._lock:
            plan = self._plan_for(a, weight, expert)
            a = _a_for(plan, a)
            read = plan.read.buffer
            native = self._native
            if native is not None:
                if self.mapped_upload:
                    raw = native.run(plan.raw, (), (self._work["c"], read, plan.out_bytes),
                                     plan.out_bytes, upload=(plan.upload, a, self._work["a"]))
                else:
                    raw = native.run(plan.raw, [(self._work["a"], a)],
                                     (self._work["c"], read, plan.out_bytes), plan.out_bytes)
                try:
                    out = _read_c(plan, raw, m, out)
                finally:
                    native.unmap(read)
                return out
            queue = self.device.queue
            queue.write_buffer(self._work["a"], 0, a)
            enc = self.device.create_command_encoder()
            _record_plan(enc, plan)
            enc.copy_buffer_to_buffer(self._work["c"], 0, read, 0, plan.out_bytes)
            queue.submit([enc.finish()])
            read.map_sync(wgpu.MapMode.READ, 0, plan.out_bytes)
            try:
                raw = read.read_mapped(0, plan.out_bytes, copy=False)
                out = _read_c(plan, raw, m, out)
                del raw
            finally:
                read.unmap()
        return out

    def _plan_for(self, a: np.ndarray, weight, expert) -> _Plan:
        """mm's plan for these rows of A: with gemv's column sums where the plan has them and
        the rows fit them (_column_sums_fit), else every weight prescaled."""
        plan = self._plan(weight, a.shape[0], expert)
        if plan.column_sums and not _column_sums_fit(a):
            plan = self._plan(weight, a.shape[0], expert, column_sums=False)
        return plan

    def _plan(self, weight, m: int, expert, column_sums: bool = True) -> _Plan:
        cache = weight._aux.get("metal_plans")
        if cache is None:
            cache = weight._aux["metal_plans"] = {}
            self._planned.add(weight)
        key = (m, expert, self.binding_limit, self.subgroups, self.target_workgroups,
               self.vector_m_tile, self.gemv_loads, self.gemv_k_slots, self.gemv_wide,
               self.tiled_tm, self.tiled_bk, self.tiled_unroll, column_sums)
        plan = cache.pop(key, None)         # and back in at the end: the dict is in use order
        # A plan binds the workspaces of its generation; when any grew since, bind again.
        if plan is None or plan.generation != self._generation:
            plan = self._make_plan(weight, m, expert, column_sums)
            limit = max(PLANS_PER_WEIGHT, PLANS_PER_EXPERT * weight.num_experts)
            while len(cache) >= limit:
                cache.pop(next(iter(cache)))
        cache[key] = plan
        return plan

    def _kernel_for(self, m_block: int) -> str:
        """The shape-class table: vector kernel for small M, tiled for the rest."""
        return "gemv.wgsl" if m_block <= VECTOR_MAX_M else "tiled.wgsl"

    def _m_tile(self, kernel: str, m_block: int) -> int:
        """Rows of A per workgroup: gemv keeps M_TILE x 8 accumulators a lane (a power of two up
        to vector_m_tile), tiled works on tiles of 16 TM rows."""
        if kernel == "gemv.wgsl":
            return min(self.vector_m_tile, 1 << (m_block - 1).bit_length())
        return 16 * self._tiled_tm(m_block)

    def _grid_fits(self, chunks: int, m: int, m_block: int) -> bool:
        """Whether the dispatches of `chunks` 64-column chunks over M = m rows in m-blocks of
        m_block (the last one shorter, perhaps on the other kernel) stay within MAX_GRID
        workgroups along x and y. gemv puts a chunk's m-tiles side by side along x; the tiled
        kernel has the chunks along x and its m-tiles times the k-splits along y (the planner
        caps the splits to fit)."""
        for rows in {m_block, m % m_block or m_block}:
            kernel = self._kernel_for(rows)
            tiles = math.ceil(rows / self._m_tile(kernel, rows))
            if kernel == "gemv.wgsl" and chunks * tiles > MAX_GRID or \
                    chunks > MAX_GRID or tiles > MAX_GRID:
                return False
        return True

    def _tiled_tm(self, m_block: int) -> int:
        """tiled.wgsl's rows per invocation for an m-block of m_block rows."""
        if self.tiled_tm:
            if self.tiled_tm not in (2, 4, 8):
                raise ValueError(f"tiled_tm={self.tiled_tm}: must be 2, 4 or 8")
            return self.tiled_tm
        return next(tm for top, tm in TILED_TM if m_block <= top)

    def _tiled_bk(self, tm: int) -> int:
        """tiled.wgsl's k per step for TM = tm: the asked or tabled one, cut to 16 when its
        workgroup memory would exceed the device's."""
        bk = self.tiled_bk or TILED_BK[tm]
        if bk not in (16, 32):
            raise ValueError(f"tiled_bk={bk}: must be 16 or 32")
        if _tiled_storage(tm, bk) > self.workgroup_storage:
            bk = 16
        return bk

    def _gemv_loads(self, m_tile: int) -> int:
        return self.gemv_loads or GEMV_LOADS[m_tile]

    def _gemv_k_slots(self) -> int:
        """k-slots per gemv workgroup: 8, 16 or 32, as many as the device allows of those asked."""
        if self.gemv_k_slots not in (8, 16, 32):
            raise ValueError(f"gemv_k_slots={self.gemv_k_slots}: must be 8, 16 or 32")
        return next(s for s in (32, 16, 8) if s <= self.gemv_k_slots
                    and 32 * s <= self.max_invocations or s == 8)

    def _make_plan(self, weight, m: int, expert, column_sums: bool = True) -> _Plan:
        K, n = weight.size_k, weight.size_n
        E = weight.num_experts
        experts = list(range(E)) if expert is None else [int(expert)]
        n_total = n * len(experts)
        kt_rows = K // F.TILE
        groups = weight.num_groups
        group_tiles = F.effective_group_size(K, weight.group_size) // F.TILE
        # kernels find a row's scale group as kt >> group_shift (G in 32, 64, 128: 2, 4, 8 kt
        # rows); one group: shift everything away
        group_shift = 31 if groups == 1 else group_tiles.bit_length() - 1
        assert groups == 1 or group_tiles == 1 << group_shift
        limit = self._usable_limit()
        lay = (self._whole_rows_layout(weight, m, experts, limit)
               or self._window_layout(weight, m, experts, limit))
        row_bytes = 2 * n * 4                    # one kt row of one expert's packed weight
        srow_bytes = 2 * n                       # one scale row
        m_block, k_pieces, kt_piece = lay.m_block, lay.k_pieces, lay.kt_block

        kernel = self._kernel_for(m_block)
        chunks = lay.width // F.CHUNK_N if lay.blocked_c else n // F.CHUNK_N
        m_tile = self._m_tile(kernel, m_block)
        base_wgs = chunks * lay.target_experts * math.ceil(m_block / m_tile)
        # slots a (m-block, column block) needs: one per k-split of every k-piece, or (pieces
        # accumulated into the same slots) one per k-split
        slot_pieces = 1 if lay.accumulate else k_pieces
        scratch_splits = limit // (slot_pieces * m_block * lay.width * 4)
        k_slots = self._gemv_k_slots()
        # a dispatch's y holds the k-splits (tiled: times the m-tiles), at most MAX_GRID
        max_splits = MAX_GRID // (1 if kernel == "gemv.wgsl" else math.ceil(m_block / m_tile))
        wide = (kernel == "gemv.wgsl" and self.gemv_wide and m_block == 1 and k_pieces == 1
                and not lay.blocked_c and 32 * 32 <= self.max_invocations
                and GEMV_WIDE_SHARE[0] * self.target_workgroups <= base_wgs
                <= GEMV_WIDE_SHARE[1] * self.target_workgroups)
        if wide:            # one 32-slot workgroup a chunk over all of k: gemv writes C
            k_slots, splits, kt_per_split = 32, 1, kt_piece
        elif kernel == "gemv.wgsl":
            # the target counts 8-slot workgroups; a split keeps >= 2 kt rows per k-slot
            target = self.target_workgroups * GEMV_TARGET_SHARE[m_tile] * 8 / k_slots
            splits = max(1, min(math.ceil(target / base_wgs), kt_piece // (2 * k_slots),
                                scratch_splits, max_splits))
            kt_per_split = math.ceil(kt_piece / splits)
        else:
            splits = max(1, min(math.ceil(self.target_workgroups * TILED_TARGET_SHARE / base_wgs),
                                kt_piece // 8, scratch_splits, max_splits))
            kt_per_split = _round_up(math.ceil(kt_piece / splits), 2)
        splits = math.ceil(kt_piece / kt_per_split)
        slots = slot_pieces * splits
        # the layouts keep x (chunks x m-tiles) and z (experts) within the grid, max_splits y
        assert self._grid_fits(chunks, m, m_block) and splits <= max_splits, \
            (chunks, m_block, splits)

        # A is laid out [k-piece][m][kw] when its rows are cut along k (else [m][K]); C
        # [column block][m][width] when its rows are cut into column blocks (else [m][n_total]).
        kw = lay.kt_block * F.TILE if lay.blocked_a else K
        a_bytes = (k_pieces if lay.blocked_a else 1) * m * kw * 2
        scratch_bytes = slots * m_block * lay.width * 4
        for what, nbytes in (("A", a_bytes), ("C", m * n_total * 2),
                             ("the k-split scratch", scratch_bytes)):
            self._fits_one_buffer(f"M={m}: {what}", nbytes)
        a_buf = self._workspace("a", a_bytes)
        c_buf = self._workspace("c", m * n_total * 2)
        s_buf = self._workspace("scratch", scratch_bytes)

        table = "channel" if groups == 1 else "grouped"
        reduce_pipe = self._pipeline("reduce.wgsl")
        dispatches = []
        direct_any = False
        any_sums = False
        # one slot (no k-split, one k-piece): the kernel writes C itself, no reduction pass
        direct = slots == 1 and k_pieces == 1
        for mb0 in range(0, m, m_block):
            mb = min(m_block, m - mb0)
            block_kernel = self._kernel_for(mb)      # a short last block may be gemv
            m_tile = self._m_tile(block_kernel, mb)
            direct_any |= direct
            pipes = {}
            for accumulate in {False, lay.accumulate}:
                if block_kernel == "gemv.wgsl":
                    loads = self._gemv_loads(m_tile)
                    sums = column_sums and m_tile <= PRESCALE_FROM_M_TILE
                    any_sums |= sums
                    pipes[accumulate] = self._pipeline(
                        block_kernel, TABLES=TABLES[table], M_TILE=m_tile,
                        SUBGROUPS=str(self.subgroups).lower(),
                        CHANNELWISE=str(groups == 1).lower(), PRESCALE=str(not sums).lower(),
                        DIRECT=str(direct).lower(),
                        **_gemv_blocks(m_tile, loads, k_slots, accumulate))
                else:
                    tm = self._tiled_tm(mb)
                    # a piece of one kt row cannot take BK = 32's steps of two
                    bk = 16 if lay.kt_block % 2 else self._tiled_bk(tm)
                    pipes[accumulate] = self._pipeline(
                        block_kernel, TABLES=TABLES[table], DIRECT=str(direct).lower(),
                        **_tiled_blocks(tm, bk, self.tiled_unroll, accumulate))
            if not lay.blocked_a:
                a_entry, a_row0 = self._range(a_buf, mb0 * K * 2, mb * K * 2, 4)
            for col0, width, c_off, pieces in lay.blocks:
                s_entry, out_base = self._range(s_buf, 0, slots * mb * width * 4, 4)
                c_entry, c_base = self._range(c_buf, 2 * (c_off + mb0 * width), 2 * mb * width, 4)
                for e0, ecount, kt0, ktc, kp, n0, cols, col_base in pieces:
                    w_off = (e0 * kt_rows + kt0) * row_bytes + 8 * n0
                    w_len = ((ecount - 1) * kt_rows + ktc - 1) * row_bytes + 8 * cols
                    w_entry, w_base = self._range(weight.qweight.buffer, w_off, w_len, 4)
                    g0 = (kt0 // group_tiles) if groups > 1 else 0
                    g1 = ((kt0 + ktc - 1) // group_tiles + 1) if groups > 1 else 1
                    sc_off = (e0 * groups + g0) * srow_bytes + 2 * n0
                    sc_len = ((ecount - 1) * groups + g1 - g0 - 1) * srow_bytes + 2 * cols
                    sc_entry, sc_base = self._range(weight.scales.buffer, sc_off, sc_len, 2)
                    if lay.blocked_a:
                        a_entry, a_base = self._range(a_buf, 2 * (kp * m + mb0) * kw,
                                                      2 * mb * kw, 4)
                    else:
                        a_base = a_row0 + kt0 * F.TILE // 2
                    if block_kernel == "gemv.wgsl":
                        # gemv indexes A by the kt row within the expert (ktg, which its hot
                        # loop has for the scales anyway), so its a_base is taken back by the
                        # piece's first kt row, modulo 2^32 (WGSL's u32 arithmetic wraps)
                        a_base = (a_base - kt0 * F.TILE // 2) % 2 ** 32
                    accumulate = lay.accumulate and kp > 0
                    params = _pack_params(
                        M=mb, K=kw, n=n, n_total=width, kt_begin=kt0, kt_count=ktc,
                        kt_per_split=kt_per_split, splits=splits, group_shift=group_shift,
                        g_begin=g0, w_base=w_base, w_expert=kt_rows * 2 * n, s_base=sc_base,
                        s_expert=groups * n, a_base=a_base, col_base=col_base,
                        slot_base=0 if lay.accumulate else kp * splits,
                        slot_stride=mb * width, out_base=out_base, c_base=c_base)
                    ubuf = self._uniform(params)
                    bg = self._bind_group(pipes[accumulate], [
                        (ubuf, 0, ubuf.size), w_entry, sc_entry, a_entry,
                        c_entry if direct else s_entry])
                    piece_chunks = cols // F.CHUNK_N
                    if block_kernel == "gemv.wgsl":     # m-tiles of a chunk side by side in x
                        grid = (piece_chunks * math.ceil(mb / m_tile), splits, ecount)
                    else:
                        grid = (piece_chunks, splits * math.ceil(mb / m_tile), ecount)
                    dispatches.append(_Dispatch(pipes[accumulate], bg, grid))
                if direct:
                    continue
                params = _pack_params(M=mb, n_total=width, splits=slots, slot_stride=mb * width,
                                      out_base=out_base, c_base=c_base)
                ubuf = self._uniform(params)
                s_read, _ = self._range(s_buf, 0, slots * mb * width * 4, 4)
                bg = self._bind_group(reduce_pipe, [(ubuf, 0, ubuf.size), s_read, c_entry])
                dispatches.append(_Dispatch(reduce_pipe, bg,
                                            (math.ceil(width / REDUCE_COLUMNS), mb, 1)))
        pieces_per_block = len(lay.blocks[0][3])
        summary = (f"{kernel.split('.')[0]} m{self._m_tile(kernel, m_block)} k{slots}"
                   + (f" l{self._gemv_loads(self._m_tile(kernel, m_block))}"
                      + (f" s{k_slots}" if k_slots != 8 else "")
                      if kernel == "gemv.wgsl" else
                      f" bk{16 if lay.kt_block % 2 else self._tiled_bk(self._tiled_tm(m_block))}")
                   + (" direct" if direct_any else "")
                   + (" sums" if any_sums else "")
                   + (f" p{pieces_per_block}" if pieces_per_block > 1 else "")
                   + (f" n{len(lay.blocks)}" if len(lay.blocks) > 1 else "")
                   + (" acc" if lay.accumulate else "")
                   + (f" b{math.ceil(m / m_block)}" if m_block < m else ""))
        col_blocks = ([(col0, width, c_off) for col0, width, c_off, _ in lay.blocks]
                      if lay.blocked_c else None)
        return _Plan(self._generation, dispatches, m * n_total * 2, a_bytes, summary,
                     upload=self._staging("upload", a_bytes),
                     read=self._staging("read", m * n_total * 2), column_sums=any_sums,
                     a_block=(kw, k_pieces) if lay.blocked_a else None, col_blocks=col_blocks)

    def _whole_rows_layout(self, weight, m: int, experts: list, limit: int):
        """The usual layout, None where it does not fit the limit: pieces of whole kt rows
        (groups of whole experts, or kt-row blocks of one expert, every 8 rows or more), A and C
        in whole rows ([m][K], [m][n_total]) cut into m-blocks, and one scratch slot per k-split
        of every piece."""
        K, n = weight.size_k, weight.size_n
        n_total = n * len(experts)
        kt_rows = K // F.TILE
        groups = weight.num_groups
        group_tiles = F.effective_group_size(K, weight.group_size) // F.TILE
        row_bytes = 2 * n * 4
        srow_bytes = 2 * n
        if row_bytes * 8 > limit or srow_bytes > limit or n_total > REDUCE_COLUMNS * MAX_GRID:
            return None                          # (the reduction's grid: all of C's columns)
        # Pieces of the weight: (first expert, experts, kt_begin, kt_count, k-piece index,
        # first column, columns, column of C).
        pieces = []
        if kt_rows * row_bytes <= limit and groups * srow_bytes <= limit:
            per = max(1, min(limit // (kt_rows * row_bytes), limit // (groups * srow_bytes),
                             MAX_GRID))         # a piece's experts go along z
            for i in range(0, len(experts), per):
                pieces.append((experts[i], min(per, len(experts) - i), 0, kt_rows, 0, 0, n,
                               (experts[i] - experts[0]) * n))
            k_pieces, kt_block = 1, kt_rows
        else:
            kt_block = (limit // row_bytes) // 8 * 8
            while kt_block >= 8 and (kt_block // group_tiles + 2) * srow_bytes > limit:
                kt_block -= 8                    # the piece's scale rows must fit a binding too
            if kt_block < 8:
                return None
            k_pieces = math.ceil(kt_rows / kt_block)
            for e in experts:
                for p in range(k_pieces):
                    kt0 = p * kt_block
                    pieces.append((e, 1, kt0, min(kt_block, kt_rows - kt0), p, 0, n,
                                   (e - experts[0]) * n))
        # m-blocks: A, C and the scratch of one block (at least one slot per k-piece) must each
        # fit a binding; then as many k-splits as the workgroup target asks and the scratch allows.
        # A dispatch's workgroups along x, an expert's chunks x m-tiles, within the grid too (C
        # of ~1 GB and more in one m-block, where the adapter's bindings hold it). Where the
        # chunks alone pass it (about 4.2M columns of one expert), the windows' column blocks do.
        m_block = m
        while m_block > 2 and (m_block * K * 2 > limit or m_block * n_total * 2 > limit
                                or k_pieces * m_block * n_total * 4 > limit
                                or m_block > MAX_GRID
                                or not self._grid_fits(n // F.CHUNK_N, m, m_block)):
            m_block = _round_up(m_block // 2, 2)
        if (m_block * K * 2 > limit or m_block * n_total * 2 > limit
                or k_pieces * m_block * n_total * 4 > limit
                or not self._grid_fits(n // F.CHUNK_N, m, m_block)):
            return None
        return _Layout(m_block, k_pieces, kt_block, n_total, [(0, n_total, 0, pieces)],
                       target_experts=len(experts))

    def _window_layout(self, weight, m: int, experts: list, limit: int):
        """Where whole rows do not fit: windows of the weight (kt rows x a column block of one
        expert, a multiple of 64 columns), A cut along k into k-pieces ([k-piece][m][kw]) and C
        into column blocks ([column block][m][width]), so each binding holds only what one
        dispatch reads or writes. The k-pieces of a column block add into the same scratch
        slots where separate ones would not fit a binding. Of the column widths that fit, the
        one with the fewest dispatches (rows of A per m-block, then width, breaking ties)."""
        K, n = weight.size_k, weight.size_n
        kt_rows = K // F.TILE
        groups = weight.num_groups
        group_tiles = F.effective_group_size(K, weight.group_size) // F.TILE
        row_bytes = 2 * n * 4
        srow_bytes = 2 * n

        def scale_span(kt_block, width):     # bytes of a piece's scale window, at most
            if groups == 1:
                return 2 * width
            rows = (kt_block + group_tiles - 2) // group_tiles + 1   # groups kt_block rows touch
            return (rows - 1) * srow_bytes + 2 * width

        best = None
        widths = sorted({_round_up(math.ceil(n / c), F.CHUNK_N)
                         for c in range(1, n // F.CHUNK_N + 1)}, reverse=True)
        for width in widths:
            if 8 * width > limit:            # one kt row of the column block
                continue
            # kt rows a piece: (rows - 1) full rows of the weight and one of the block, its A
            # (32 bytes a kt row and row of A) and its scale rows within the limit
            kt_block = min(kt_rows, (limit - 8 * width) // row_bytes + 1, limit // 32)
            while kt_block > 1 and scale_span(kt_block, width) > limit:
                kt_block -= 1
            if kt_block > 1 and kt_block % 2:
                kt_block -= 1                # tiled's BK = 32 steps two kt rows at a time
            k_pieces = math.ceil(kt_rows / kt_block)
            kw = kt_block * F.TILE
            m_cap = min(m, MAX_GRID, limit // (2 * kw), limit // (2 * width))
            if k_pieces > 1:                 # a scratch slot of the m-block must fit
                m_cap = min(m_cap, limit // (4 * width))
            blocks = math.ceil(m / m_cap)
            m_block = math.ceil(m / blocks)
            if not self._grid_fits(width // F.CHUNK_N, m, m_block):
                continue                     # narrower blocks follow; one chunk always fits
            col_blocks = len(experts) * math.ceil(n / width)
            cost = col_blocks * blocks * (k_pieces + (k_pieces > 1))
            # as many dispatches: the taller m-block (the tiled kernel's M), then the wider block
            if best is None or (cost, -m_block) < best[0]:
                best = ((cost, -m_block), width, kt_block, k_pieces, m_block)
        if best is None:
            raise ValueError(f"weight: the binding limit ({self.binding_limit} bytes) holds less "
                             f"than one k-tile row of one 64-column chunk ({8 * F.CHUNK_N} bytes)")
        _, width, kt_block, k_pieces, m_block = best
        blocks, c_off = [], 0
        for e in experts:
            for n0 in range(0, n, width):
                cols = min(width, n - n0)
                pieces = [(e, 1, kt0, min(kt_block, kt_rows - kt0), p, n0, cols, 0)
                          for p, kt0 in enumerate(range(0, kt_rows, kt_block))]
                blocks.append(((e - experts[0]) * n + n0, cols, c_off, pieces))
                c_off += m * cols
        accumulate = k_pieces * m_block * width * 4 > limit
        return _Layout(m_block, k_pieces, kt_block, width, blocks, target_experts=1,
                       blocked_a=k_pieces > 1, blocked_c=True, accumulate=accumulate)

    # --- measurement (bench) ----------------------------------------------------------------------
    def plan_summary(self, weight, m: int, expert) -> str:
        """How mm runs this shape: kernel, rows per workgroup (m), k-splits (k), weight pieces (p),
        m-blocks (b); "sums": gemv takes the 72 out of the column sums (rows of A that fit)."""
        with self._lock:
            return self._plan(weight, m, expert).summary

    def _timing_plan(self, a: np.ndarray, weight, expert):
        """For the timing tools (lock held): mm's plan for a, with a (act-order permuted) uploaded
        where mm's dispatches read it."""
        if weight.perm is not None and weight.perm.ndim == 2 and expert is None:
            raise ValueError("expert=None: the timing tools take one expert at a time of a stack "
                             "whose experts each have their own act-order")
        perm = F.expert_perm(weight.perm, expert or 0)
        if perm is not None:
            a = a[:, perm]
        a = np.ascontiguousarray(a, dtype=np.float16)
        plan = self._plan_for(a, weight, expert)
        self.device.queue.write_buffer(self._work["a"], 0, _a_for(plan, a))
        return plan

    def kernel_seconds(self, a: np.ndarray, weight, expert, min_seconds: float = 0.5) -> float:
        """Seconds per mm's dispatches alone (no upload, no read-back), submitted back to back."""
        self._ready()
        with self._lock:
            plan = self._timing_plan(a, weight, expert)

            def record(enc, count):
                for _ in range(count):
                    _record_plan(enc, plan)

            return self._time_batches(record, min_seconds)

    def pass_gpu_seconds(self, a: np.ndarray, weight, expert, reps: int = 50) -> list[float]:
        """GPU seconds of mm's compute pass by the GPU's own clock (timestamp queries), one pass a
        submission as in mm: [whole pass, then each dispatch from the end of the one before],
        medians over reps passes. Needs self.timestamps."""
        self._ready()
        if not self.timestamps:
            raise RuntimeError("this device has no timestamp queries inside passes")
        with self._lock:
            plan = self._timing_plan(a, weight, expert)
            stamps = len(plan.dispatches) + 1
            query = self.device.create_query_set(type="timestamp", count=stamps)
            resolved = self.device.create_buffer(
                size=8 * stamps, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
            period = self._native.lib.wgpuQueueGetTimestampPeriod(
                self.device.queue._internal) if self._native is not None else 1.0
            times = []
            for _ in range(reps):
                enc = self.device.create_command_encoder()
                cp = enc.begin_compute_pass()
                cp._write_timestamp(query, 0)
                for i, d in enumerate(plan.dispatches):
                    cp.set_pipeline(d.pipeline)
                    cp.set_bind_group(0, d.bind_group)
                    cp.dispatch_workgroups(*d.grid)
                    cp._write_timestamp(query, i + 1)
                cp.end()
                enc.resolve_query_set(query, 0, stamps, resolved, 0)
                self.device.queue.submit([enc.finish()])
                ticks = np.frombuffer(self.device.queue.read_buffer(resolved), np.uint64)
                steps = np.diff(ticks.astype(np.float64)) * period * 1e-9
                times.append([steps.sum(), *steps])
            query.destroy()
            resolved.destroy()
            return [float(v) for v in np.median(np.array(times), axis=0)]

    def copy_bandwidth(self, nbytes: int, min_seconds: float = 0.3) -> float:
        """Bytes per second moved (read + write) by copy_buffer_to_buffer on this adapter."""
        return self.stream_bandwidth(nbytes, min_seconds, kinds=("buffer copy",))["buffer copy"]

    def stream_bandwidth(self, nbytes: int, min_seconds: float = 0.3,
                         kinds=("buffer copy", "shader copy", "shader read")) -> dict:
        """Bytes per second each way of streaming memory moves on this adapter: "buffer copy"
        (copy_buffer_to_buffer, read + write bytes), "shader copy" (stream.wgsl copying vec4s,
        read + write bytes), "shader read" (stream.wgsl reading only, read bytes). Buffers of
        ``nbytes`` (cut to what the adapter allows: half its largest buffer, and one storage
        binding for the shaders); each figure is the wall time of a batch of passes in one submit,
        the batch grown until it lasts ``min_seconds``, after a warm-up."""
        self._ready()
        out = {}
        with self._lock:
            size = min(_round_up(nbytes, 256), self.max_buffer_size // 2 // 256 * 256)
            if any(k != "buffer copy" for k in kinds):
                size = min(size, self._usable_limit() // 256 * 256)
            src, dst = self._buffer(size), self._buffer(size)
            try:
                if "buffer copy" in kinds:
                    def record(enc, count):
                        for _ in range(count):
                            enc.copy_buffer_to_buffer(src, 0, dst, 0, size)
                    out["buffer copy"] = 2 * size / self._time_batches(record, min_seconds)
                for kind, copy in (("shader copy", True), ("shader read", False)):
                    if kind not in kinds:
                        continue
                    pipe = self._pipeline("stream.wgsl", COPY=str(copy).lower())
                    bg = self._bind_group(pipe, [(src, 0, size), (dst, 0, size)])
                    # enough invocations to keep every memory channel busy; a few loads each
                    groups = max(1, min(MAX_GRID, size // 16 // 256 // 4,
                                        self.target_workgroups * 16))

                    def record(enc, count, pipe=pipe, bg=bg, groups=groups):
                        cp = enc.begin_compute_pass()
                        cp.set_pipeline(pipe)
                        cp.set_bind_group(0, bg)
                        for _ in range(count):
                            cp.dispatch_workgroups(groups)
                        cp.end()
                    out[kind] = (2 if copy else 1) * size / self._time_batches(record,
                                                                               min_seconds)
            finally:
                src.destroy()
                dst.destroy()
        out["bytes"] = size
        return out

    def _batch(self, record, reps: int) -> list:
        """Command buffers holding reps units of record(encoder, count), at most BATCH_UNITS a
        buffer, the last finished behind a 16-byte copy into the fence buffer, whose mapping
        then says when the GPU is done (the queue's on_submitted_work_done is not dependable
        across wgpu-native versions). Bounded buffers, because wgpu reuses a command encoder
        once its work is done, and one that ever held thousands of passes made every later
        submission slower for the rest of the process (lavapipe: a bare round trip 120 -> 2800
        µs after one 4000-pass buffer), which inflated every mm call timed after a bench probe."""
        fence = self._workspace("fence", 256,
                                usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        source = self._workspace("a", 256)
        buffers = []
        for start in range(0, reps, BATCH_UNITS):
            enc = self.device.create_command_encoder()
            record(enc, min(BATCH_UNITS, reps - start))
            if start + BATCH_UNITS >= reps:
                enc.copy_buffer_to_buffer(source, 0, fence, 0, 16)
            buffers.append(enc.finish())
        return buffers

    def _run_and_wait(self, command_buffers):
        """Submit command buffers made by _batch and block until the GPU is done."""
        self.device.queue.submit(command_buffers)
        fence = self._work["fence"]
        if self._native is not None:
            self._native.map(fence, 16)
            self._native.unmap(fence)
        else:
            fence.map_sync(wgpu.MapMode.READ, 0, 16)
            fence.unmap()

    def _time_batches(self, record, min_seconds: float) -> float:
        """Seconds per unit of record(encoder, count), which records count units of work: warm
        up, then grow the batch until it lasts long enough that submission and wake-up costs are
        small beside it. Only the submission and the wait are timed: the commands are recorded
        before the clock starts (recording is host work the GPU would otherwise be idle for)."""
        self._run_and_wait(self._batch(record, 1))
        reps = 1
        while True:
            command_buffers = self._batch(record, reps)
            start = time.perf_counter()
            self._run_and_wait(command_buffers)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds or reps >= 4096:
                return elapsed / reps
            reps = min(4096, max(2 * reps, int(reps * min_seconds / max(elapsed, 1e-6) * 1.2)))
