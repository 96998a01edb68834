"""`python -m ferrum bench --backend cpu`: µs per mm call against the naive numpy path.

Baselines, measured in the same run: "naive" unpacks the GPTQ weight to float32 and multiplies
with numpy's `@` (what a user without ferrum would write); "blas" is float32 `@` on an
already-dequantized weight (the floor for large M). Weights rotate over several copies so they
are not all cache-resident.
"""

from __future__ import annotations

import time

import numpy as np

from .. import api
from .. import format as F
from ..check import random_problem

COPIES = 4


def _time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls (each call may rotate its own inputs)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def naive_mm(a: np.ndarray, qweight: np.ndarray, scales: np.ndarray, group_rows: int) -> np.ndarray:
    """group_rows: K rows a scale row covers (F.effective_group_size: K for channelwise)."""
    k = qweight.shape[0] * F.PACK
    q = F.unpack_gptq(qweight, k).astype(np.float32) - 8.0
    w = q * np.repeat(scales.astype(np.float32), group_rows, axis=0)
    return (a.astype(np.float32) @ w).astype(np.float16)


_COLD_SCRIPT = """
import time, numpy as np, ferrum
from ferrum.check import random_problem
p = random_problem(np.random.default_rng(0), 256, 128, 128)
w = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=128)
out = []
for m in (1, 64):
    a = np.ones((m, 256), np.float16)
    t0 = time.perf_counter(); ferrum.mm(a, w); out.append(time.perf_counter() - t0)
print(out[0], out[1])
"""


def cold_first_call() -> tuple[float, float] | None:
    """First-call seconds (fused, blas path) in a fresh process with an empty numba cache."""
    import os
    import subprocess
    import sys
    import tempfile
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        done = subprocess.run([sys.executable, "-c", _COLD_SCRIPT], env=env, capture_output=True,
                              text=True, timeout=600, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        return None
    fused, blas = (float(x) for x in done.stdout.split()[-2:])
    return fused, blas


def run(options) -> None:
    """options: quick, seed; shapes [(K, N)], m_values, group_size (python -m ferrum bench's
    --shapes, --m, --group-size; each None for this bench's own)."""
    quick = bool(options.get("quick"))
    shapes = options.get("shapes") or [(1024, 1024) if quick else (4096, 4096)]
    m_values = options.get("m_values") or ((1, 16, 64) if quick else (1, 4, 8, 16, 32, 256))
    group_size = options.get("group_size") or 128
    rng = np.random.default_rng(options.get("seed"))
    cold = cold_first_call()
    print("cold JIT compile (empty cache): " + (f"fused {cold[0]:.1f} s, blas path {cold[1]:.1f} s"
                                               if cold else "could not be measured"))
    for size_k, size_n in shapes:
        _run_shape(rng, size_k, size_n, group_size, m_values)


def _run_shape(rng, size_k: int, size_n: int, group_size: int, m_values) -> None:
    from . import BACKEND, FUSED_MAX_M
    probs = [random_problem(rng, size_k, size_n, group_size) for _ in range(COPIES)]
    weights = [api.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=group_size)
               for p in probs]
    dense = [np.ascontiguousarray(p.dense[0], dtype=np.float32) for p in probs]
    rows = F.effective_group_size(size_k, group_size)

    a1 = rng.standard_normal((1, size_k)).astype(np.float16)
    t0 = time.perf_counter()
    BACKEND.mm(a1, weights[0], 0, None, path="fused")
    first_fused = time.perf_counter() - t0
    t0 = time.perf_counter()
    BACKEND.mm(a1, weights[0], 0, None, path="blas")
    first_blas = time.perf_counter() - t0

    print(f"K={size_k} N={size_n} G={group_size}, {COPIES} weight copies rotated; "
          f"mm picks fused for M <= {FUSED_MAX_M}; first call from the on-disk cache: fused "
          f"{first_fused * 1e3:.0f} ms, blas path {first_blas * 1e3:.0f} ms")
    header = (f"{'M':>5s} {'ferrum us':>11s} {'path':>6s} {'fused us':>11s} {'deq+blas us':>12s} "
              f"{'naive us':>11s} {'x naive':>8s} {'f32 blas us':>12s} {'/ blas':>7s}")
    print(header)
    for m in m_values:
        a = rng.standard_normal((m, size_k)).astype(np.float16)
        a32 = a.astype(np.float32)
        repeats = 20 if m <= 16 else 5
        rot = iter(range(10 ** 9))

        def pick():
            return next(rot) % COPIES

        # OpenBLAS's threads spin for a while after each BLAS call (up to ~0.1 s) and take the
        # cores from a Numba kernel started meanwhile: the previous row's BLAS baselines would
        # slow this row's first timings. Let them go idle first.
        time.sleep(0.5)
        t_fused = _time(lambda: BACKEND.mm(a, weights[pick()], 0, None, path="fused"),
                        repeats if m <= 16 else 2)
        t_api = _time(lambda: api.mm(a, weights[pick()]), repeats)
        t_blas_path = _time(lambda: BACKEND.mm(a, weights[pick()], 0, None, path="blas"), repeats)
        t_naive = _time(lambda: naive_mm(a, probs[pick()].qweights[0], probs[pick()].scales[0],
                                         rows), 3)
        t_dense = _time(lambda: a32 @ dense[pick()], repeats)
        path = "fused" if m <= FUSED_MAX_M else "blas"
        print(f"{m:5d} {t_api * 1e6:11.0f} {path:>6s} {t_fused * 1e6:11.0f} {t_blas_path * 1e6:12.0f} "
              f"{t_naive * 1e6:11.0f} {t_naive / t_api:7.1f}x {t_dense * 1e6:12.0f} "
              f"{t_api / t_dense:6.2f}x")
