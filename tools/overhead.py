"""Where the host time of one mm call goes (4096x4096, M=1, torch tensors, out= given).
Each line: µs per call issued back to back (no sync inside), 2000 calls after warm-up."""
import time

import torch

import ferrum
import ferrum.cuda
from ferrum import _cuda
from ferrum import _cuda_bench as B

w = B._weights(torch, ferrum, 4096, 4096, 1)[0]
a = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
out = torch.empty(1, 4096, device="cuda", dtype=torch.float16)
r = ferrum.cuda.BACKEND._resident(w)
a_ptr, c_ptr = a.data_ptr(), out.data_ptr()
be = ferrum.cuda.BACKEND


def per_call(fn, calls=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return t


rows = [
    ("torch out.zero_() (one torch kernel launch, reference)", lambda: out.zero_()),
    ("ferrum._cuda.mm, raw pointers (C API + launch)", lambda: _cuda.mm(a_ptr, r.b, r.s, c_ptr, 0, 1, 4096, 4096, 0, 1, 32, 128, 4096, 0)),
    ("ferrum.cuda.BACKEND.mm(a, w, 0, out) (backend glue)", lambda: be.mm(a, w, 0, out)),
    ("ferrum.mm(a, w, out=out) (front API + backend)", lambda: ferrum.mm(a, w, out=out)),
    ("ferrum.mm(a, w) (front API, torch-allocated result)", lambda: ferrum.mm(a, w)),
]
for name, fn in rows:
    print(f"{per_call(fn):7.2f} us/call  {name}", flush=True)
