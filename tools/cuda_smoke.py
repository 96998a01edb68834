"""A small representative run of the CUDA backend for compute-sanitizer (memcheck, racecheck).

numpy only (no torch import under the sanitizer): repack with and without perm, mm for every
group-size kind, act-order, stacked experts, split-K forced on, partial column tiles, several M.
An inf and a NaN in A (the swapped kernel's exact path). Exits non-zero if any result is off. --quick: three of the problems and M 1, 12 and 70 only (every
kernel kind still runs: the swapped kernel (M <= 8), tiles 1, 2, 7, the wgmma tiles (4-6, 8, 9), split-K,
stream-K on tile 1 and on the wgmma tiles 5, 6, 8 and 9, act-order, stacked).
"""
import sys

import numpy as np

import ferrum
from ferrum import format as F
from ferrum.check import random_problem

rng = np.random.default_rng(1)
failures = 0


def check(name, got, ref):
    global failures
    got = np.asarray(got, np.float64)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref) if np.isfinite(got).all() else np.inf
    ok = err <= 1e-3
    failures += not ok
    print(f"{'ok ' if ok else 'BAD'} {name}: rel err {err:.2e}", flush=True)


k, n = 512, 320
q = F.pack_gptq(rng.integers(0, 16, (k, n), dtype=np.uint32))
perm = rng.permutation(k).astype(np.int32)
for p in (None, perm):
    same = np.array_equal(ferrum.repack(q, k, n, perm=p, backend="cuda"), F.repack_reference(q, k, n, p))
    failures += not same
    print(f"{'ok ' if same else 'BAD'} repack perm={p is not None}", flush=True)

cases = [(512, 320, -1, False), (512, 320, 32, False), (256, 192, 64, True), (1024, 256, 128, False),
         (256, 128, 256, False)]
quick = "--quick" in sys.argv
if quick:   # channelwise, G=32, act-order G=64 and G=128 (the FP32 scales of 16-row wgmma blocks)
    cases = cases[:4]
for k, n, g, act in cases:
    pr = random_problem(rng, k, n, g, act_order=act)
    w = ferrum.MarlinWeight.from_gptq(pr.qweights[0], pr.scales[0], group_size=g, g_idx=pr.g_idx,
                                      backend="cuda")
    for m in (1, 12, 20, 70):
        a = rng.standard_normal((m, k)).astype(np.float16)
        ref = a.astype(np.float64) @ pr.dense[0]
        check(f"K{k} N{n} G{g} act={act} M{m}", ferrum.mm(a, w), ref)
        check(f"K{k} N{n} G{g} act={act} M{m} split", ferrum.cuda.BACKEND.mm(a, w, 0, None, splits=3), ref)
        check(f"K{k} N{n} G{g} act={act} M{m} tile1", ferrum.cuda.BACKEND.mm(a, w, 0, None, tile=1, splits=2), ref)
        if k % 256 == 0:
            check(f"K{k} N{n} G{g} act={act} M{m} tile7", ferrum.cuda.BACKEND.mm(a, w, 0, None, tile=7, splits=2), ref)
        if m <= 16:   # stream-K: runs that cross tile ends
            check(f"K{k} N{n} G{g} act={act} M{m} stream-K", ferrum.cuda.BACKEND.mm(a, w, 0, None, tile=1, m_blocks=1, stream_k=3), ref)
        if m in (20, 70) and ferrum._cuda.mm_plan(256, 1024, 256)["tile"] in (4, 5, 6, 8, 9):   # the wgmma kernel's tiles
            for tile, mb, s in ((4, 8, 2), (5, 4, 3), (6, 4, 2), (8, 4, 2)) if m == 70 else \
                    ((5, 1, 2), (5, 2, 3), (6, 1, 1), (6, 2, 2), (8, 1, 3), (8, 2, 1), (9, 1, 2), (9, 2, 3)):
                check(f"K{k} N{n} G{g} act={act} M{m} tile{tile}/mb{mb}/s{s}",
                      ferrum.cuda.BACKEND.mm(a, w, 0, None, tile=tile, m_blocks=mb, splits=s), ref)
            # stream-K on the wgmma tiles: 3 blocks, so runs end inside tiles and cross into the next
            for tile, mb in ((5, 4), (6, 4), (8, 4), (9, 2)) if m == 70 else ((5, 1), (6, 2), (8, 1), (8, 2), (9, 1)):
                check(f"K{k} N{n} G{g} act={act} M{m} tile{tile}/mb{mb}/stream-K",
                      ferrum.cuda.BACKEND.mm(a, w, 0, None, tile=tile, m_blocks=mb, stream_k=3), ref)

pr = random_problem(rng, 256, 128, 128, experts=3)
w = ferrum.load_stacked(pr.qweights, pr.scales, group_size=128, backend="cuda")
a = rng.standard_normal((5, 256)).astype(np.float16)
check("stacked all", ferrum.mm(a, w), np.concatenate([a.astype(np.float64) @ d for d in pr.dense], 1))
check("stacked e=2", ferrum.mm(a, w, expert=2), a.astype(np.float64) @ pr.dense[2])
# An inf and a NaN in A, split and grouped, against float64's NaN/inf pattern: 3 rows (the
# swapped kernel's exact recomputation), 12 (the fp16 path, a NaN past row 8) and 20 (the
# wgmma kernel's 32-row blocks on sm_90a).
pr = random_problem(rng, 512, 320, 64)
w = ferrum.MarlinWeight.from_gptq(pr.qweights[0], pr.scales[0], group_size=64, backend="cuda")
for m, bad in ((3, ((0, 7, np.inf), (2, 300, np.nan))), (12, ((0, 7, np.inf), (10, 300, np.nan))),
               (20, ((0, 7, np.inf), (17, 300, np.nan)))):
    a = rng.standard_normal((m, 512)).astype(np.float16)
    for row, col, value in bad:
        a[row, col] = value
    finite = [r for r in range(m) if r not in {row for row, _, _ in bad}]
    with np.errstate(invalid="ignore"):
        ref = a.astype(np.float64) @ pr.dense[0]
    for opts in ({}, {"tile": 1, "m_blocks": 1, "splits": 2}, {"tile": 1, "m_blocks": 1, "stream_k": 3}):
        got = ferrum.cuda.BACKEND.mm(a, w, 0, None, **opts).astype(np.float64)
        same = np.array_equal(np.isnan(got), np.isnan(ref)) and np.array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])
        failures += not same
        print(f"{'ok ' if same else 'BAD'} non-finite A M{m} {opts}", flush=True)
        check(f"non-finite A M{m} {opts}: finite rows", got[finite], ref[finite])
print("FAILURES", failures)
sys.exit(1 if failures else 0)
