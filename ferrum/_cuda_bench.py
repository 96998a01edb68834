"""`python -m ferrum bench --backend cuda`: ferrum mm vs cuBLAS FP16 and the HBM floor.

Method: for each layer shape, enough weight copies to exceed 4x L2 (so every call streams its
weight from HBM) are created on the GPU; a burst of calls rotating through them is captured in
a CUDA graph and replayed; CUDA events time each replay; the median over several bursts divided
by the burst length is the time per call. cuBLAS (torch.matmul on float16 [K, N] copies) is
timed the same way in the same run; the HBM floor is the bytes one call must move over the
fastest of three streaming rates measured here on 1 GiB buffers: PyTorch's device-to-device
copy (read + write bytes), and ferrum's own probes (``_cuda.stream_probe``: a copy with 16-byte
vectors, read + write bytes, and a read-only stream). On an H200 the first moved 2.77 TB/s,
below what the mm kernels themselves stream (the 70B gate_up cells at M <= 16 ran at 120% of
a floor drawn from it), so the floor takes the fastest. Needs PyTorch for graphs, events and cuBLAS.

Each cell (ferrum, then cuBLAS) starts after the GPU has idled SETTLE_S seconds: the
large-M cells draw the GPU to its power cap, and the clock stays lowered for a while after
(nvidia-smi on an H200: "SW power cap", 1.4-1.9 GHz instead of 1.98 for ~0.5 s). Without the
pause the next shape's M=1 cells ran in that state; ferrum at M <= 16 is bound by instruction
issue and followed the clock (70B down M=1 50 us after 70B gate_up's M=1024 cells, 38 us
after an idle GPU), cuBLAS there by bytes and much less.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

SHAPES = [  # (K, N, name)
    (4096, 6144, "8B qkv"), (4096, 4096, "8B o"), (4096, 28672, "8B gate_up"),
    (14336, 4096, "8B down"), (8192, 10240, "70B qkv"), (8192, 8192, "70B o"),
    (8192, 57344, "70B gate_up"), (28672, 8192, "70B down"),
]
M_VALUES = (1, 16, 64, 256, 1024)
GROUP = 128
SETTLE_S = 1.0   # idle time before each cell (see the module docstring)
L2_FACTOR_BYTES = 4 * 50 * 2 ** 20   # copies of the weights together exceed 4x the 50 MB L2


def _time_graph(torch, fn, burst: int, bursts: int) -> float:
    """Median µs per call of `fn(i)` for i in 0..burst-1, captured once and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(burst):   # warm-up: workspaces, kernel attributes, cuBLAS handles
            fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(burst):
            fn(i)
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(bursts):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / burst)
    del graph
    return statistics.median(times)


def stream_rates(torch, ferrum) -> dict:
    """Bytes/s each way of streaming 1 GiB: "copy" (PyTorch's device-to-device copy) and
    "probe copy" (ferrum's), counting bytes read plus bytes written, and "probe read" (read
    only)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    src.random_(0, 256)
    dst = torch.empty_like(src)
    stream = lambda: torch.cuda.current_stream().cuda_stream
    probe = ferrum._cuda.stream_probe
    runs = {"copy": (lambda i: dst.copy_(src), 2),
            "probe copy": (lambda i: probe(src.data_ptr(), dst.data_ptr(), src.numel(), 4, stream()), 2),
            "probe read": (lambda i: probe(src.data_ptr(), 0, src.numel(), 4, stream()), 1)}
    return {name: ways * src.numel() / (_time_graph(torch, fn, 4, 5) * 1e-6) for name, (fn, ways) in runs.items()}


def host_overhead(torch, ferrum) -> dict:
    """µs per ferrum.mm call on device arrays: host time to issue, plain loop, graph replay.
    Each host-side figure is the best of 5 batches of 200 calls (a batch's mean includes
    whatever else the host did meanwhile)."""
    k, n = 4096, 4096
    w = _weights(torch, ferrum, k, n, 1)[0]
    a = torch.randn(1, k, device="cuda", dtype=torch.float16)
    out = torch.empty(1, n, device="cuda", dtype=torch.float16)
    stream = torch.cuda.current_stream().cuda_stream
    backend = ferrum.cuda.BACKEND
    calls = 200

    def best(fn, sync_inside=False):
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            if sync_inside:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
        return min(times)

    for _ in range(20):
        ferrum.mm(a, w, out=out, stream=stream)
    issue = best(lambda: ferrum.mm(a, w, out=out, stream=stream))
    plain = best(lambda: ferrum.mm(a, w, out=out, stream=stream), sync_inside=True)
    alloc_issue = best(lambda: ferrum.mm(a, w, stream=stream))   # result allocated by torch each call
    backend_issue = best(lambda: backend.mm(a, w, 0, out, stream=stream))   # without the front API checks
    graph = _time_graph(torch, lambda i: ferrum.mm(a, w, out=out, stream=torch.cuda.current_stream().cuda_stream), 50, 5)
    return {"issue_us": issue, "issue_alloc_us": alloc_issue, "plain_us": plain, "graph_us": graph,
            "backend_issue_us": backend_issue}


def _weights(torch, ferrum, k, n, copies, group=GROUP):
    """`copies` random Marlin weights of K x N (random words are valid uint4b8 weights), with
    scale groups of `group` rows (-1: one group, channelwise)."""
    groups = 1 if group == -1 else k // group
    out = []
    for _ in range(copies):
        q = torch.randint(-2 ** 31, 2 ** 31 - 1, (k // 16, 2 * n), dtype=torch.int32, device="cuda")
        s = (torch.rand(groups, n, device="cuda") * 0.02 + 0.005).to(torch.float16)
        out.append(ferrum.MarlinWeight(q, s, size_k=k, size_n=n, group_size=group, backend="cuda"))
    return out


def run(options: dict) -> None:
    """options: quick, seed; shapes [(K, N)], m_values, group_size (python -m ferrum bench's
    --shapes, --m, --group-size; each None for the layers, rows and G = 128 above)."""
    try:
        import torch
    except ImportError:
        print("ferrum bench --backend cuda needs PyTorch (CUDA graphs, events, cuBLAS)")
        return
    import ferrum
    import ferrum.cuda
    from . import format as F
    quick = bool(options.get("quick"))
    shapes = ([(k, n, f"{k}x{n}") for k, n in options["shapes"]] if options.get("shapes")
              else SHAPES[:3] if quick else SHAPES)
    m_values = options.get("m_values") or ((1, 16, 256) if quick else M_VALUES)
    group = options.get("group_size") or GROUP
    bursts = 5 if quick else 9
    rates = stream_rates(torch, ferrum)
    bw = max(rates.values())
    print(f"streaming 1 GiB: device-to-device copy {rates['copy'] / 1e12:.2f} TB/s, ferrum's probe copy "
          f"{rates['probe copy'] / 1e12:.2f} TB/s (both read + write), probe read {rates['probe read'] / 1e12:.2f} "
          f"TB/s; floor = bytes / {bw / 1e12:.2f} TB/s (the fastest); G={group}; "
          f"µs per call, median of {bursts} graph-replayed bursts")
    ho = host_overhead(torch, ferrum)
    print(f"host overhead, 4096x4096 M=1, torch arrays, out= given, best of 5 x 200 calls: issue {ho['issue_us']:.1f} µs/call "
          f"(with torch-allocated result {ho['issue_alloc_us']:.1f}), plain loop "
          f"{ho['plain_us']:.1f} µs/call, graph replay {ho['graph_us']:.1f} µs/call; backend.mm "
          f"alone (no front-API checks) issues in {ho['backend_issue_us']:.1f} µs/call")
    header = (f"{'layer':12s} {'K':>6s} {'N':>6s} {'M':>5s} {'ferrum':>9s} {'cuBLAS':>9s} "
              f"{'ratio':>6s} {'floor':>8s} {'%floor':>7s}  config")
    print(header)
    print("-" * len(header))
    rows = []
    for k, n, name in shapes:
        wbytes = k * n // 2 + F.num_groups(k, group) * n * 2
        copies = max(2, math.ceil(L2_FACTOR_BYTES / wbytes))
        weights = _weights(torch, ferrum, k, n, copies, group)
        dense_copies = max(1, math.ceil(L2_FACTOR_BYTES / (k * n * 2)))
        dense = [torch.randn(k, n, device="cuda", dtype=torch.float16) for _ in range(dense_copies)]
        for m in m_values:
            a = torch.randn(m, k, device="cuda", dtype=torch.float16)
            out = torch.empty(m, n, device="cuda", dtype=torch.float16)
            out_d = torch.empty(m, n, device="cuda", dtype=torch.float16)
            burst = max(copies, 8 if m >= 256 else 16)
            torch.cuda.synchronize()
            time.sleep(SETTLE_S)
            t_f = _time_graph(torch, lambda i: ferrum.mm(
                a, weights[i % copies], out=out, stream=torch.cuda.current_stream().cuda_stream), burst, bursts)
            t_c = _time_graph(torch, lambda i: torch.matmul(a, dense[i % dense_copies], out=out_d),
                              max(dense_copies, 4), bursts)
            floor = (wbytes + m * k * 2 + m * n * 2) / bw * 1e6
            plan = ferrum._cuda.mm_plan(m, k, n, group_size=group)
            cfg = (f"tile{plan['tile']} mb{plan['m_blocks']} "
                   + (f"streamK{plan['sk_iters']}" if plan["stream_k"] else f"splits{plan['splits']}")
                   + f" grid{plan['grid']}")
            rows.append((name, k, n, m, t_f, t_c))
            print(f"{name:12s} {k:6d} {n:6d} {m:5d} {t_f:9.1f} {t_c:9.1f} {t_c / t_f:6.2f} "
                  f"{floor:8.1f} {100 * floor / t_f:6.0f}%  {cfg}", flush=True)
        del weights, dense
        torch.cuda.empty_cache()
