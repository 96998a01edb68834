"""Host overhead of ferrum.mm on device arrays: µs per call, calls issued back to back.

    python3 tools/overhead.py [--stub] [--before DIR] [--calls N]

On a GPU machine (cuda backend available, PyTorch installed): 4096x4096, M=1, real tensors and
real launches, no sync inside the timed loop; rows for torch, cupy (if installed), ferrum's
DeviceArray, a generic __cuda_array_interface__ wrapper and a DLPack-only wrapper.

--stub (automatic when the cuda backend is not available): the CUDA layer is replaced by a stub
whose mm does nothing (tests/fake_device.py) and the arrays by stand-ins exposing the same
attributes (torch / cupy stand-ins only where the real library is absent). This measures only
the Python on the path, which is what the front API adds; a stand-in's attributes cost
somewhat less than a real torch tensor's.

--before DIR: run the same rows again with the ferrum sources at DIR (a checkout or an export
of another revision, e.g. `git archive main ferrum cpu metal | tar -x -C DIR`) in a child
process, and print both columns. The compiled extension comes from the installed ferrum.

Each number is the best of 5 batches of --calls calls (after a warm-up), and the best over
--rounds runs, before and after alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

K = N = 4096


def per_call(fn, calls, sync=lambda: None, batches=5):
    for _ in range(50):
        fn()
    sync()
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t0)
        sync()
    return best / calls * 1e6


def _weight_cuda(ferrum):
    from ferrum.check import random_problem
    import numpy as np
    prob = random_problem(np.random.default_rng(0), K, N, 128)
    host = ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=128)
    return host.to("cuda")


def rows_stub(calls):
    """(name, µs) rows with the stub CUDA layer and stand-in arrays."""
    import fake_device as FD
    with FD.fake_modules() as fakes, FD.stub_cuda(record=False) as stub:
        import ferrum
        import ferrum.cuda
        be = ferrum.cuda.BACKEND
        w = _weight_cuda(ferrum)
        r = be._resident(w)
        kinds = []
        if fakes["torch"] is not None:
            torch = fakes["torch"]
            kinds.append(("torch stand-in", torch.Tensor((1, K)), torch.Tensor((1, N))))
        if fakes["cupy"] is not None:
            cupy = fakes["cupy"]
            kinds.append(("cupy stand-in", cupy.ndarray((1, K)), cupy.ndarray((1, N))))
        kinds.append(("__cuda_array_interface__", FD.CAIArray((1, K)), FD.CAIArray((1, N))))
        kinds.append(("DLPack only", FD.DLPackArray((1, K)), FD.DLPackArray((1, N))))
        out = [("stub _cuda.mm (the launch, a no-op here)",
                per_call(lambda: stub.mm(1, r.b, r.s, 2, 0, 1, K, N, 0, 1, 32, 128, N, 0), calls))]
        out += _api_rows(ferrum, be, w, kinds, calls)
        return out


def _api_rows(ferrum, be, w, kinds, calls, sync=lambda: None):
    rows = []
    for kind, a, c in kinds:
        rows.append((f"{kind}: BACKEND.mm(a, w, 0, out) (backend glue)",
                     per_call(lambda: be.mm(a, w, 0, c), calls, sync)))
        rows.append((f"{kind}: BACKEND.mm(a, w, 0, None) (backend glue, allocating)",
                     per_call(lambda: be.mm(a, w, 0, None), calls, sync)))
        rows.append((f"{kind}: ferrum.mm(a, w, out=out)",
                     per_call(lambda: ferrum.mm(a, w, out=c), calls, sync)))
        rows.append((f"{kind}: ferrum.mm(a, w, out=out, backend='cuda') (no direct path)",
                     per_call(lambda: ferrum.mm(a, w, out=c, backend="cuda"), calls, sync)))
        rows.append((f"{kind}: ferrum.mm(a, w)",
                     per_call(lambda: ferrum.mm(a, w), calls, sync)))
    return rows


class _CAIWrapper:
    """A generic __cuda_array_interface__ array (as numba's are) over a torch tensor."""

    def __init__(self, t):
        self._t = t

    @property
    def __cuda_array_interface__(self):
        return self._t.__cuda_array_interface__


class _DLPackOnly:
    def __init__(self, t):
        self._t = t
        self.shape = tuple(t.shape)
        self.dtype = str(t.dtype).rsplit(".", 1)[-1]

    def __dlpack__(self, stream=None, **kwargs):
        return self._t.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def rows_gpu(calls):
    import torch
    import ferrum
    import ferrum.cuda
    from ferrum import _cuda
    from ferrum import _cuda_bench
    be = ferrum.cuda.BACKEND
    w = _cuda_bench._weights(torch, ferrum, K, N, 1)[0]   # made on the GPU: no numba compile
    r = be._resident(w)
    a = torch.randn(1, K, device="cuda", dtype=torch.float16)
    c = torch.empty(1, N, device="cuda", dtype=torch.float16)
    a_ptr, c_ptr = a.data_ptr(), c.data_ptr()
    sync = torch.cuda.synchronize
    rows = [("torch out.zero_() (one torch kernel launch, reference)",
             per_call(lambda: c.zero_(), calls, sync)),
            ("ferrum._cuda.mm, raw pointers (C API + launch)",
             per_call(lambda: _cuda.mm(a_ptr, r.b, r.s, c_ptr, 0, 1, K, N, 0, 1, 32, 128, N, 0),
                      calls, sync))]
    kinds = [("torch", a, c)]
    try:
        import cupy
        kinds.append(("cupy", cupy.asarray(a), cupy.asarray(c)))
    except ImportError:
        pass
    if ferrum.cuda.DeviceArray is not None:
        kinds.append(("ferrum DeviceArray", be.from_host(a.cpu().numpy()),
                      _cuda.empty((1, N), "float16")))
    kinds.append(("__cuda_array_interface__", _CAIWrapper(a), _CAIWrapper(c)))
    kinds.append(("DLPack only", _DLPackOnly(a), _DLPackOnly(c)))
    return rows + _api_rows(ferrum, be, w, kinds, calls, sync)


def measure(stub, calls):
    return rows_stub(calls) if stub else rows_gpu(calls)


def _child(source_dir, stub, calls):
    """The rows measured in a child process importing ferrum from `source_dir`."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(source_dir) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--json", "--calls", str(calls)]
    if stub:
        cmd.append("--stub")
    child = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE)
    if child.returncode:
        sys.exit(f"the --before run failed:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def _best(rows, new):
    """Row-wise minimum of two measurements (same rows, same order); `rows` may be None."""
    if rows is None:
        return [tuple(r) for r in new]
    best = dict(new)
    return [(name, min(us, best.get(name, us))) for name, us in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stub", action="store_true", help="no GPU: stub launch, stand-in arrays")
    parser.add_argument("--before", metavar="DIR", help="ferrum sources to compare against")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate before/after this many times; each row's best is shown")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)   # child mode
    args = parser.parse_args()
    import ferrum
    stub = args.stub or not ferrum._registry.info("cuda").available
    if args.json:
        print(json.dumps(measure(stub, args.calls)))
        return
    before = after = None
    for _ in range(args.rounds):   # alternate, so that drift of the machine hits both columns
        if args.before:
            before = _best(before, _child(args.before, stub, args.calls))
        after = _best(after, measure(stub, args.calls))
    mode = "stub launch, stand-in arrays (Python only)" if stub else "GPU"
    print(f"ferrum.mm host overhead, {K}x{N}, M=1, µs per call ({mode}); "
          f"ferrum at {os.path.dirname(ferrum.__file__)}")
    if before is None:
        for name, us in after:
            print(f"{us:8.2f}  {name}")
        return
    print(f"{'before':>8} {'after':>8}  (before: {args.before})")
    before = dict(before)
    for name, us in after:
        b = before.get(name)
        print(f"{b:8.2f} {us:8.2f}  {name}" if b is not None else f"{'':8} {us:8.2f}  {name}")


if __name__ == "__main__":
    main()
