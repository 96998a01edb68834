"""Tune the metal backend on a GPU: `python tools/metal_sweep.py [host] [m1] [small] [--quick]`.

  host    where a ferrum.mm call's time goes: each step of the C-API path timed (write A, record
          and finish, submit, wait for the read-back mapping, copy out, unmap), the upload through
          a mapped buffer against queue.write_buffer, and the call before and after a large-M
          call grew the workspaces
  m1      M=1 kernel µs over the planner's knobs: k-slots a workgroup x workgroup target (the
          k-split) x quads in flight
  small   M in 2..16 kernel µs over k-slots x M_TILE (8: two m-tiles at M=16; 16: one) x
          workgroup target
  kernels the planner's default against other settings on the bench's 8 shapes: M=1 (gemv's
          wide workgroups off, or always), M=16 (one 16-row m-tile, a smaller k-split target),
          M=32, 64, 256 (tiled's TM, BK, the k loop written out); one line per candidate, %
          of the read floor
  gpu     the GPU's own clock (timestamp queries) on mm's pass, one pass a submission: the whole
          pass and each dispatch, beside kernel_seconds (batched wall time), to tell the kernels'
          time from what surrounds them

Kernel µs is MetalBackend.kernel_seconds (batches of the plan's passes, submission and wait
timed). Works on an older checkout too (knobs it lacks are skipped), for a same-machine baseline.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import ferrum
from ferrum.metal import BACKEND as B

M1_SHAPES = [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192), (4096, 4096),
             (4096, 6144)]
SMALL_SHAPES = [(4096, 6144), (8192, 8192), (8192, 57344), (28672, 8192)]
HOST_SHAPES = [(4096, 4096), (8192, 8192)]
BIG_SHAPE = (8192, 28672)
BENCH_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (8192, 10240),
                (8192, 8192), (8192, 57344), (28672, 8192)]
QUICK = "--quick" in sys.argv
MIN_S = 0.05 if QUICK else 0.1
if "--tiny" in sys.argv:        # a smoke test of this script on a CPU adapter
    M1_SHAPES, SMALL_SHAPES, HOST_SHAPES = [(512, 256)], [(512, 256)], [(256, 128)]
    BIG_SHAPE, MIN_S = (512, 512), 0.01
    BENCH_SHAPES = [(512, 256), (1024, 128)]


def weight(rng, k, n):
    q = rng.integers(0, 2**32, (k // 8, n), dtype=np.uint32).view(np.int32)
    s = (rng.uniform(0.5, 1.5, (k // 128, n)) / (8 * np.sqrt(k))).astype(np.float16)
    return ferrum.MarlinWeight.from_gptq(q, s, group_size=128, backend="metal")


def knobs(**values):
    """Set the planner attributes this checkout has; returns the saved values (None: lacking)."""
    saved = {}
    for name, value in values.items():
        if not hasattr(B, name):
            return None
        saved[name] = getattr(B, name)
    for name, value in values.items():
        setattr(B, name, value)
    return saved


def kernel_us(a, w, **values):
    saved = knobs(**values)
    if saved is None:
        return None, ""
    try:
        return B.kernel_seconds(a, w, 0, MIN_S) * 1e6, B.plan_summary(w, a.shape[0], 0)
    finally:
        for name, value in saved.items():
            setattr(B, name, value)


def median_us(fn, calls=200 if not QUICK else 50):
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6


def host(rng):
    native = B._native
    print(f"\n== host: per-step medians, µs (path {'native' if native else 'wgpu-py'})")
    big = None
    for phase in ("fresh", "after a large-M call"):
        if phase != "fresh":
            big = weight(rng, *BIG_SHAPE)
            ferrum.mm(rng.standard_normal((256, BIG_SHAPE[0])).astype(np.float16), big)
        for k, n in HOST_SHAPES:
            w = weight(rng, k, n)
            for m in (1, 16):
                a = rng.standard_normal((m, k)).astype(np.float16)
                out = np.empty((m, n), np.float16)
                line = f"{phase:>20s} {k}x{n} M={m:<3d}"
                for mapped in ((True, False) if hasattr(B, "mapped_upload") else (None,)):
                    if mapped is not None:
                        B.mapped_upload = mapped
                    ferrum.mm(a, w, out=out)
                    call = median_us(lambda: ferrum.mm(a, w, out=out))
                    back = median_us(lambda: B.mm(a, w, 0, out))
                    tag = "" if mapped is None else ("mapped " if mapped else "write_buffer ")
                    line += f" | {tag}call {call:.1f} (backend {back:.1f})"
                if hasattr(B, "mapped_upload"):
                    B.mapped_upload = True
                kern = B.kernel_seconds(a, w, 0, MIN_S) * 1e6
                print(line + f" | kernel {kern:.1f}", flush=True)
                if native is not None and hasattr(B, "mapped_upload"):
                    steps(w, a, out)
    del big


def steps(w, a, out):
    """Each step of mm's native path, timed separately (medians of 200 calls)."""
    native = B._native
    ffi, lib, libf = native.ffi, native.lib, native.libf
    plan = B._plan(w, a.shape[0], 0)
    a_buf, c_buf = B._work["a"], B._work["c"]
    read = plan.read.buffer
    names = ("write A", "record+finish", "submit", "wait+map", "copy out", "unmap")
    times = {k: [] for k in names}
    for _ in range(200 if not QUICK else 50):
        t0 = time.perf_counter()
        native._write_mapped(plan.upload, a)
        t1 = time.perf_counter()
        enc = lib.wgpuDeviceCreateCommandEncoder(native.device_id, native._enc_desc)
        lib.wgpuCommandEncoderCopyBufferToBuffer(enc, plan.upload.buffer._internal, 0,
                                                 a_buf._internal, 0, a.nbytes)
        cp = lib.wgpuCommandEncoderBeginComputePass(enc, native._pass_desc)
        for pipe, group, (x, y, z) in plan.raw:
            lib.wgpuComputePassEncoderSetPipeline(cp, pipe)
            lib.wgpuComputePassEncoderSetBindGroup(cp, 0, group, 0, ffi.NULL)
            lib.wgpuComputePassEncoderDispatchWorkgroups(cp, x, y, z)
        lib.wgpuComputePassEncoderEnd(cp)
        lib.wgpuComputePassEncoderRelease(cp)
        lib.wgpuCommandEncoderCopyBufferToBuffer(enc, c_buf._internal, 0, read._internal, 0,
                                                 plan.out_bytes)
        cmd = libf.wgpuCommandEncoderFinish(enc, native._finish_desc)
        lib.wgpuCommandEncoderRelease(enc)
        t2 = time.perf_counter()
        native._cmds[0] = cmd
        libf.wgpuQueueSubmit(native.queue_id, 1, native._cmds)
        lib.wgpuCommandBufferRelease(cmd)
        plan.upload.request = native._map_async(plan.upload.buffer, native._map_write,
                                                plan.upload.size)
        t3 = time.perf_counter()
        raw = native.map(read, plan.out_bytes)
        t4 = time.perf_counter()
        out[...] = np.frombuffer(raw, np.float16).reshape(out.shape)
        t5 = time.perf_counter()
        native.unmap(read)
        t6 = time.perf_counter()
        for name, dt in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            times[name].append(dt)
    print("      steps: " + ", ".join(f"{k} {np.median(v) * 1e6:.1f}" for k, v in times.items()),
          flush=True)


def m1(rng):
    print("\n== M=1 kernel µs: k-slots a workgroup x workgroup target x quads in flight "
          "(target: target_workgroups; gemv aims for its GEMV_TARGET_SHARE, in 8-slot units)")
    for k, n in M1_SHAPES:
        w = weight(rng, k, n)
        a = rng.standard_normal((1, k)).astype(np.float16)
        us, plan = kernel_us(a, w)
        floor = (k * n // 2 + k * n // 64) / 3.159e12 * 1e6
        print(f"{k}x{n}: default {us:.1f} [{plan}] (floor at 3159 GB/s {floor:.1f})", flush=True)
        if not hasattr(B, "gemv_k_slots"):
            continue
        for slots in (8, 16, 32):
            for t in (512, 1024, 2048, 4096):
                row = []
                for lo in (1, 2):
                    us, plan = kernel_us(a, w, gemv_k_slots=slots, target_workgroups=t,
                                         gemv_loads=lo)
                    row.append(f"l{lo} {us:6.1f} [{plan}]")
                print(f"   slots {slots:2d} target {t:5d}: " + " | ".join(row), flush=True)
        del w


def small(rng):
    print("\n== M in 2..16 kernel µs: k-slots x M_TILE x workgroup target")
    for k, n in SMALL_SHAPES:
        w = weight(rng, k, n)
        for m in (2, 4, 8, 16):
            a = rng.standard_normal((m, k)).astype(np.float16)
            us, plan = kernel_us(a, w)
            print(f"{k}x{n} M={m}: default {us:.1f} [{plan}]", flush=True)
            if not hasattr(B, "gemv_k_slots") or (m not in (4, 16) and QUICK):
                continue
            for slots in (8, 16):
                for tile in ((8, 16) if m == 16 else (16,)):
                    row = []
                    for t in (512, 1024, 2048):
                        us, plan = kernel_us(a, w, gemv_k_slots=slots, vector_m_tile=tile,
                                             target_workgroups=t)
                        row.append(f"t{t} {us:7.1f} [{plan}]")
                    print(f"   slots {slots:2d} m_tile {tile:2d}: " + " | ".join(row), flush=True)
        del w


def kernels(rng):
    """Candidate settings of every kernel, per bench shape; the planner's default first."""
    rates = B.stream_bandwidth(64 << 20 if "--tiny" in sys.argv else 512 << 20, min_seconds=0.2)
    read = rates["shader read"]
    print(f"\n== kernels: kernel µs per candidate (shader read {read / 1e9:.0f} GB/s)", flush=True)
    m1 = [dict(gemv_wide=False), dict(gemv_k_slots=32, target_workgroups=1)]
    m16 = [dict(vector_m_tile=16), dict(target_workgroups=512)]
    m32 = [dict(tiled_tm=4), dict(tiled_unroll=True), dict(tiled_tm=4, tiled_unroll=True)]
    m64 = [dict(tiled_unroll=True), dict(tiled_bk=32), dict(tiled_bk=32, tiled_unroll=True),
           dict(tiled_tm=8, tiled_unroll=True)]
    m256 = [dict(tiled_unroll=True), dict(tiled_bk=32, tiled_unroll=True)]
    for k, n in BENCH_SHAPES:
        w = weight(rng, k, n)
        for m, cands in ((1, m1), (16, m16), (32, m32), (64, m64), (256, m256)):
            a = rng.standard_normal((m, k)).astype(np.float16)
            floor = (k * n // 2 + k * n // 64 + 2 * m * (k + n)) / read * 1e6
            for c in [{}] + cands:
                try:
                    us, plan = kernel_us(a, w, **c)
                except Exception as exc:        # report, go on with the next candidate
                    print(f"{k}x{n} M={m} {c}: failed {type(exc).__name__}: {exc}", flush=True)
                    continue
                knobs_text = " ".join(f"{key}={v}" for key, v in c.items()) or "default"
                print(f"{k:>6d}x{n:<6d} M={m:<3d} {us:9.1f} us {100 * floor / us:5.1f}% "
                      f"[{plan}] {knobs_text}", flush=True)
        del w


def gpu(rng):
    if not getattr(B, "timestamps", False):
        print("\n== gpu: no timestamp queries inside passes on this device")
        return
    print("\n== gpu: µs by GPU timestamps (median of 50 single-pass submissions) vs kernel_seconds")
    for k, n in M1_SHAPES:
        w = weight(rng, k, n)
        for m in (1, 16):
            a = rng.standard_normal((m, k)).astype(np.float16)
            whole, *each = B.pass_gpu_seconds(a, w, 0)
            kern = B.kernel_seconds(a, w, 0, MIN_S)
            print(f"{k}x{n} M={m:<3d} pass {whole * 1e6:7.1f} (dispatches "
                  + " + ".join(f"{s * 1e6:.1f}" for s in each)
                  + f")  kernel_seconds {kern * 1e6:7.1f}  [{B.plan_summary(w, m, 0)}]", flush=True)
        del w


def main():
    info = B.info()
    print(info.device, "|", info.version)
    rng = np.random.default_rng(0)
    parts = [p for p in sys.argv[1:] if not p.startswith("--")] or ["host", "m1", "small", "gpu"]
    for part in parts:
        {"host": host, "m1": m1, "small": small, "gpu": gpu, "kernels": kernels}[part](rng)


if __name__ == "__main__":
    main()
