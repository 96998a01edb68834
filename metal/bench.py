"""`python -m ferrum bench --backend metal`: ferrum.mm on the metal backend against the memory floor.

Columns
    call us     one ferrum.mm call end to end: numpy A in, dispatches, numpy C out (what a user sees)
    kernel us   the call's dispatches alone, many recorded into one command buffer before the
                clock starts, then submitted and waited for (what the GPU spends; recording is
                host work and is not counted)
    floor us    bytes the product must move (packed weight + scales + A + C) divided by the
                fastest streaming rate measured on the adapter: the best of copy_buffer_to_buffer
                (read + write bytes), a shader copy and a read-only shader stream (stream.wgsl),
                each on buffers of up to 1 GiB (64 MiB with --quick), the wall time of a batch of
                passes in one submit
    % floor     floor / kernel: 100% would stream the weight at copy speed
    cuda us     the cuda backend on the same problem (device arrays, synchronised), when available
    plan        kernel, rows of A per workgroup (m), k-splits (k), weight pieces (p), m-blocks (b)
"""

from __future__ import annotations

import time

import numpy as np

import ferrum
from ferrum import _registry
from ferrum import format as F

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (8192, 10240), (8192, 8192),
          (8192, 57344), (28672, 8192)]
QUICK_SHAPES = [(1024, 1024), (2048, 2048)]
M_VALUES = (1, 16, 64, 256)
GROUP_SIZE = 128


def _timed(fn, min_seconds: float, min_reps: int = 3, max_reps: int = 200) -> float:
    """Seconds per call of fn() (after one warm-up call), repeated until min_seconds have passed."""
    fn()
    reps, start = 0, time.perf_counter()
    while reps < min_reps or (time.perf_counter() - start < min_seconds and reps < max_reps):
        fn()
        reps += 1
    return (time.perf_counter() - start) / reps


def _random_weight(rng, size_k, size_n, group_size):
    qweight = rng.integers(0, 2**32, (size_k // 8, size_n), dtype=np.uint32).view(np.int32)
    scales = rng.uniform(0.5, 1.5, (F.num_groups(size_k, group_size), size_n)).astype(np.float16)
    scales /= np.float16(8 * np.sqrt(size_k))
    return qweight, scales


def _cuda_seconds(qweight, scales, group_size, a, min_seconds):
    be = _registry.get("cuda")
    weight = ferrum.MarlinWeight.from_gptq(qweight, scales, group_size=group_size, backend="cuda")
    a_dev = be.from_host(a)
    out_dev = be.from_host(np.empty((a.shape[0], weight.size_n), np.float16))
    sync = getattr(be, "synchronize", None) or (lambda: be.to_host(out_dev))

    def batch():   # 10 calls then one synchronisation, so launch overlap is allowed as in use
        for _ in range(10):
            ferrum.mm(a_dev, weight, out=out_dev)
        sync()
    return _timed(batch, min_seconds) / 10


def run(options: dict) -> None:
    """options: quick, seed; shapes [(K, N)], m_values, group_size (python -m ferrum bench's
    --shapes, --m, --group-size; each None for SHAPES, M_VALUES and GROUP_SIZE)."""
    from . import BACKEND
    quick = bool(options.get("quick"))
    seed = options.get("seed")
    rng = np.random.default_rng(seed)
    shapes = options.get("shapes") or (QUICK_SHAPES if quick else SHAPES)
    m_values = options.get("m_values") or M_VALUES
    group_size = options.get("group_size") or GROUP_SIZE
    min_seconds = 0.2 if quick else 0.5
    cuda = ferrum.backends()["cuda"].available

    rates = BACKEND.stream_bandwidth(64 << 20 if quick else 1 << 30)
    size = rates.pop("bytes")
    basis, bandwidth = max(rates.items(), key=lambda kv: kv[1])
    info = BACKEND.info()
    print(f"adapter: {info.device}  [{info.version}]")
    print(f"streaming rates on {size / 2**20:.0f} MiB buffers: " + ", ".join(
        f"{k} {v / 1e9:.1f} GB/s" for k, v in rates.items())
        + " (copies count read + write bytes)")
    print(f"floor us = bytes moved / {bandwidth / 1e9:.1f} GB/s (the {basis} rate, the fastest "
          f"measured); group_size={group_size}; {'quick' if quick else 'full'} run")
    head = f"{'K x N':>13s} {'M':>4s} {'call us':>10s} {'kernel us':>10s} {'floor us':>9s} " \
           f"{'% floor':>7s}" + (f" {'cuda us':>9s}" if cuda else "") + "  plan"
    print(head)
    print("-" * len(head))
    for size_k, size_n in shapes:
        qweight, scales = _random_weight(rng, size_k, size_n, group_size)
        weight = ferrum.MarlinWeight.from_gptq(qweight, scales, group_size=group_size,
                                               backend="metal")
        for m in m_values:
            a = rng.standard_normal((m, size_k)).astype(np.float16)
            out = np.empty((m, size_n), np.float16)
            call = _timed(lambda: ferrum.mm(a, weight, out=out), min_seconds)
            kernel = BACKEND.kernel_seconds(a, weight, None if weight.stacked else 0,
                                            min_seconds=min_seconds)
            nbytes = qweight.nbytes + scales.nbytes + a.nbytes + out.nbytes
            floor = nbytes / bandwidth
            line = (f"{size_k:>6d}x{size_n:<6d} {m:>4d} {call * 1e6:>10.1f} {kernel * 1e6:>10.1f} "
                    f"{floor * 1e6:>9.1f} {100 * floor / kernel:>6.1f}%")
            if cuda:
                try:
                    line += f" {_cuda_seconds(qweight, scales, group_size, a, min_seconds) * 1e6:>9.1f}"
                except Exception as exc:   # report, keep the metal numbers
                    line += f"  cuda failed: {type(exc).__name__}: {exc}"
            line += "  " + BACKEND.plan_summary(weight, m, None if weight.stacked else 0)
            print(line, flush=True)
        del weight
