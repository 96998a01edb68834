"""The CPU backend (Numba): the reference every other backend is checked against, and a fallback.

mm picks one of two paths by M (see ``FUSED_MAX_M``): a fused kernel that reads the packed
Marlin tiles directly, for small M where the work is streaming the weight once; and blocked
dequantize + BLAS for large M, where the dense product dominates and BLAS is the fastest way
to do it.
"""

from __future__ import annotations

import os
import sys
import threading

# Numba's OpenMP workers spin after each parallel region by default; on the large-M path the
# dequantize kernel and BLAS alternate, and spinning workers then steal the cores BLAS needs
# (measured: 3.4x slower on 2 cores). Passive waiting costs nothing measurable on the fused path.
# Set before numba loads its OpenMP pool; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from .. import format as F  # noqa: E402
from .._registry import Backend, BackendInfo  # noqa: E402

#: Largest M served by the fused kernel; above it, dequantize + BLAS. Measured by
#: `python -m ferrum bench --backend cpu` (which prints both paths) on a 2-core x86 machine.
FUSED_MAX_M = 16
#: Widest slice of the fused kernel, in 64-column chunks (8 KB of each k-tile row).
MAX_SLICE_CHUNKS = 8
#: Below these sizes a kernel runs on the calling thread: waking Numba's workers costs ~100 µs a
#: parallel region (2-core VM, OMP_WAIT_POLICY=PASSIVE), more than converting 64K halves (~60 µs)
#: or the fused product over 512K words x (M + 1) (1024x1024 at M=1: 124 µs alone, 140 threaded).
SERIAL_MAX_ELEMENTS = 1 << 16
SERIAL_MAX_WORDS = 1 << 19
#: Rows and columns of weight dequantized per BLAS call on the large-M path: at most a 16 MB
#: float32 scratch per thread, whatever the layer's width (a vocabulary head has N ~ 128K).
#: Smaller blocks cost more than they save: each BLAS call leaves OpenBLAS's threads spinning
#: into the next dequantize (1 MB blocks measured 20-30% slower at M = 32..64).
DEQUANT_BLOCK_K = 1024
DEQUANT_BLOCK_N = 4096

#: float32 value of every float16 bit pattern (exact): activations are converted by lookup.
_HALF_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
_ROWS = np.ascontiguousarray(F.CHUNK_ROW)
_COLS = np.ascontiguousarray(F.CHUNK_COL)


def _slice_chunks(size_n: int) -> int:
    """Chunks (64 columns each) per parallel task of the fused kernel: up to MAX_SLICE_CHUNKS,
    since wider slices read longer contiguous runs of each k-tile row, but no fewer than two
    tasks per thread where N allows."""
    import numba
    chunks = size_n // 64
    return max(1, min(MAX_SLICE_CHUNKS, chunks // (2 * numba.get_num_threads())))


def _kernels():
    # Imported on first use so `import ferrum` stays cheap; numba caches compiled code on disk.
    from . import kernels
    return kernels


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self):
        self._inverse_cache: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()
        self._local = threading.local()     # per-thread dequantize scratch, reused across calls
        self._identity = np.arange(0, dtype=np.int32)
        # Numba's "workqueue" threading layer (its fallback where neither OpenMP nor TBB loads)
        # aborts the process when two threads enter parallel kernels at once; under it every
        # kernel call is serialized. None until the first kernel call has chosen the layer.
        self._serial: bool | None = None
        self._kernel_lock = threading.Lock()
        # GNU OpenMP does not survive fork(): a child of a process that ran a parallel region
        # on it is killed at its first one ("fork() called from a process already using GNU
        # OpenMP"), and a multiprocessing pool waits for it forever. Such a child runs every
        # kernel single-threaded (_after_fork_in_child).
        self._forked_serial = False

    def info(self) -> BackendInfo:
        try:
            import numba
        except ImportError as exc:
            return BackendInfo("cpu", False, f"numba is not installed ({exc})")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        import platform
        return BackendInfo("cpu", True, "", f"{platform.machine()} CPU, {cores} cores, "
                           f"{numba.get_num_threads()} numba threads",
                           f"numba {numba.__version__}, numpy {np.__version__}")

    def _run(self, name, *args, serial=False):
        """Call kernel ``name`` (its single-threaded twin when ``serial``); calls are serialized
        where the threading layer cannot take concurrency."""
        serial = serial or self._forked_serial
        kernel = _kernels().SERIAL[name] if serial else getattr(_kernels(), name)
        if self._serial is False:
            kernel(*args)
            return
        with self._kernel_lock:
            kernel(*args)
            if self._serial is None:
                import numba
                try:
                    self._serial = numba.threading_layer() == "workqueue"
                except ValueError:          # no parallel region has run yet
                    pass

    # --- memory: host arrays are resident here --------------------------------------------------
    def from_host(self, array):
        return np.array(array, copy=True, order="C")

    def to_host(self, resident):
        return np.array(resident, copy=True)

    def owns(self, array):
        return isinstance(array, np.ndarray)

    # --- kernels ----------------------------------------------------------------------------------
    def repack(self, qweight, perm, size_k, size_n):
        qweight = np.ascontiguousarray(qweight).view(np.uint32)
        order = np.arange(size_k, dtype=np.int32) if perm is None else np.ascontiguousarray(
            perm, dtype=np.int32)
        out = np.empty((size_k // F.TILE, 2 * size_n), dtype=np.uint32)
        self._run("repack", qweight, order, _ROWS, _COLS, out)
        return out.view(np.int32)

    def _scale_inverse(self, size_n, groups):
        key = (size_n, 1 if groups > 1 else 0)
        with self._lock:
            if key not in self._inverse_cache:
                self._inverse_cache[key] = F.scale_column_inverse(size_n, groups)
            return self._inverse_cache[key]

    def _expert_arrays(self, weight, e):
        # Numba has no float16 arithmetic: keep a float32 copy of the (small) scales.
        scales32 = weight._aux.get("cpu_scales32")
        if scales32 is None:
            scales32 = weight._aux["cpu_scales32"] = weight.scales.astype(np.float32)
        if weight.stacked:
            return weight.qweight[e].view(np.uint32), scales32[e]
        return weight.qweight.view(np.uint32), scales32

    def dequantize_marlin_order(self, weight, e, kt_begin=0, kt_end=None, out=None):
        """float32 [16*(kt_end-kt_begin), n] of expert e, rows in Marlin (perm) order."""
        kt_end = weight.size_k // F.TILE if kt_end is None else kt_end
        marlin, scales = self._expert_arrays(weight, e)
        if out is None:
            out = np.empty(((kt_end - kt_begin) * F.TILE, weight.size_n), dtype=np.float32)
        inv = self._scale_inverse(weight.size_n, weight.num_groups)
        rows = F.effective_group_size(weight.size_k, weight.group_size)
        self._run("dequantize", marlin, scales, inv, rows, kt_begin, kt_end, out)
        return out

    def dequantize(self, weight, e):
        dense = self.dequantize_marlin_order(weight, e)
        perm = F.expert_perm(weight.perm, e)
        if perm is None:
            return dense
        original = np.empty_like(dense)
        original[perm] = dense
        return original

    def _activations(self, a, perm):
        """float16 a [M, K] -> float32, columns in Marlin row order (act-order perm applied)."""
        bits = np.ascontiguousarray(a).view(np.uint16)
        K = bits.shape[1]
        if perm is None:
            with self._lock:
                if self._identity.size < K:
                    self._identity = np.arange(K, dtype=np.int32)
            perm = self._identity[:K]
        a32 = np.empty(bits.shape, dtype=np.float32)
        self._run("half_to_float", bits, _HALF_TABLE, perm, a32,
                  serial=a32.size <= SERIAL_MAX_ELEMENTS)
        return a32

    def mm(self, a, weight, expert, out, path=None):
        per_expert = weight.perm is not None and weight.perm.ndim == 2   # a stack's own orders
        a32 = None if per_expert else self._activations(a, weight.perm)
        M = a.shape[0]
        n = weight.size_n
        experts = range(weight.num_experts) if expert is None else (expert,)
        out32 = np.empty((M, n * len(experts)), dtype=np.float32)
        path = path or ("fused" if M <= FUSED_MAX_M else "blas")
        for slot, e in enumerate(experts):
            if per_expert:
                a32 = self._activations(a, weight.perm[e])
            if path == "fused":
                marlin, scales = self._expert_arrays(weight, e)
                marlin = marlin.view(np.int32)      # arithmetic shifts are fine under "& 15"
                inv = self._scale_inverse(n, weight.num_groups)
                rows = F.effective_group_size(weight.size_k, weight.group_size)
                # One row: the kernel that takes two k-tiles a pass (groups hold an even number).
                kernel = "mm_fused_row" if M == 1 and (rows // F.TILE) % 2 == 0 else "mm_fused"
                words = marlin.size * (M + 1)       # decode once, multiply M times
                self._run(kernel, a32, marlin, scales, inv, rows, out32, slot * n,
                          _slice_chunks(n), serial=words <= SERIAL_MAX_WORDS)
            else:
                self._mm_blas(a32, weight, e, out32[:, slot * n:(slot + 1) * n])
        result = out if out is not None and out.flags.c_contiguous else np.empty(
            out32.shape, dtype=np.float16)
        self._run("float_to_half", out32, out32.view(np.uint32), result.view(np.uint16),
                  serial=out32.size <= SERIAL_MAX_ELEMENTS)
        if out is not None and result is not out:
            out[...] = result
            return out
        return result

    def _word_order(self, weight):
        """(columns, scales) for dequantize_word_order: columns[n] is the word-order column that
        holds natural column n; scales ([E,] groups, N float32) are in word order."""
        cached = weight._aux.get("cpu_word_order")
        if cached is None:
            n = weight.size_n
            p = np.arange(n)
            b, j, h = p // 8, (p // 2) % 4, p % 2
            # word 16b + 4v + j of the row is word 16*(b % 8) + 4v + j of chunk b // 8: lane
            # t = 4*(b % 8) + v, so its columns are c = b % 8 and c + 8 of n-tile j.
            natural = (b // 8) * 64 + (b % 8) + 16 * j + 8 * h     # word-order p -> column
            inv = self._scale_inverse(n, weight.num_groups)
            scales32 = weight.scales.astype(np.float32)
            columns = np.empty(n, dtype=np.intp)                   # column -> word-order p
            columns[natural] = np.arange(n)
            cached = weight._aux["cpu_word_order"] = (
                columns, np.ascontiguousarray(scales32[..., inv[natural]]))
        return cached

    def _mm_blas(self, a32, weight, e, out32):
        """out32 = a32 @ W through BLAS on blocks of the dequantized weight, DEQUANT_BLOCK_K rows
        x DEQUANT_BLOCK_N columns each, so the per-thread scratch is bounded whatever N is.
        Products are in word order, one [M, block columns] slab per column block, summed over
        the K blocks, then gathered back to columns."""
        columns, scales_p = self._word_order(weight)
        scales_p = scales_p[e] if weight.stacked else scales_p
        marlin = (weight.qweight[e] if weight.stacked else weight.qweight).view(np.int32)
        rows = F.effective_group_size(weight.size_k, weight.group_size)
        M, n = a32.shape[0], weight.size_n
        k_tiles = weight.size_k // F.TILE
        k_step = DEQUANT_BLOCK_K // F.TILE
        b_step = min(DEQUANT_BLOCK_N, n) // 8           # 16-word blocks: 8 columns each
        n_blocks = n // 8
        size = min(k_step, k_tiles) * F.TILE * b_step * 8
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or scratch.size < size:
            scratch = self._local.scratch = np.empty(size, dtype=np.float32)
        slabs = np.empty(((n_blocks + b_step - 1) // b_step, M, b_step * 8), dtype=np.float32)
        part = np.empty((M, b_step * 8), dtype=np.float32)
        for s, b0 in enumerate(range(0, n_blocks, b_step)):
            b1 = min(b0 + b_step, n_blocks)
            width = (b1 - b0) * 8
            slab = slabs[s, :, :width]
            for kt in range(0, k_tiles, k_step):
                end = min(kt + k_step, k_tiles)
                block = scratch[:(end - kt) * F.TILE * width].reshape(-1, width)
                self._run("dequantize_word_order", marlin, scales_p, rows, kt, end, b0, b1, block)
                a_rows = a32[:, kt * F.TILE:end * F.TILE]
                with np.errstate(invalid="ignore"):     # inf * 0 in a is NaN, as in float64
                    if kt == 0:
                        np.matmul(a_rows, block, out=slab)
                    else:
                        np.matmul(a_rows, block, out=part[:, :width])
                        slab += part[:, :width]
        # Word-order column p sits in slab p // w at column p % w (w = 8 * b_step; only the
        # last slab may be narrower, so the slabs side by side are the word order). Back to
        # natural column order: a gather (np.take) is ~8x faster than a scatter here.
        acc = slabs.transpose(1, 0, 2).reshape(M, -1) if len(slabs) > 1 else slabs[0]
        if out32.flags.c_contiguous:
            np.take(acc, columns, axis=1, out=out32, mode="clip")
        else:
            out32[...] = np.take(acc, columns, axis=1, mode="clip")


BACKEND = CpuBackend()


def run_bench(options):
    """`python -m ferrum bench --backend cpu` (cpu/bench.py). Not named bench: importing the
    submodule bench would replace a package attribute of that name."""
    from .bench import run
    return run(options)


def _after_fork_in_child() -> None:
    """In a forked child: single-threaded kernels where the parent ran parallel regions on
    OpenMP (whose GNU runtime kills the child at its first), the threaded ones otherwise (TBB
    and the workqueue start afresh in the child)."""
    numba = sys.modules.get("numba")
    if numba is None:
        return
    try:
        layer = numba.threading_layer()
    except ValueError:              # no parallel region ran in the parent
        return
    if layer == "omp":
        BACKEND._forked_serial = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
