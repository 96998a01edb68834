"""Where gemv's M=1 time goes on a GPU: `python tools/metal_probe.py [math] [fixed] [K,N ...]`.

  math   kernel µs (MetalBackend.kernel_seconds) of gemv as shipped, without the decode (the
         quad's bits used as the floats 64 + q, same fmas) and without any math (the quad and
         its scales XOR'd into one accumulator, A still read): what the arithmetic costs on
         top of moving the bytes. Results are wrong by design; only the times mean anything.
  fixed  the cost of a pass that does almost nothing (gemv on a 128x64 weight: one
         workgroup), one pass per call as mm records it and many calls' dispatches in one pass,
         and the read-only stream shader's µs per dispatch (all in one pass) at the layers'
         sizes: the part of a small layer's time that no kernel change removes.

K,N default to the 70B layers (G=128). Timings as in `ferrum bench --backend metal`'s kernel
column: batches of passes, submission and wait timed.
"""

from __future__ import annotations

import sys

import numpy as np

import ferrum
import ferrum.metal.backend as mb
from ferrum.metal import BACKEND as B

SHAPES = [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192), (4096, 4096)]
_shipped_source, _shipped_blocks = mb._gemv_source, mb._gemv_blocks
_mode = "full"


def _source(**subs):
    text = _shipped_source(**subs)
    if _mode == "nodecode":
        fake = ", ".join(f"bitcast<vec4<f32>>(x.{s})" for s in
                         ("xyzw", "yzwx", "zwxy", "wxyz", "xzyw", "ywxz", "zxwy", "wyzx"))
        text = text.replace("let q = quad64(x);", f"let q = Quad({fake});")
    return text


def _blocks(m_tile, loads, k_slots):
    parts = _shipped_blocks(m_tile, loads, k_slots)
    if _mode == "nomath":
        parts["ACCUMULATE"] = ("        acc0a += bitcast<vec4<f32>>(x ^ sc);\n"
                               "        acc0b.x += bitcast<f32>(A[a_k + arow0]);")
        parts["EXACT"] = ""
    return parts


def weight(rng, k, n):
    q = rng.integers(0, 2**32, (k // 8, n), dtype=np.uint32).view(np.int32)
    s = (rng.uniform(0.5, 1.5, (max(1, k // 128), n)) / (8 * np.sqrt(k))).astype(np.float16)
    return ferrum.MarlinWeight.from_gptq(q, s, group_size=128, backend="metal")


def kernel_us(w, a) -> float:
    return min(B.kernel_seconds(a, w, 0, 0.1) for _ in range(2)) * 1e6


def math(rng, shapes):
    global _mode
    mb._gemv_source, mb._gemv_blocks = _source, _blocks
    rate = B.stream_bandwidth(1 << 30, 0.3, kinds=("shader read",))["shader read"]
    try:
        for k, n in shapes:
            w = weight(rng, k, n)
            a = rng.standard_normal((1, k)).astype(np.float16)
            floor = (k * n / 2 + k // 128 * n * 2) / rate * 1e6
            line = []
            for _mode in ("full", "nodecode", "nomath"):
                B._pipelines.clear()                 # same substitutions, another source
                w._aux.pop("metal_plans", None)
                line.append(f"{_mode} {kernel_us(w, a):.1f}")
            print(f"{k}x{n} M=1 [{B.plan_summary(w, 1, 0)}] floor {floor:.1f}: "
                  + " | ".join(line), flush=True)
    finally:
        mb._gemv_source, mb._gemv_blocks = _shipped_source, _shipped_blocks
        _mode = "full"
        B._pipelines.clear()


def _one_pass_us(plan) -> float:
    """µs a repetition of the plan's dispatches when all repetitions share one compute pass
    (kernel_us: one pass each, as mm records them)."""
    def record(enc, count):
        cp = enc.begin_compute_pass()
        for _ in range(count):
            for d in plan.dispatches:
                cp.set_pipeline(d.pipeline)
                cp.set_bind_group(0, d.bind_group)
                cp.dispatch_workgroups(*d.grid)
        cp.end()
    with B._lock:
        return min(B._time_batches(record, 0.1) for _ in range(2)) * 1e6


def fixed(rng, shapes):
    for k, n in ((128, 64), (1024, 64), (8192, 8192)):
        w = weight(rng, k, n)
        a = rng.standard_normal((1, k)).astype(np.float16)
        us = kernel_us(w, a)
        with B._lock:
            plan = B._timing_plan(a, w, 0)
        print(f"gemv {k}x{n} M=1 [{B.plan_summary(w, 1, 0)}]: {us:.1f} us a pass, "
              f"{_one_pass_us(plan):.1f} us a repetition inside one pass", flush=True)
    for size in sorted({1 << 20, *(k * n // 2 for k, n in shapes), 1 << 30}):
        rate = B.stream_bandwidth(size, 0.2, kinds=("shader read",))["shader read"]
        print(f"shader read {size / 2**20:8.1f} MiB: {rate / 1e9:7.1f} GB/s, "
              f"{size / rate * 1e6:8.1f} us a dispatch", flush=True)


if __name__ == "__main__":
    info = ferrum.backends()["metal"]
    if not info.available:
        sys.exit(f"metal unavailable: {info.reason}")
    print(info.device)
    args = sys.argv[1:]
    shapes = [tuple(int(v) for v in s.split(",")) for s in args if "," in s] or SHAPES
    steps = [s for s in args if "," not in s] or ["math", "fixed"]
    rng = np.random.default_rng(0)
    for step in steps:
        {"math": math, "fixed": fixed}[step](rng, shapes)
