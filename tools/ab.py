"""Time the planner's own choice (auto tile, m_blocks, splits) on chosen shapes, the way
`ferrum bench` does (graph-replayed bursts over weight copies that exceed 4x L2), for A/B
comparisons between builds (PYTHONPATH) or settings (FERRUM_* variables) on one machine.
usage: python ab.py LABEL "K,N,M" ... [--group=G]   prints one line per shape: LABEL K N M plan us
(--group: the weights' scale groups, -1 channelwise; the bench's 128 by default)"""
import math
import sys

import torch

import ferrum
import ferrum.cuda
from ferrum import _cuda_bench as B

label = sys.argv[1]
specs = [a for a in sys.argv[2:] if not a.startswith("--group=")]
group = next((int(a.split("=")[1]) for a in sys.argv[2:] if a.startswith("--group=")), B.GROUP)
backend = ferrum.cuda.BACKEND
by_kn = {}
for spec in specs:
    k, n, m = (int(v) for v in spec.split(","))
    by_kn.setdefault((k, n), []).append(m)
for (k, n), ms in by_kn.items():
    copies = max(2, math.ceil(B.L2_FACTOR_BYTES / (k * n // 2)))
    weights = B._weights(torch, ferrum, k, n, copies, group)
    for m in ms:
        a = torch.randn(m, k, device="cuda", dtype=torch.float16)
        out = torch.empty(m, n, device="cuda", dtype=torch.float16)
        t = B._time_graph(torch, lambda i: backend.mm(
            a, weights[i % copies], 0, out, stream=torch.cuda.current_stream().cuda_stream),
            max(copies, 16), 7)
        p = ferrum._cuda.mm_plan(m, k, n, group_size=group)
        print(f"{label} {k} {n} {m} t{p['tile']}/mb{p['m_blocks']}/s{p['splits']} {t:.2f}", flush=True)
    del weights
    torch.cuda.empty_cache()
