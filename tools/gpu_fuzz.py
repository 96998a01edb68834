"""Random problems on a GPU backend for a while: shapes, group sizes, act-order, stacked experts
(one or all), row counts across every kernel's range, and on cuda the ways a caller hands arrays
in (numpy, torch, cupy, a strided torch view; out= given, poisoned with NaN, or not).

Each product is compared with float64 and with the cpu backend (relative Frobenius error <= 1e-3,
no NaN left). `ferrum check` runs fixed small shapes; this reaches the planner's choices on
larger, odd ones (K up to 6144, N up to 6144, M up to 700).

usage: python tools/gpu_fuzz.py [cuda|metal] [seconds] [seed]   exits non-zero on any failure
"""
import sys
import time
import traceback

import numpy as np

import ferrum
from ferrum.check import MM_TOLERANCE, random_problem, rel_error

backend = sys.argv[1] if len(sys.argv) > 1 else "cuda"
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
seed = int(sys.argv[3]) if len(sys.argv) > 3 else int(np.random.SeedSequence().entropy % 2 ** 32)
rng = np.random.default_rng(seed)
kinds = ["numpy"]
if backend == "cuda":
    for lib in ("torch", "cupy"):
        try:
            __import__(lib)
            kinds += [lib] + (["torch_strided"] if lib == "torch" else [])
        except ImportError:
            pass


def device_array(kind, a):
    """a (numpy) as `kind`, and a poisoned out of shape `shape` of the same kind."""
    if kind == "numpy":
        return a, lambda shape: np.full(shape, np.nan, np.float16)
    if kind == "cupy":
        import cupy
        return cupy.asarray(a), lambda shape: cupy.full(shape, np.nan, cupy.float16)
    import torch
    full = lambda shape: torch.full(shape, float("nan"), dtype=torch.float16, device="cuda")
    if kind == "torch":
        return torch.from_numpy(a).cuda(), full
    wide = torch.zeros((a.shape[0], 2 * a.shape[1]), dtype=torch.float16, device="cuda")
    wide[:, ::2] = torch.from_numpy(a).cuda()
    return wide[:, ::2], full   # every other column: not contiguous


def host(x):
    # Read back through the array's own library, not ferrum's to_host: one less ferrum path
    # trusted by its own check.
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):       # cupy
        return x.get()
    return x.cpu().numpy()      # torch


end, count, bad = time.time() + seconds, 0, 0
while time.time() < end:
    count += 1
    size_k, size_n = 128 * int(rng.integers(1, 49)), 64 * int(rng.integers(1, 97))
    group = int(rng.choice([-1, 32, 64, 128, size_k]))
    act = group in (32, 64, 128) and group < size_k and rng.random() < 0.3
    experts = int(rng.integers(2, 5)) if rng.random() < 0.2 else 1     # act-order stacks too
    expert = None if experts == 1 or rng.random() < 0.4 else int(rng.integers(0, experts))
    m = int(rng.choice([rng.integers(1, 9), rng.integers(9, 17), rng.integers(17, 65),
                        rng.integers(65, 701)]))
    kind, use_out = str(rng.choice(kinds)), bool(rng.random() < 0.5)
    what = (f"#{count} M={m} K={size_k} N={size_n} G={group} act={act} E={experts} "
            f"expert={expert} {kind} out={use_out}")
    try:
        p = random_problem(rng, size_k, size_n, group, act_order=act, experts=experts)
        if experts == 1:
            w = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=group,
                                              g_idx=p.g_idx, backend=backend)
        else:
            w = ferrum.load_stacked(p.qweights, p.scales, group_size=group, g_idx=p.g_idx,
                                    backend=backend)
        a = rng.standard_normal((m, size_k)).astype(np.float16)
        dense = p.dense[expert] if expert is not None else np.concatenate(p.dense, axis=1)
        ref = a.astype(np.float64) @ dense
        ax, make_out = device_array(kind, a)
        out = make_out(ref.shape) if use_out else None
        got = ferrum.mm(ax, w, expert=expert, out=out)
        if use_out and got is not out:
            raise AssertionError("mm did not return the out= it was given")
        got = host(got)
        on_cpu = ferrum.mm(a, w.to("cpu"), expert=expert)
        err, err_cpu = rel_error(got, ref), rel_error(got, on_cpu.astype(np.float64))
        if got.shape != ref.shape or not (err <= MM_TOLERANCE and err_cpu <= MM_TOLERANCE):
            bad += 1
            print(f"BAD {what}: shape {got.shape}, error {err:.2e}, vs cpu {err_cpu:.2e}", flush=True)
    except Exception as exc:   # a crash is a failure too: report it and go on
        bad += 1
        print(f"EXC {what}: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(limit=3)
print(f"gpu_fuzz {backend} seed {seed}: {count} problems, {bad} failed", flush=True)
sys.exit(1 if bad else 0)
