"""Where gemv's M=1 time goes on a GPU: `python tools/metal_probe.py [math] [fixed] [span] [passes] [K,N ...]`.

  math   kernel µs (MetalBackend.kernel_seconds) of gemv as shipped, without the decode (the
         quad's bits used as the floats 64 + q, same fmas) and without any math (the quad and
         its scales XOR'd into one accumulator, A still read): what the arithmetic costs on
         top of moving the bytes. Results are wrong by design; only the times mean anything.
  fixed  the cost of a pass that does almost nothing (gemv on a 128x64 weight: one
         workgroup), one pass per call as mm records it and many calls' dispatches in one pass,
         and the read-only stream shader's µs per dispatch (all in one pass) at the layers'
         sizes: the part of a small layer's time that no kernel change removes.
  span   per pass of mm's plan at M = 1 and 16, three ways over one batch of passes (one pass a
         call, as the bench records them): the wall time (the bench's kernel column), the host's
         time inside queue.submit, and the GPU's own clock from a timestamp before the first
         dispatch to one after the last (inside-pass timestamps); also for a pass that streams
         nothing. Says whether the per-pass cost is the GPU's or the submission's.
  passes what a pass, a dispatch and wgpu's barrier between dispatches cost by the GPU clock:
         batches of a shader that does nothing (no bindings) and of one that bumps a word of a
         read_write buffer (so wgpu puts a barrier before each use), as one pass per dispatch,
         all dispatches in one pass, and one command buffer per pass; and empty passes.

K,N default to the 70B layers (G=128). Timings as in `ferrum bench --backend metal`'s kernel
column: batches of passes, submission and wait timed.
"""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
import wgpu

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


@contextlib.contextmanager
def _stamps():
    """Two timestamp queries (0: before the first unit, 1: after the last) and a function that
    resolves them, once the work that wrote them is submitted, into GPU seconds between them."""
    query = B.device.create_query_set(type="timestamp", count=2)
    resolved = B.device.create_buffer(
        size=16, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
    period = B._native.lib.wgpuQueueGetTimestampPeriod(B.device.queue._internal) \
        if B._native is not None else 1.0

    def seconds() -> float:
        enc = B.device.create_command_encoder()
        enc.resolve_query_set(query, 0, 2, resolved, 0)
        B.device.queue.submit([enc.finish()])
        ticks = np.frombuffer(B.device.queue.read_buffer(resolved), np.uint64).astype(np.float64)
        return (ticks[1] - ticks[0]) * period * 1e-9
    try:
        yield query, seconds
    finally:
        query.destroy()
        resolved.destroy()


def _span(plan, reps: int = 512, rounds: int = 3):
    """(wall, submit, gpu) µs per pass over `reps` passes of the plan, one pass a unit in
    command buffers as the bench records them (MetalBackend._batch), best of `rounds`."""
    best = None
    with _stamps() as (query, gpu_seconds):
        for _ in range(rounds):
            done = 0

            def record(enc, count):
                nonlocal done
                for _ in range(count):
                    cp = enc.begin_compute_pass()
                    if done == 0:
                        cp._write_timestamp(query, 0)
                    for d in plan.dispatches:
                        cp.set_pipeline(d.pipeline)
                        cp.set_bind_group(0, d.bind_group)
                        cp.dispatch_workgroups(*d.grid)
                    done += 1
                    if done == reps:
                        cp._write_timestamp(query, 1)
                    cp.end()
            buffers = B._batch(record, reps)
            start = time.perf_counter()
            B.device.queue.submit(buffers)
            submitted = time.perf_counter()
            B._run_and_wait([])       # the batch's last buffer ends with the fence copy
            done_at = time.perf_counter()
            row = ((done_at - start) / reps * 1e6, (submitted - start) / reps * 1e6,
                   gpu_seconds() / reps * 1e6)
            best = row if best is None or row[0] < best[0] else best
    return best


def _gpu_us(encode, units: int, rounds: int = 3) -> float:
    """GPU µs per unit by the timestamp queries that encode(query, units) writes as index 0
    (before the first unit) and 1 (after the last) into the command buffers it returns."""
    best = float("inf")
    with _stamps() as (query, gpu_seconds):
        for _ in range(rounds):
            B.device.queue.submit(encode(query, units))
            best = min(best, gpu_seconds() * 1e6 / units)
    return best


def passes(rng, shapes, units: int = 512):
    if not B.timestamps:
        print("passes: no timestamp queries inside passes on this adapter")
        return
    nop = B._compile("@compute @workgroup_size(64) fn main() {}")
    bump = B._compile(
        "@group(0) @binding(0) var<storage, read_write> d: array<u32>;\n"
        "@compute @workgroup_size(64) fn main(@builtin(local_invocation_index) i: u32) {\n"
        "    if (i == 0u) { d[0] = d[0] + 1u; }\n}")
    word = B._buffer(256)
    bump_group = B._bind_group(bump, [(word, 0, 256)])

    def encode(pipe, group, per_pass, per_buffer, dispatch=True):
        def build(query, count):
            buffers, enc, cp = [], None, None
            for u in range(count):
                if enc is None:
                    enc = B.device.create_command_encoder()
                if cp is None:
                    cp = enc.begin_compute_pass()
                if u == 0:
                    cp._write_timestamp(query, 0)
                if dispatch:
                    cp.set_pipeline(pipe)
                    if group is not None:
                        cp.set_bind_group(0, group)
                    cp.dispatch_workgroups(1)
                if u == count - 1:
                    cp._write_timestamp(query, 1)
                if (u + 1) % per_pass == 0 or u == count - 1:
                    cp.end()
                    cp = None
                if (u + 1) % per_buffer == 0 or u == count - 1:
                    buffers.append(enc.finish())
                    enc = None
            return buffers
        return build

    rows = [("no bindings: a pass each", encode(nop, None, 1, BATCH)),
            ("no bindings: one pass", encode(nop, None, units, units)),
            ("read_write word: a pass each", encode(bump, bump_group, 1, BATCH)),
            ("read_write word: one pass", encode(bump, bump_group, units, units)),
            ("read_write word: a command buffer each", encode(bump, bump_group, 1, 1)),
            ("empty passes (no dispatch)", encode(nop, None, 1, BATCH, dispatch=False))]
    for name, build in rows:
        print(f"passes {name:40s} {_gpu_us(build, units):6.2f} us a unit", flush=True)
    word.destroy()


BATCH = mb.BATCH_UNITS


def span(rng, shapes):
    if not B.timestamps:
        print("span: no timestamp queries inside passes on this adapter")
        return
    for k, n in ((128, 64), *shapes):
        w = weight(rng, k, n)
        for m in (1, 16):
            a = rng.standard_normal((m, k)).astype(np.float16)
            with B._lock:
                plan = B._timing_plan(a, w, 0)
                wall, submit, gpu = _span(plan)
            print(f"span {k}x{n} M={m} [{B.plan_summary(w, m, 0)}]: a pass {wall:.1f} us wall, "
                  f"{submit:.1f} us in submit, {gpu:.1f} us by the GPU clock", flush=True)


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
        {"math": math, "fixed": fixed, "span": span, "passes": passes}[step](rng, shapes)
