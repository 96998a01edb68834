"""Host overhead of a metal mm call: `python tools/metal_host_overhead.py` (after pip install -e .).

Prints, for the C-API call path (metal/backend.py _Native) and wgpu-py's public API, alternated
in rounds within one process:
  round trip   copy 16 bytes, submit, wait, map, unmap (no kernel): the fixed cost of one call
  mm call      ferrum.mm end to end for small M=1 shapes, beside kernel_seconds
Medians of per-round medians, µs.

Caution (seen on lavapipe, 2 cores): within one process the wgpu-py path's mm calls came out
~2x slower than the same code in a fresh process (base commit: 128x64 M=1 ~260-350 µs), so
compare whole calls across fresh processes too (FERRUM_METAL_NATIVE=0 selects wgpu-py's path).
"""

from __future__ import annotations

import time

import numpy as np
import wgpu

import ferrum
from ferrum.metal import BACKEND as B


def _median_us(fn, calls=200, rounds=5):
    return [np.median([_once(fn) for _ in range(calls)]) * 1e6 for _ in range(rounds)]


def _once(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    print(B.info().device, "|", B.info().version)
    native = B._native
    buf = B._buffer(256)
    st = B.device.create_buffer(size=256,
                                usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)

    def rt_native():
        native.run([], [], (buf, st, 16), 16)
        native.unmap(st)

    def rt_wgpu():
        enc = B.device.create_command_encoder()
        enc.copy_buffer_to_buffer(buf, 0, st, 0, 16)
        B.device.queue.submit([enc.finish()])
        st.map_sync(wgpu.MapMode.READ, 0, 16)
        st.unmap()

    paths = [("wgpu-py", rt_wgpu)] + ([("native", rt_native)] if native else [])
    for f in (rt_wgpu, rt_native) if native else (rt_wgpu,):
        for _ in range(20):
            f()
    res = {name: [] for name, _ in paths}
    for _ in range(3):
        for name, f in paths:
            res[name] += _median_us(f, rounds=1)
    print("round trip us: " + ", ".join(f"{k} {np.median(v):.1f}" for k, v in res.items()))

    rng = np.random.default_rng(0)
    for k, n in [(128, 64), (1024, 1024), (4096, 4096)]:
        q = rng.integers(0, 2**32, (k // 8, n), dtype=np.uint32).view(np.int32)
        s = (rng.uniform(0.5, 1.5, (k // 128, n)) / (8 * np.sqrt(k))).astype(np.float16)
        w = ferrum.MarlinWeight.from_gptq(q, s, group_size=128, backend="metal")
        a = rng.standard_normal((1, k)).astype(np.float16)
        out = np.empty((1, n), np.float16)
        res = {}
        try:
            for _ in range(3):
                for name, nat in [("wgpu-py", None)] + ([("native", native)] if native else []):
                    B._native = nat
                    ferrum.mm(a, w, out=out)
                    res.setdefault(name, []).extend(_median_us(lambda: ferrum.mm(a, w, out=out),
                                                               calls=50, rounds=1))
        finally:
            B._native = native
        kernel = B.kernel_seconds(a, w, 0, 0.3) * 1e6
        print(f"{k}x{n} M=1: kernel {kernel:.1f} us; mm call " + ", ".join(
            f"{name} {np.median(v):.1f}" for name, v in res.items()))


if __name__ == "__main__":
    main()
