"""A few ferrum.mm launches for ncu: python ncu_target.py K,N,M [...]"""
import sys

import torch

import ferrum
import ferrum.cuda
from ferrum import _cuda_bench as B

for spec in sys.argv[1:]:
    k, n, m = (int(v) for v in spec.split(","))
    w = B._weights(torch, ferrum, k, n, 1)[0]
    a = torch.randn(m, k, device="cuda", dtype=torch.float16)
    for _ in range(5):
        ferrum.cuda.BACKEND.mm(a, w, 0, None)
    torch.cuda.synchronize()
