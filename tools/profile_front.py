"""cProfile of ferrum.mm's host path on torch tensors (4096x4096, M=1, out= given)."""
import cProfile
import pstats

import torch

import ferrum
from ferrum import _cuda_bench as B

w = B._weights(torch, ferrum, 4096, 4096, 1)[0]
a = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
out = torch.empty(1, 4096, device="cuda", dtype=torch.float16)
for _ in range(100):
    ferrum.mm(a, w, out=out)
torch.cuda.synchronize()
profile = cProfile.Profile()
profile.enable()
for _ in range(3000):
    ferrum.mm(a, w, out=out)
profile.disable()
torch.cuda.synchronize()
pstats.Stats(profile).sort_stats("tottime").print_stats(18)
