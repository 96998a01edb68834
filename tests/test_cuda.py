"""The CUDA backend against the format rules (bit-exact repack) and a float64 reference (mm).

Every test is marked cuda and skips, with the reason, when the backend is not available.
Outputs are poisoned with NaN before each run so an element the kernel never wrote fails.
"""

from __future__ import annotations


import numpy as np
import pytest

import ferrum
from ferrum import format as F
from ferrum.check import random_problem

_INFO = ferrum.backends()["cuda"]
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not _INFO.available, reason=f"cuda backend: {_INFO.reason}")]

TOL = 1e-3


def _torch():
    return pytest.importorskip("torch")


def _rel_err(got, ref):
    got = np.asarray(got, dtype=np.float64)
    assert np.isfinite(got).all(), "unwritten (NaN) or non-finite outputs"
    return np.linalg.norm(got - ref) / np.linalg.norm(ref)


def _weight(problem, stacked=False):
    if stacked:
        return ferrum.load_stacked(problem.qweights, problem.scales,
                                   group_size=problem.group_size, g_idx=problem.g_idx,
                                   backend="cuda")
    return ferrum.MarlinWeight.from_gptq(problem.qweights[0], problem.scales[0],
                                         group_size=problem.group_size, g_idx=problem.g_idx,
                                         backend="cuda")


def _activations(rng, m, k):
    return rng.standard_normal((m, k)).astype(np.float16)


# --- repack ------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,n,with_perm", [(128, 64, False), (256, 192, True), (1024, 320, False),
                                           (4096, 1024, True), (384, 128, True)])
def test_repack_is_bit_exact(k, n, with_perm, rng):
    q = F.pack_gptq(rng.integers(0, 16, (k, n), dtype=np.uint32))
    perm = rng.permutation(k).astype(np.int32) if with_perm else None
    got = ferrum.repack(q, k, n, perm=perm, backend="cuda")
    assert isinstance(got, np.ndarray) and got.dtype == np.int32
    np.testing.assert_array_equal(got, F.repack_reference(q, k, n, perm))


def test_repack_golden_vectors(golden):
    data = golden
    for i in range(6):
        k, n, _ = (int(v) for v in data[f"c{i}_meta"])
        perm = data[f"c{i}_perm"]
        got = ferrum.repack(data[f"c{i}_qweight"], k, n, perm=perm if perm.size else None,
                            backend="cuda")
        np.testing.assert_array_equal(got, data[f"c{i}_marlin"], err_msg=f"case c{i}")


def test_repack_device_input_stays_on_device(rng):
    torch = _torch()
    k, n = 512, 256
    q = F.pack_gptq(rng.integers(0, 16, (k, n), dtype=np.uint32))
    got = ferrum.repack(torch.from_numpy(q).cuda(), k, n, backend="cuda")
    assert hasattr(got, "__cuda_array_interface__")
    np.testing.assert_array_equal(ferrum.cuda.BACKEND.to_host(got), F.repack_reference(q, k, n))


# --- mm against float64 ------------------------------------------------------------------------

SHAPES = [  # (K, N, group_size, act_order)
    (128, 64, -1, False), (256, 192, 32, False), (512, 320, 64, False), (1024, 256, 128, False),
    (256, 128, 256, False), (512, 256, 128, True), (1024, 128, 64, True), (384, 192, 32, True),
    (4096, 512, 128, False), (2048, 576, -1, True),
]


@pytest.mark.parametrize("k,n,g,act", SHAPES)
def test_mm_matches_float64(k, n, g, act, rng):
    torch = _torch()
    problem = random_problem(rng, k, n, g, act_order=act)
    weight = _weight(problem)
    for m in (1, 5, 16, 33, 64, 100, 300):
        a = _activations(rng, m, k)
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        got = ferrum.mm(torch.from_numpy(a).cuda(), weight, out=out)
        assert got is out
        ref = a.astype(np.float64) @ problem.dense[0]
        err = _rel_err(out.cpu().numpy(), ref)
        assert err <= TOL, f"M={m}: relative error {err:.2e}"


@pytest.mark.parametrize("m", [1, 17, 64, 65, 1024, 4096, 8300])
def test_mm_many_rows(m, rng):
    problem = random_problem(rng, 1024, 384, 128)
    weight = _weight(problem)
    a = _activations(rng, m, 1024)
    got = ferrum.mm(a, weight)   # numpy in, numpy out
    assert isinstance(got, np.ndarray) and got.shape == (m, 384)
    assert _rel_err(got, a.astype(np.float64) @ problem.dense[0]) <= TOL


@pytest.mark.parametrize("tile,m_blocks,splits", [(1, 1, 1), (1, 2, 3), (2, 1, 7), (2, 4, 2),
                                                  (1, 4, 16), (2, 3, 5), (7, 1, 1), (7, 2, 4),
                                                  (7, 4, 3), (7, 3, 8)])
def test_mm_tile_overrides(tile, m_blocks, splits, rng):
    problem = random_problem(rng, 2048, 320, 64)   # 320: the last 256-wide tile is partial
    weight = _weight(problem)
    a = _activations(rng, 70, 2048)
    got = ferrum.cuda.BACKEND.mm(a, weight, 0, None, tile=tile, m_blocks=m_blocks, splits=splits)
    assert _rel_err(got, a.astype(np.float64) @ problem.dense[0]) <= TOL


@pytest.mark.parametrize("m", [1, 5, 8, 9, 13, 16])
@pytest.mark.parametrize("tile", [1, 2, 3, 7])
@pytest.mark.parametrize("g", [-1, 32, 64, 128, 1024])
@pytest.mark.parametrize("splits", [1, 3])
def test_mm_one_slice(m, tile, g, splits, rng):
    """Up to 8 rows take the swapped kernel (weights as the mma's A operand, scales in FP32 per
    run of k-tiles), 9 to 16 the fp16 path: every mma.sync tile, channelwise, every group size
    and G == K, with and without split-K (runs end at group ends, stage ends and splits)."""
    problem = random_problem(rng, 1024, 320, g)
    weight = _weight(problem)
    a = _activations(rng, m, 1024)
    got = ferrum.cuda.BACKEND.mm(a, weight, 0, None, tile=tile, m_blocks=1, splits=splits)
    assert _rel_err(got, a.astype(np.float64) @ problem.dense[0]) <= TOL


@pytest.mark.parametrize("m", [1, 8, 13, 40])
@pytest.mark.parametrize("tile", [1, 2, 3, 7])
@pytest.mark.parametrize("g", [-1, 32, 128])
@pytest.mark.parametrize("blocks", [1, 3, 7, 20, 1000])
def test_mm_stream_k(m, tile, g, blocks, rng):
    """Stream-K: the (tile, k-tile) iterations in equal runs, one a block. 3 and 7 blocks make
    runs that end inside tiles and cross into the next one (two or three blocks add their partials
    for a tile), 20 and 1000 runs of one iteration (every k-tile a partial), 1 one wave of the GPU;
    40 rows are three 16-row slices. The sum is in block order, so the result repeats bit for
    bit."""
    problem = random_problem(rng, 1024, 320, g)
    weight = _weight(problem)
    a = _activations(rng, m, 1024)
    plan = ferrum._cuda.mm_plan(m, 1024, 320, tile=tile, m_blocks=1, stream_k=blocks)
    assert plan["stream_k"] and plan["grid"] <= (blocks if blocks > 1 else plan["grid"])
    got = ferrum.cuda.BACKEND.mm(a, weight, 0, None, tile=tile, m_blocks=1, stream_k=blocks)
    assert _rel_err(got, a.astype(np.float64) @ problem.dense[0]) <= TOL
    again = ferrum.cuda.BACKEND.mm(a, weight, 0, None, tile=tile, m_blocks=1, stream_k=blocks)
    np.testing.assert_array_equal(again, got)


def test_mm_stream_k_experts_act_order_and_limits(rng):
    stacked = random_problem(rng, 512, 192, 128, experts=3)
    sw = _weight(stacked, stacked=True)
    a = _activations(rng, 5, 512)
    got = ferrum.cuda.BACKEND.mm(a, sw, None, None, tile=1, stream_k=4)   # all experts: 6 tiles
    ref = np.concatenate([a.astype(np.float64) @ d for d in stacked.dense], 1)
    assert _rel_err(got, ref) <= TOL
    got = ferrum.cuda.BACKEND.mm(a, sw, 2, None, tile=7, stream_k=3)
    assert _rel_err(got, a.astype(np.float64) @ stacked.dense[2]) <= TOL
    act = random_problem(rng, 1024, 256, 64, act_order=True)
    w = _weight(act)
    a = _activations(rng, 3, 1024)
    got = ferrum.cuda.BACKEND.mm(a, w, 0, None, tile=2, stream_k=5)
    assert _rel_err(got, a.astype(np.float64) @ act.dense[0]) <= TOL
    assert not ferrum._cuda.mm_plan(1, 4096, 28672, stream_k=-1)["stream_k"]
    with pytest.raises(ValueError, match="stream_k=2 applies to the mma.sync tiles"):
        ferrum.cuda.BACKEND.mm(_activations(rng, 40, 1024), w, 0, None, tile=2, m_blocks=3, stream_k=2)


@pytest.mark.parametrize("group_size", [32, 128])
def test_mm_stacked_act_order_experts(rng, group_size):
    """A stack whose experts each have their own act-order (load_stacked's g_idx): one launch
    an expert, each with A gathered in its order into its columns of C (ldc = E*n); numpy in
    and out, and torch tensors with out= on a side stream (the compiled direct path declines
    these weights); rows through every kernel family; outputs poisoned first."""
    k, n, experts = 512, 192, 3
    problem = random_problem(rng, k, n, group_size, act_order=True, experts=experts)
    sw = _weight(problem, stacked=True)
    assert sw.perm.shape == (experts, k)
    for m in (1, 5, 16, 24, 40, 300):
        a = _activations(rng, m, k)
        ref = np.concatenate([a.astype(np.float64) @ d for d in problem.dense], 1)
        out = np.full((m, experts * n), np.nan, dtype=np.float16)
        ferrum.mm(a, sw, out=out)
        assert _rel_err(out, ref) <= TOL, m
        e = m % experts
        one = ferrum.mm(a, sw, expert=e)
        np.testing.assert_array_equal(one, out[:, e * n:(e + 1) * n])
    torch = pytest.importorskip("torch")
    a = torch.from_numpy(_activations(rng, 20, k)).cuda()
    ref = np.concatenate([a.cpu().numpy().astype(np.float64) @ d for d in problem.dense], 1)
    side = torch.cuda.Stream()
    out = torch.full((20, experts * n), float("nan"), dtype=torch.float16, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            got = ferrum.mm(a, sw, out=out, stream=side.cuda_stream)
    side.synchronize()
    assert got is out
    assert _rel_err(out.cpu().numpy(), ref) <= TOL
    out1 = torch.full((20, n), float("nan"), dtype=torch.float16, device="cuda")
    ferrum.mm(a, sw, expert=1, out=out1)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(out1.cpu().numpy(), out.cpu().numpy()[:, n:2 * n])


_NO_SWAP_SCRIPT = """
import numpy as np, ferrum
from ferrum.check import random_problem
rng = np.random.default_rng(11)
for g in (-1, 32, 128):
    problem = random_problem(rng, 1024, 320, g, act_order=g == 32)
    w = ferrum.MarlinWeight.from_gptq(problem.qweights[0], problem.scales[0], group_size=g,
                                      g_idx=problem.g_idx,
                                      backend="cuda")
    for m in (1, 9, 16, 40):
        for tile, splits in ((1, 2), (2, 1), (7, 3)):
            a = rng.standard_normal((m, 1024)).astype(np.float16)
            got = ferrum.cuda.BACKEND.mm(a, w, 0, None, tile=tile, m_blocks=1, splits=splits)
            ref = a.astype(np.float64) @ problem.dense[0]
            got = got.astype(np.float64)
            assert np.isfinite(got).all()
            err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert err <= 1e-3, (g, m, tile, splits, err)
print("ok")
"""


def test_mm_fp16_scale_path():
    """FERRUM_NO_SWAP=1 keeps one-slice launches on the fp16 dequantize-and-scale kernel (the one
    many-row slices use): still right at 1 to 40 rows (a fresh process: the switch is read
    once)."""
    import os
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", _NO_SWAP_SCRIPT], capture_output=True, text=True,
                         env={**os.environ, "FERRUM_NO_SWAP": "1"}, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


_SPREAD_SCRIPT = """
import hashlib, numpy as np, ferrum, ferrum.cuda
from ferrum.check import random_problem
rng = np.random.default_rng(13)
digest = hashlib.sha256()
wgmma = ferrum._cuda.mm_plan(256, 1024, 256)["tile"] in (4, 5, 6, 8)
for g in (-1, 128):
    problem = random_problem(rng, 2048, 1024, g)
    w = ferrum.MarlinWeight.from_gptq(problem.qweights[0], problem.scales[0], group_size=g,
                                      backend="cuda")
    variants = [(1, {"tile": 2, "splits": 4}), (1, {"tile": 7, "splits": 2}), (4, {"tile": 1, "splits": 3})]
    if wgmma:
        variants += [(16, {"tile": 8, "m_blocks": 1, "splits": 3}), (24, {"tile": 6, "m_blocks": 2, "splits": 4}),
                     (16, {"tile": 8, "m_blocks": 1, "stream_k": 1}), (40, {"tile": 6, "m_blocks": 4, "splits": 5})]
    for m, opts in variants:
        a = rng.standard_normal((m, 2048)).astype(np.float16)
        got = ferrum.cuda.BACKEND.mm(a, w, 0, None, **opts)
        ref = a.astype(np.float64) @ problem.dense[0]
        err = np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref)
        assert np.isfinite(got).all() and err <= 1e-3, (g, m, opts, err)
        digest.update(got.tobytes())
print("ok", digest.hexdigest())
"""


def test_mm_spread_launch_changes_no_bits():
    """A grid of at most one block an SM, of a kernel two of whose blocks fit an SM, asks for the
    most shared memory so its blocks spread over the SMs (ferrum_mm); FERRUM_NO_SPREAD=1 launches
    as compiled. The same plans (tile and splits given: the planner's costs see the switch) give
    the same bits either way (fresh processes: the switch is read once)."""
    import os
    import subprocess
    import sys
    outs = []
    for spread in ("0", "1"):
        run = subprocess.run([sys.executable, "-c", _SPREAD_SCRIPT], capture_output=True, text=True,
                             env={**os.environ, "FERRUM_NO_SPREAD": spread}, timeout=120)
        assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout + run.stderr
        outs.append(run.stdout.split()[1])
    assert outs[0] == outs[1]


_NO_F32S_SCRIPT = """
import numpy as np, ferrum
from ferrum.check import random_problem
rng = np.random.default_rng(12)
for g in (64, 128):
    problem = random_problem(rng, 1024, 320, g)
    w = ferrum.MarlinWeight.from_gptq(problem.qweights[0], problem.scales[0], group_size=g,
                                      backend="cuda")
    for m in (9, 16, 24, 32):
        for opts in ({}, {"tile": 5, "splits": 3}, {"tile": 6, "splits": 2}, {"tile": 8, "splits": 2}):
            a = rng.standard_normal((m, 1024)).astype(np.float16)
            got = ferrum.cuda.BACKEND.mm(a, w, 0, None, **opts).astype(np.float64)
            ref = a.astype(np.float64) @ problem.dense[0]
            assert np.isfinite(got).all()
            err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert err <= 1e-3, (g, m, opts, err)
print("ok")
"""


def test_mm_wgmma_fp16_scales_switch():
    """FERRUM_NO_F32S=1 keeps the wgmma kernel's 16- and 32-row blocks on fp16 scales (the
    instances groups of 32 rows use): still right with groups of 64 and 128 rows (a fresh
    process: the switch is read once)."""
    import os
    import subprocess
    import sys
    if not _wgmma_planned():
        pytest.skip("no wgmma kernel on this GPU/build (needs compute capability 9.0 and sm_90a)")
    run = subprocess.run([sys.executable, "-c", _NO_F32S_SCRIPT], capture_output=True, text=True,
                         env={**os.environ, "FERRUM_NO_F32S": "1"}, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


def _non_finite_case(rng, m, g=128, **options):
    """a with +inf, -inf and NaN in rows 0-2, an inf and a -inf in row 3 and a -inf in row 12
    (those rows there are); the product through BACKEND.mm(**options) and float64's."""
    prob = random_problem(rng, 1024, 512, g)
    a = _activations(rng, m, 1024)
    a[0, 5] = np.inf
    for row, col, value in ((1, 8, -np.inf), (2, 9, np.nan), (3, 20, np.inf), (3, 700, -np.inf),
                            (12, 300, -np.inf)):   # row 12: past a slice's first 8 rows
        if row < m:
            a[row, col] = value
    with np.errstate(invalid="ignore"):
        ref = a.astype(np.float64) @ prob.dense[0]
    got = ferrum.cuda.BACKEND.mm(a, _weight(prob), 0, None, **options)
    return got.astype(np.float64), ref


def _assert_non_finite_as_in_float64(got, ref, m):
    assert np.isinf(ref[0]).any() and np.isnan(ref[0]).any()
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    assert np.array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])
    finite = np.isfinite(ref).all(axis=1)
    if finite.any():
        assert _rel_err(got[finite], ref[finite]) < 1e-3


@pytest.mark.parametrize("m", [1, 2, 4, 8, 9, 16, 24, 64, 300])
def test_mm_non_finite_activations_as_in_float64(m, rng):
    """inf times a zero weight (q == 8) is NaN, times any other weight an inf of the product's
    sign, inf - inf is NaN and a NaN fills its row, as in float64 (and the cpu reference). The
    fp16 and wgmma kernels subtract the uint4b8 bias per weight (on sm_90a the wgmma kernel
    from one row); the swapped kernel (up to 8 rows on other GPUs; test_mm_non_finite_
    activations_swapped_kernel asks for it) takes it out of the sums and, where a bias sum is
    not finite, recomputes per weight."""
    got, ref = _non_finite_case(rng, m)
    _assert_non_finite_as_in_float64(got, ref, m)


@pytest.mark.parametrize("tile,m", [(5, 16), (6, 24), (8, 4), (8, 16), (8, 24), (8, 64)])
def test_mm_non_finite_activations_wgmma_tiles(tile, m, rng):
    """inf and NaN in A through each wgmma tile with split-K, FP32-scale runs (16 and 32 rows)
    and fp16 scales (64 rows); tile 8's two warpgroups each sum half of a stage's K, and their
    sums meet in the epilogue (inf + -inf there is NaN, as in float64)."""
    if not _wgmma_planned():
        pytest.skip("no wgmma kernel on this GPU/build (needs compute capability 9.0 and sm_90a)")
    got, ref = _non_finite_case(rng, m, tile=tile, splits=2)
    _assert_non_finite_as_in_float64(got, ref, m)


@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("tile", [1, 2, 3, 7])
@pytest.mark.parametrize("g", [-1, 64, 128])
@pytest.mark.parametrize("split", [{"splits": 1}, {"splits": 3}, {"stream_k": 3}])
def test_mm_non_finite_activations_swapped_kernel(m, tile, g, split, rng):
    """The swapped kernel's exact recomputation on every mma.sync tile, channelwise and grouped,
    on split-K and stream-K blocks (each block recomputes only its own K range)."""
    got, ref = _non_finite_case(rng, m, g, tile=tile, m_blocks=1, **split)
    _assert_non_finite_as_in_float64(got, ref, m)


_LARGE_ON_ZERO_CASES = [(m, tile, g, split) for m in (1, 3, 8, 16) for tile in (1, 2, 7)
                        for g in (-1, 128)
                        for split in ({"splits": 1}, {"splits": 3}, {"splits": 8}, {"stream_k": 3})]
_LARGE_ON_ZERO_CASES += [(m, 0, g, split) for m in (2, 5, 8, 13) for g in (-1, 64, 128)
                         for split in ({"splits": 0}, {"splits": 3})]


@pytest.mark.parametrize("m,tile,g,split", _LARGE_ON_ZERO_CASES)
@pytest.mark.parametrize("signs", ["rows", "random"])
def test_mm_large_activations_on_zero_weights(m, tile, g, split, signs):
    """A large finite activation (6e4) whose weights are zero (q == 8) adds nothing to C, so C
    must keep the precision of the ordinary terms. The swapped kernel (M <= 8) sums
    a (64 + q) - 72 a and so rounds at the size of 72 x 6e4; it must notice and recompute
    exactly (relative error 2e-2 before, against float64). signs="random": the large values
    take random signs, at the same place in every 16-row k-tile, so they cancel in the plain
    sum of A of many runs (1.2e-2 at M = 1 when the check looked at that sum alone).
    tile 0: the planner's kernel for 2-13 rows (on sm_90a with 128-row groups the wgmma
    kernel's 16-row blocks, which apply the scales in FP32 to run sums of exact q - 8)."""
    rng = np.random.default_rng(1900 + m + 10 * tile + g + 1000 * len(signs))
    size_k, size_n = 1024, 320
    q = rng.integers(0, 16, (size_k, size_n), dtype=np.uint32)
    big = np.arange(5, size_k, 16)
    q[big] = 8
    groups = F.num_groups(size_k, g)
    scales = (rng.uniform(0.5, 1.5, (groups, size_n)) * rng.choice([-1, 1], (groups, size_n))
              / (4.0 * np.sqrt(size_k))).astype(np.float16)
    dense = F.dequantize_reference(q, scales, size_k, g, None)
    w = ferrum.MarlinWeight.from_gptq(F.pack_gptq(q), scales, group_size=g, backend="cuda")
    a = rng.standard_normal((m, size_k)).astype(np.float16)
    if signs == "rows":
        a[:, big] = 6e4
        a[m // 2, big] = -6e4
    else:
        a[:, big] = 6e4 * rng.choice([-1, 1], (m, big.size))
    out = np.full((m, size_n), np.nan, dtype=np.float16)
    if tile == 0:   # the planner's kernel (with 128-row groups on sm_90a: 16-row wgmma blocks)
        ferrum.cuda.BACKEND.mm(a, w, 0, out, **split)
    else:
        ferrum.cuda.BACKEND.mm(a, w, 0, out, tile=tile, m_blocks=1, **split)
    assert _rel_err(out, a.astype(np.float64) @ dense) <= TOL


def test_mm_plan_cache_keys_every_request_field():
    """The C library keeps each thread's last plans; a plan asked for with other fields, rows,
    experts or act-order must not come back from the cache for another."""
    plan = ferrum._cuda.mm_plan
    auto = plan(1, 4096, 4096)
    variants = [plan(1, 4096, 4096, tile=1), plan(1, 4096, 4096, tile=2, splits=3),
                plan(1, 4096, 4096, tile=7, stream_k=1), plan(1, 4096, 4096, num_experts=4),
                plan(1, 4096, 4096, act_order=True), plan(100, 4096, 4096), plan(1, 8192, 4096)]
    assert variants[0]["tile"] == 1 and variants[1]["tile"] == 2 and variants[1]["splits"] == 3
    assert variants[2]["tile"] == 7 and variants[2]["stream_k"]
    assert variants[5]["m_blocks"] > 1 or variants[5]["tile"] in WGMMA_TILES
    assert variants[4]["data_bytes"] == auto["data_bytes"] + 4096 * 2   # A's permuted copy
    for _ in range(3):   # the cached answers, in any order, are the ones first computed
        assert plan(1, 4096, 4096) == auto
        assert plan(1, 4096, 4096, tile=1) == variants[0]
        assert plan(1, 4096, 4096, act_order=True) == variants[4]
        assert plan(1, 8192, 4096) == variants[6]
    for i in range(40):   # more problems than the cache holds: evicted plans are recomputed alike
        plan(1 + i, 4096, 4096)
    assert [plan(1, 4096, 4096), plan(1, 4096, 4096, tile=1), plan(1, 4096, 4096, tile=2, splits=3),
            plan(1, 4096, 4096, tile=7, stream_k=1), plan(1, 4096, 4096, num_experts=4),
            plan(1, 4096, 4096, act_order=True), plan(100, 4096, 4096), plan(1, 8192, 4096)] == \
        [auto] + variants


def test_mm_tile7_needs_k_multiple_of_256(rng):
    problem = random_problem(rng, 384, 128, 128)
    weight = _weight(problem)
    a = _activations(rng, 2, 384)
    with pytest.raises(ValueError, match="size_k=384 is not a multiple of 256"):
        ferrum.cuda.BACKEND.mm(a, weight, 0, None, tile=7)
    got = ferrum.mm(a, weight)   # the planner never picks a tile K does not fit
    assert _rel_err(got, a.astype(np.float64) @ problem.dense[0]) <= TOL


def test_mm_tile_and_m_blocks_are_checked(rng):
    """A tile past the table, and a block height a wgmma tile has no kernel for, are refused
    with the value named before anything runs; the caller's output is left as it was."""
    weight = _weight(random_problem(rng, 512, 256, 128))
    a = _activations(rng, 70, 512)
    out = np.full((70, 256), 7.0, dtype=np.float16)
    with pytest.raises(ValueError, match=r"tile=10 \(use 0\.\.9\)"):
        ferrum.cuda.BACKEND.mm(a, weight, 0, out, tile=10)
    if not _wgmma_planned():
        pytest.skip("no wgmma kernel on this GPU/build (needs compute capability 9.0 and sm_90a)")
    for tile, m_blocks in ((6, 8), (8, 8), (8, 3), (4, 1), (9, 4), (9, 8)):
        with pytest.raises(ValueError, match=f"m_blocks={m_blocks} "):
            ferrum.cuda.BACKEND.mm(a, weight, 0, out, tile=tile, m_blocks=m_blocks)
    assert (out == 7.0).all()


_SMALL_SMEM_SCRIPT = """
import numpy as np, ferrum, sys
from ferrum.check import random_problem
cap = int(sys.argv[1])
rng = np.random.default_rng(7)
for g in (-1, 128):
    problem = random_problem(rng, 1024, 320, g)
    w = ferrum.MarlinWeight.from_gptq(problem.qweights[0], problem.scales[0], group_size=g, backend="cuda")
    for m in (1, 16, 20, 40, 70, 200):
        plan = ferrum._cuda.mm_plan(m, 1024, 320)
        if cap < 101376 + 1:      # sm_86 / sm_89: tile 2 holds one 16-row slice, tile 3 more;
                                  # on an H100 posing as one, up to 16 rows in tile 6's 16-row blocks
            assert plan["tile"] in ((2, 6) if m <= 16 else (3,)), (m, plan)
        else:                     # sm_80: tiles 1, 2, 7 up to 32 rows (the swapped kernel up to
                                  # 8), then tile 3; on an H100 posing as one, the wgmma tiles
                                  # that fit: 6, up to 32 rows 8 and 9, up to 128 rows 9
            assert plan["tile"] in ((1, 2, 7, 6, 8, 9) if m <= 32 else (3, 6, 9) if m <= 128 else (3, 6)), (m, plan)
        a = rng.standard_normal((m, 1024)).astype(np.float16)
        got = ferrum.mm(a, w).astype(np.float64)
        ref = a.astype(np.float64) @ problem.dense[0]
        assert np.isfinite(got).all()
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err <= 1e-3, (g, m, err)
print("ok")
"""


@pytest.mark.parametrize("cap", [166912, 101376])   # sm_80; sm_86 and sm_89
def test_mm_plans_for_gpus_with_less_shared_memory(cap):
    """FERRUM_MAX_SMEM makes the planner plan as for a GPU whose blocks may hold `cap` bytes of
    shared memory (A100; RTX 30xx/40xx, L4): every planned kernel fits, the larger tiles give
    way to tile 3, and the products are right. (A fresh process: device properties are cached.)"""
    import os
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", _SMALL_SMEM_SCRIPT, str(cap)], capture_output=True,
                         text=True, env={**os.environ, "FERRUM_MAX_SMEM": str(cap)}, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


WGMMA_TILES = (4, 5, 6, 8, 9)


def _wgmma_planned():
    """Whether this GPU and build run the wgmma kernel (tiles 4, 5, 6, 8, 9): compute capability
    9.0 and a build with sm_90a. The planner picks it for many rows only there."""
    return ferrum._cuda.mm_plan(256, 1024, 256)["tile"] in WGMMA_TILES


@pytest.mark.parametrize("m", [33, 64, 65, 127, 128, 129, 300])
@pytest.mark.parametrize("tile,m_blocks,splits", [(4, 4, 1), (4, 8, 1), (4, 4, 3), (4, 8, 6),
                                                  (5, 4, 1), (5, 8, 3), (6, 4, 1), (6, 4, 5),
                                                  (8, 4, 1), (8, 4, 3)])
@pytest.mark.parametrize("g", [-1, 32, 128])
def test_mm_wgmma_tile(m, tile, m_blocks, splits, g, rng):
    """The wgmma kernel on every row count around its 64/128-row blocks, both k tiles and block
    heights, split-K, channelwise and grouped scales, and a partial last column tile (N=320:
    of 256 columns, or of 128 with only its first 64 live for tile 8)."""
    if not _wgmma_planned():
        small = random_problem(rng, 512, 64, 128)
        w = ferrum.MarlinWeight.from_gptq(small.qweights[0], small.scales[0], group_size=128,
                                          backend="cuda")
        with pytest.raises(ValueError, match="tile=4"):
            ferrum.cuda.BACKEND.mm(_activations(rng, m, 512), w, 0, None, tile=4)
        pytest.skip("no wgmma kernel on this GPU/build (needs compute capability 9.0 and sm_90a)")
    problem = random_problem(rng, 1024, 320, g)
    weight = _weight(problem)
    a = _activations(rng, m, 1024)
    got = ferrum.cuda.BACKEND.mm(a, weight, 0, None, tile=tile, m_blocks=m_blocks, splits=splits)
    assert _rel_err(got, a.astype(np.float64) @ problem.dense[0]) <= TOL


@pytest.mark.parametrize("m", [1, 7, 16, 17, 31, 32, 33, 50])
@pytest.mark.parametrize("tile,m_blocks,splits", [(5, 1, 1), (5, 1, 3), (5, 2, 1), (5, 2, 4),
                                                  (6, 1, 1), (6, 1, 5), (6, 2, 2),
                                                  (8, 1, 1), (8, 1, 3), (8, 2, 2), (8, 2, 5),
                                                  (9, 1, 1), (9, 1, 3), (9, 2, 2), (9, 2, 5)])
@pytest.mark.parametrize("g", [-1, 32, 64, 128])
def test_mm_wgmma_few_rows(m, tile, m_blocks, splits, g, rng):
    """The wgmma kernel with 16- and 32-row blocks (wgmma n16, n32): rows within, at and past
    one block (more slices), split-K, both scale kinds, a partial last column tile; the
    output poisoned first. Tiles 8 and 9: the two warpgroups split each stage's K, and with
    64- and 128-row groups each folds its own FP32-scale runs (tile 9: one wgmma a step over
    its 64 columns, N = 320 in five column tiles)."""
    if not _wgmma_planned():
        pytest.skip("no wgmma kernel on this GPU/build (needs compute capability 9.0 and sm_90a)")
    problem = random_problem(rng, 1024, 320, g)
    weight = _weight(problem)
    a = _activations(rng, m, 1024)
    out = np.full((m, 320), np.nan, dtype=np.float16)
    ferrum.cuda.BACKEND.mm(a, weight, 0, out, tile=tile, m_blocks=m_blocks, splits=splits)
    assert _rel_err(out, a.astype(np.float64) @ problem.dense[0]) <= TOL
    plan = ferrum._cuda.mm_plan(m, 1024, 320, tile=tile, m_blocks=m_blocks, splits=splits)
    assert (plan["tile"], plan["m_blocks"]) == (tile, m_blocks)


@pytest.mark.parametrize("k,n", [(1024, 4096), (2048, 2048), (4096, 1024)])
@pytest.mark.parametrize("m", [17, 24, 32, 48, 64, 100, 128, 130])
@pytest.mark.parametrize("g,act_order", [(-1, False), (64, False), (128, False), (128, True), (32, False)])
def test_mm_planner_32_row_blocks(k, n, m, g, act_order, rng):
    """The planner's own plans at 17-130 rows, where up to 128 rows it takes tile 9's 32-row
    blocks on layers of up to a few thousand columns (one split, or two to six, on these shapes
    on a 132-SM GPU; beyond 32 rows in row slices): 32-row wgmma blocks up to 32 rows, 64-row or
    larger ones beyond 128, the output poisoned first, right against float64."""
    if not _wgmma_planned():
        pytest.skip("no wgmma kernel on this GPU/build (needs compute capability 9.0 and sm_90a)")
    plan = ferrum._cuda.mm_plan(m, k, n, group_size=g)
    if m <= 32:
        assert plan["tile"] in (5, 6, 8, 9) and plan["m_blocks"] == 2, plan
    else:
        assert plan["m_blocks"] >= 4 or (plan["tile"], plan["m_blocks"], m <= 128) == (9, 2, True), plan
    if ferrum._cuda.probe()["sms"] == 132 and g == 128 and m <= 128:   # the H100/H200 the planner was fitted on
        assert (plan["tile"], plan["m_blocks"], plan["m_slices"]) == (9, 2, (m + 31) // 32), plan
    problem = random_problem(rng, k, n, g, act_order=act_order)
    weight = _weight(problem)
    a = _activations(rng, m, k)
    out = np.full((m, n), np.nan, dtype=np.float16)
    ferrum.cuda.BACKEND.mm(a, weight, 0, out)
    assert _rel_err(out, a.astype(np.float64) @ problem.dense[0]) <= TOL, plan


@pytest.mark.parametrize("tile,m_blocks,m", [(5, 1, 5), (5, 2, 24), (5, 4, 64), (5, 8, 100),
                                            (6, 1, 16), (6, 2, 32), (6, 4, 40),
                                            (8, 1, 9), (8, 2, 17), (8, 4, 64), (8, 4, 130),
                                            (9, 1, 3), (9, 2, 30), (9, 2, 70)])
@pytest.mark.parametrize("g", [-1, 64, 128])
@pytest.mark.parametrize("blocks", [1, 3, 7, 1000])
def test_mm_stream_k_wgmma(tile, m_blocks, m, g, blocks, rng):
    """Stream-K on the wgmma tiles: runs that end inside a tile and cross into the next (3 and
    7 blocks), one k-tile a run (1000), one wave (1); block heights 16-128 rows, row slices (40,
    100, 130 rows), FP32-scale runs (16 and 32 rows with 64- and 128-row groups), a partial last
    column tile (N = 320). The output is poisoned first; the sum, in block order, repeats bit for
    bit."""
    if not _wgmma_planned():
        pytest.skip("no wgmma kernel on this GPU/build (needs compute capability 9.0 and sm_90a)")
    problem = random_problem(rng, 1024, 320, g)
    weight = _weight(problem)
    a = _activations(rng, m, 1024)
    opts = dict(tile=tile, m_blocks=m_blocks, stream_k=blocks)
    plan = ferrum._cuda.mm_plan(m, 1024, 320, group_size=g, **opts)
    assert plan["stream_k"] and (plan["tile"], plan["m_blocks"]) == (tile, m_blocks)
    assert blocks == 1 or plan["grid"] <= blocks
    out = np.full((m, 320), np.nan, dtype=np.float16)
    ferrum.cuda.BACKEND.mm(a, weight, 0, out, **opts)
    assert _rel_err(out, a.astype(np.float64) @ problem.dense[0]) <= TOL
    again = ferrum.cuda.BACKEND.mm(a, weight, 0, None, **opts)
    np.testing.assert_array_equal(again, out)


def test_mm_stream_k_wgmma_experts_and_act_order(rng):
    """Stream-K on wgmma tiles over all experts of a stack (runs crossing from one expert's tiles
    into the next), one expert, and act-order weights; tile 4 takes no stream-K."""
    if not _wgmma_planned():
        pytest.skip("no wgmma kernel on this GPU/build (needs compute capability 9.0 and sm_90a)")
    stacked = random_problem(rng, 512, 192, 128, experts=3)
    sw = _weight(stacked, stacked=True)
    a = _activations(rng, 40, 512)
    out = np.full((40, 3 * 192), np.nan, dtype=np.float16)
    ferrum.cuda.BACKEND.mm(a, sw, None, out, tile=8, m_blocks=4, stream_k=5)
    ref = np.concatenate([a.astype(np.float64) @ d for d in stacked.dense], 1)
    assert _rel_err(out, ref) <= TOL
    got = ferrum.cuda.BACKEND.mm(a, sw, 1, None, tile=5, m_blocks=4, stream_k=3)
    assert _rel_err(got, a.astype(np.float64) @ stacked.dense[1]) <= TOL
    act = random_problem(rng, 2048, 256, 64, act_order=True)
    a = _activations(rng, 70, 2048)
    got = ferrum.cuda.BACKEND.mm(a, _weight(act), 0, None, tile=6, m_blocks=4, stream_k=7)
    assert _rel_err(got, a.astype(np.float64) @ act.dense[0]) <= TOL
    with pytest.raises(ValueError, match="stream_k=2 applies to the mma.sync tiles"):
        ferrum.cuda.BACKEND.mm(a, _weight(act), 0, None, tile=4, m_blocks=4, stream_k=2)


@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096), (8192, 10240), (28672, 8192)])
def test_planner_kernel_by_rows(k, n):
    """Where the wgmma kernel runs: channelwise and with 64- or 128-row groups from one row,
    up to 16 rows in 16-row wgmma blocks with workspace split-K (no clusters); with 32-row
    groups from 17 (the mma.sync kernels below); 17..32 rows 32-row blocks."""
    if not _wgmma_planned():
        pytest.skip("no wgmma kernel on this GPU/build (needs compute capability 9.0 and sm_90a)")
    first = {128: 1, 64: 1, -1: 1, 32: 17}
    for g, first_row in first.items():
        for m in (1, 2, 8, 9, 16):
            plan = ferrum._cuda.mm_plan(m, k, n, group_size=g)
            if m < first_row:
                assert plan["tile"] in (1, 2, 3, 7), (g, m, plan)
            else:
                assert (plan["tile"] in (5, 6, 8, 9), plan["m_blocks"], plan["cluster"]) == (True, 1, False), (g, m, plan)
                asked = ferrum._cuda.mm_plan(m, k, n, tile=5, m_blocks=1, splits=4, group_size=g)
                assert (asked["splits"], asked["cluster"]) == (4, False), asked
        for m in (17, 32):
            plan = ferrum._cuda.mm_plan(m, k, n, group_size=g)
            assert (plan["tile"] in (5, 6, 8, 9), plan["m_blocks"]) == (True, 2), (g, m, plan)
    assert ferrum._cuda.mm_plan(4, k, n) == ferrum._cuda.mm_plan(4, k, n, group_size=128)
    assert ferrum._cuda.mm_plan(4, k, n, group_size=k) == ferrum._cuda.mm_plan(4, k, n, group_size=-1)


def test_mm_plan_group_size_is_checked():
    """mm_plan refuses scales mm would refuse, with the value in the message."""
    with pytest.raises(ValueError, match="group_size=0"):
        ferrum._cuda.mm_plan(4, 1024, 256, group_size=0)
    with pytest.raises(ValueError, match="group_size=96"):
        ferrum._cuda.mm_plan(4, 1152, 256, group_size=96)


@pytest.mark.parametrize("tile,m_blocks", [(5, 1), (6, 1), (6, 2), (8, 1), (8, 2), (9, 1), (9, 2)])
@pytest.mark.parametrize("g", [64, 128])
def test_mm_wgmma_few_rows_act_order_and_stacked(tile, m_blocks, g, rng):
    """16- and 32-row wgmma blocks on act-order and stacked weights; with 128-row groups the
    16-row blocks apply the scales in FP32 per stage (mm_wgmma.cu, F32S)."""
    if not _wgmma_planned():
        pytest.skip("no wgmma kernel on this GPU/build (needs compute capability 9.0 and sm_90a)")
    problem = random_problem(rng, 2048, 256, g, act_order=True)
    a = _activations(rng, 20 if m_blocks == 2 else 13, 2048)
    got = ferrum.cuda.BACKEND.mm(a, _weight(problem), 0, None, tile=tile, m_blocks=m_blocks,
                                 splits=3)
    assert _rel_err(got, a.astype(np.float64) @ problem.dense[0]) <= TOL
    stacked = random_problem(rng, 512, 192, g, experts=3)
    sw = _weight(stacked, stacked=True)
    a = _activations(rng, 12, 512)
    out = np.full((12, 3 * 192), np.nan, dtype=np.float16)
    ferrum.cuda.BACKEND.mm(a, sw, None, out, tile=tile, m_blocks=m_blocks, splits=2)
    ref = np.concatenate([a.astype(np.float64) @ d for d in stacked.dense], axis=1)
    assert _rel_err(out, ref) <= TOL


def test_mm_wgmma_act_order_stacked_and_deterministic(rng):
    if not _wgmma_planned():
        pytest.skip("no wgmma kernel on this GPU/build (needs compute capability 9.0 and sm_90a)")
    problem = random_problem(rng, 2048, 256, 64, act_order=True)
    weight = _weight(problem)
    a = _activations(rng, 200, 2048)
    runs = [ferrum.cuda.BACKEND.mm(a, weight, 0, None, tile=5, splits=4) for _ in range(3)]
    assert _rel_err(runs[0], a.astype(np.float64) @ problem.dense[0]) <= TOL
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])
    stacked = random_problem(rng, 512, 192, 128, experts=3)
    sw = _weight(stacked, stacked=True)
    a = _activations(rng, 96, 512)
    got = ferrum.mm(a, sw)   # 96 rows: the planner's choice, wgmma here
    ref = np.concatenate([a.astype(np.float64) @ d for d in stacked.dense], axis=1)
    assert _rel_err(got, ref) <= TOL
    got1 = ferrum.mm(a, sw, expert=1)
    assert _rel_err(got1, a.astype(np.float64) @ stacked.dense[1]) <= TOL


def test_mm_split_k_paths(rng):
    """Split-K through a thread block cluster (the wgmma kernel on sm_90, up to 8 splits; no
    workspace partials) and through the workspace (the mma.sync kernel, more splits, older
    GPUs) both match float64."""
    import os
    problem = random_problem(rng, 4096, 320, 128)
    weight = _weight(problem)
    a = _activations(rng, 40, 4096)
    ref = a.astype(np.float64) @ problem.dense[0]
    hopper = ferrum._cuda.probe()["major"] >= 9
    clusters = hopper and os.environ.get("FERRUM_NO_CLUSTER", "0") in ("", "0")
    for tile in (2, 5) if _wgmma_planned() else (2,):
        for splits in (2, 8, 12):
            plan = ferrum._cuda.mm_plan(40, 4096, 320, tile=tile, splits=splits)
            assert plan["cluster"] == (clusters and splits <= 8 and tile >= 4), (tile, splits, plan)
            if plan["cluster"]:
                assert plan["data_bytes"] == 0 and plan["counter_bytes"] == 0
            got = ferrum.cuda.BACKEND.mm(a, weight, 0, None, tile=tile, splits=splits)
            assert _rel_err(got, ref) <= TOL, (tile, splits)


def test_mm_asked_splits_leave_clusters_that_would_take_more_waves(rng):
    """Splits asked for run as clusters only where the clusters take no more waves than the
    plain grid: 32 column tiles of tile 8 in 4 splits (128 blocks) fit one wave of a 132-SM
    GPU's SMs, but not of its size-4 cluster slots (GPCs of 16-18 SMs: 120 on an H100/H200).
    Both ways the result is right."""
    if not _wgmma_planned():
        pytest.skip("the wgmma tiles (clusters) need compute capability 9.0 and an sm_90a build")
    problem = random_problem(rng, 512, 4096, 128)
    weight = _weight(problem)
    a = _activations(rng, 32, 512)
    plan = ferrum._cuda.mm_plan(32, 512, 4096, tile=8, m_blocks=2, splits=4)
    assert (plan["splits"], plan["grid"]) == (4, 128), plan
    if ferrum._cuda.probe()["sms"] == 132:
        assert not plan["cluster"], plan
    out = np.full((32, 4096), np.nan, dtype=np.float16)
    ferrum.cuda.BACKEND.mm(a, weight, 0, out, tile=8, m_blocks=2, splits=4)
    assert _rel_err(out, a.astype(np.float64) @ problem.dense[0]) <= TOL


def test_mm_asked_splits_beyond_the_k_tiles_plan_as_the_k_tiles(rng):
    """More splits asked for than K has k-tiles are cut to one a k-tile before anything else is
    planned: the plan (clusters included) is the plan for that many, and the result is right.
    16 splits of K = 256 (two 128-row k-tiles) would be too many for a cluster; 2 are not."""
    if not _wgmma_planned():
        pytest.skip("the wgmma tiles (clusters) need compute capability 9.0 and an sm_90a build")
    problem = random_problem(rng, 256, 4096, 128)
    weight = _weight(problem)
    a = _activations(rng, 64, 256)
    for tile, m_blocks in ((5, 4), (8, 2)):
        over = ferrum._cuda.mm_plan(64, 256, 4096, tile=tile, m_blocks=m_blocks, splits=16)
        assert over == ferrum._cuda.mm_plan(64, 256, 4096, tile=tile, m_blocks=m_blocks, splits=2)
        assert over["splits"] == 2, over
        out = np.full((64, 4096), np.nan, dtype=np.float16)
        ferrum.cuda.BACKEND.mm(a, weight, 0, out, tile=tile, m_blocks=m_blocks, splits=16)
        assert _rel_err(out, a.astype(np.float64) @ problem.dense[0]) <= TOL


def test_mm_split_k_is_deterministic(rng):
    problem = random_problem(rng, 4096, 256, 128)
    weight = _weight(problem)
    a = _activations(rng, 3, 4096)
    runs = [ferrum.cuda.BACKEND.mm(a, weight, 0, None, splits=8) for _ in range(3)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])


@pytest.mark.parametrize("g", [-1, 128])
def test_mm_stacked_experts(g, rng):
    torch = _torch()
    problem = random_problem(rng, 512, 192, g, experts=3)
    weight = _weight(problem, stacked=True)
    for m in (1, 40, 200):
        a = _activations(rng, m, 512)
        ad = torch.from_numpy(a).cuda()
        ref_all = np.concatenate([a.astype(np.float64) @ d for d in problem.dense], axis=1)
        out = torch.full((m, 3 * 192), float("nan"), dtype=torch.float16, device="cuda")
        ferrum.mm(ad, weight, out=out)
        assert _rel_err(out.cpu().numpy(), ref_all) <= TOL
        for e in range(3):
            got = ferrum.mm(ad, weight, expert=e)
            assert _rel_err(got.cpu().numpy(), a.astype(np.float64) @ problem.dense[e]) <= TOL


def test_mm_weights_written_by_the_kernel_just_before(rng):
    """On sm_90 mm starts reading its weights before the previous kernel on the stream ends
    (programmatic dependent launch), except on a MarlinWeight's first call: here the weights
    are written by the torch kernel queued right before it. (A stale read would need to land
    in a narrow window, so this checks that path's results more than it provokes the race.)
    Later calls take the early path and give the same bits."""
    torch = _torch()
    problem = random_problem(rng, 2048, 512, 128)
    marlin = F.repack_reference(problem.qweights[0], 2048, 512)
    scales = F.permute_scales_reference(problem.scales[0], 2048, 512, 128)
    a = _activations(rng, 5, 2048)
    ref = a.astype(np.float64) @ problem.dense[0]
    ad = torch.from_numpy(a).cuda()
    pad = 1 << 24                                # int32 words written before the weights
    q_src = torch.cat([torch.zeros(pad, dtype=torch.int32),
                       torch.from_numpy(marlin.view(np.int32).ravel())]).cuda()
    s_src = torch.from_numpy(scales).cuda()
    out = torch.empty((5, 512), dtype=torch.float16, device="cuda")
    results = []
    for _ in range(3):
        out.fill_(float("nan"))
        s = s_src * 1
        q = torch.bitwise_xor(q_src, 0)[pad:].view(marlin.shape)   # written by the last kernel
        weight = ferrum.MarlinWeight(q, s, size_k=2048, size_n=512, group_size=128)
        ferrum.mm(ad, weight, out=out)
        assert weight._aux["cuda"].pending == 0
        first = out.cpu().numpy()
        assert _rel_err(first, ref) <= TOL
        out.fill_(float("nan"))
        ferrum.mm(ad, weight, out=out)           # the early path
        np.testing.assert_array_equal(out.cpu().numpy(), first)
        results.append(first)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


# --- interop, streams, errors ------------------------------------------------------------------

def test_interop_torch_stream_and_result_kind(rng):
    torch = _torch()
    problem = random_problem(rng, 1024, 256, 128)
    weight = _weight(problem)
    a = _activations(rng, 9, 1024)
    ref = a.astype(np.float64) @ problem.dense[0]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ad = torch.from_numpy(a).to("cuda", non_blocking=False)
        got = ferrum.mm(ad, weight, stream=side)
        assert isinstance(got, torch.Tensor) and got.is_cuda and got.dtype == torch.float16
    side.synchronize()
    assert _rel_err(got.cpu().numpy(), ref) <= TOL
    # A non-contiguous activation view is made contiguous first.
    wide = torch.from_numpy(np.concatenate([a, a], axis=1)).cuda()
    view = wide[:, :1024]
    assert not view.is_contiguous()
    got2 = ferrum.mm(view, weight)
    assert _rel_err(got2.cpu().numpy(), ref) <= TOL


def test_interop_cupy_and_dlpack(rng):
    cupy = pytest.importorskip("cupy")
    torch = _torch()
    problem = random_problem(rng, 512, 128, 64)
    weight = _weight(problem)
    a = _activations(rng, 4, 512)
    ref = a.astype(np.float64) @ problem.dense[0]
    ac = cupy.asarray(a)
    got = ferrum.mm(ac, weight, stream=cupy.cuda.Stream(non_blocking=True))
    assert isinstance(got, cupy.ndarray)
    cupy.cuda.Device().synchronize()
    assert _rel_err(cupy.asnumpy(got), ref) <= TOL
    # ferrum's own DeviceArray: CAI v3 and DLPack exports
    da = ferrum.cuda.BACKEND.from_host(a)
    res = ferrum.mm(da, weight)
    assert type(res) is ferrum.cuda.DeviceArray
    assert _rel_err(torch.from_dlpack(res).cpu().numpy(), ref) <= TOL
    assert _rel_err(cupy.asnumpy(cupy.asarray(res)), ref) <= TOL


def test_numpy_out_written_in_place(rng):
    problem = random_problem(rng, 256, 128, 128)
    weight = _weight(problem)
    a = _activations(rng, 3, 256)
    out = np.full((3, 128), np.nan, dtype=np.float16)
    assert ferrum.mm(a, weight, out=out) is out
    assert _rel_err(out, a.astype(np.float64) @ problem.dense[0]) <= TOL


@pytest.mark.parametrize("nbytes", [16, 4096 + 48, 3 << 20])
def test_stream_probe_copies_every_byte_and_reads_without_writing(nbytes, rng):
    # the bench's bandwidth probe: a tail shorter than one unrolled step, a partial stride
    from ferrum import _cuda
    src_host = rng.integers(0, 256, nbytes, dtype=np.uint8)
    src = _cuda.from_host(src_host)
    dst = _cuda.from_host(np.full(nbytes, 0xA5, dtype=np.uint8))   # poisoned
    _cuda.stream_probe(src.ptr, dst.ptr, nbytes)
    assert np.array_equal(_cuda.to_host(dst.ptr, (nbytes,), np.uint8), src_host)
    _cuda.stream_probe(src.ptr, 0, nbytes, 1)
    assert np.array_equal(_cuda.to_host(src.ptr, (nbytes,), np.uint8), src_host)


def test_cuda_failure_raises_cuda_error(rng):
    from ferrum import _cuda
    with pytest.raises(ferrum.CudaError, match="cudaErrorMemoryAllocation|out of memory"):
        _cuda.empty((1 << 50,), np.uint8)
    # the context is still usable afterwards
    problem = random_problem(rng, 128, 64, -1)
    a = _activations(rng, 2, 128)
    assert _rel_err(ferrum.mm(a, _weight(problem)), a.astype(np.float64) @ problem.dense[0]) <= TOL


def test_weight_to_cuda_owns_device_memory(rng):
    problem = random_problem(rng, 256, 128, 64)
    host = ferrum.MarlinWeight.from_gptq(problem.qweights[0], problem.scales[0], group_size=64)
    dev = host.to("cuda")
    assert type(dev.qweight) is ferrum.cuda.DeviceArray
    a = _activations(rng, 2, 256)
    assert _rel_err(ferrum.mm(a, dev), a.astype(np.float64) @ problem.dense[0]) <= TOL


def _errors_in_threads(count: int, work) -> list:
    """Run work(i) for i < count, each in its own thread, at once: the errors work(i) returns,
    and what any of them raised."""
    import threading
    errors = []

    def run(i):
        try:
            errors.extend(work(i))
        except Exception as exc:   # reported by the caller
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_threads_and_streams(rng):
    torch = _torch()
    problem = random_problem(rng, 2048, 512, 128)
    weight = _weight(problem)
    inputs = [_activations(rng, m, 2048) for m in (1, 3, 16, 40)]
    refs = [a.astype(np.float64) @ problem.dense[0] for a in inputs]

    def work(i):
        errors = []
        stream = torch.cuda.Stream()
        a = torch.from_numpy(inputs[i]).cuda()
        torch.cuda.synchronize()
        for _ in range(20):
            out = torch.full((a.shape[0], 512), float("nan"), dtype=torch.float16, device="cuda")
            with torch.cuda.stream(stream):
                ferrum.cuda.BACKEND.mm(a, weight, 0, out, stream=stream, splits=4)
            stream.synchronize()
            err = _rel_err(out.cpu().numpy(), refs[i])
            if err > TOL:
                errors.append((i, err))
        return errors

    assert not _errors_in_threads(len(inputs), work)


class _DLPackOnly:
    """A device array that offers only DLPack (like JAX): no __cuda_array_interface__."""

    def __init__(self, tensor):
        self._t = tensor
        self.shape = tuple(tensor.shape)
        self.dtype = str(tensor.dtype).rsplit(".", 1)[-1]

    def __dlpack__(self, stream=None, **kwargs):
        return self._t.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def test_interop_dlpack_only_producer(rng):
    torch = _torch()
    problem = random_problem(rng, 512, 192, 64)
    weight = _weight(problem)
    a = _activations(rng, 6, 512)
    got = ferrum.mm(_DLPackOnly(torch.from_numpy(a).cuda()), weight)
    assert type(got) is ferrum.cuda.DeviceArray
    assert _rel_err(got.copy_to_host(), a.astype(np.float64) @ problem.dense[0]) <= TOL


# --- the binding's host code on real device arrays (on the stub: tests/test_cuda_binding.py) ---

class _CAIOnly:
    """A generic __cuda_array_interface__ array (as Numba's are) over a torch tensor, with the
    dict's entries replaced as given (data=..., stream=..., strides=...)."""

    def __init__(self, t, **entries):
        self._t = t
        self._entries = entries

    @property
    def __cuda_array_interface__(self):
        cai = dict(self._t.__cuda_array_interface__)
        cai["version"] = 3
        cai.update(self._entries)
        return cai


def _misaligned_copy(torch, t, offset_bytes):
    """t's values in a new tensor-backed CAI array that starts offset_bytes past a 256-byte
    boundary (contiguous, but not 16-byte aligned)."""
    raw = t.contiguous().view(torch.uint8).flatten()
    buf = torch.zeros(raw.numel() + 256, dtype=torch.uint8, device="cuda")
    buf[offset_bytes:offset_bytes + raw.numel()] = raw
    torch.cuda.synchronize()
    typestr = np.dtype(str(t.dtype).rsplit(".", 1)[-1]).str
    return _CAIOnly(buf, shape=tuple(t.shape), typestr=typestr, strides=None,
                    data=(buf.data_ptr() + offset_bytes, False))


def test_strided_and_misaligned_inputs_are_read_right(rng):
    """Views the kernels cannot read in place are copied (on the call's stream) first: every
    other column, a transposed tensor, a padded row slice, a tensor starting 2 bytes past a
    boundary; through torch, a generic CAI, DLPack, and on a side stream outside torch's
    stream context. The caller's arrays are left as they were."""
    torch = _torch()
    problem = random_problem(rng, 1024, 256, 128)
    weight = _weight(problem)
    a = _activations(rng, 9, 1024)
    ref = a.astype(np.float64) @ problem.dense[0]
    wide = torch.from_numpy(np.repeat(a, 2, axis=1)).cuda()            # a[:, j] at 2j and 2j+1
    padded = torch.from_numpy(np.concatenate([a, a[:, :64]], axis=1)).cuda()
    flat = torch.zeros(1 + a.size, dtype=torch.float16, device="cuda")
    flat[1:] = torch.from_numpy(a.ravel()).cuda()
    views = {"every other column": wide[:, ::2],
             "transposed": torch.from_numpy(np.ascontiguousarray(a.T)).cuda().t(),
             "padded rows": padded[:, :1024],
             "2 bytes past a boundary": flat[1:].view(9, 1024)}
    assert views["2 bytes past a boundary"].data_ptr() % 16 == 2
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    for name, view in views.items():
        before = view.clone()
        kinds = {"torch": view, "CAI": _CAIOnly(view), "DLPack": _DLPackOnly(view)}
        for kind, x in kinds.items():
            got = ferrum.mm(x, weight)
            host = got.cpu().numpy() if kind == "torch" else np.asarray(got.copy_to_host())
            assert _rel_err(host, ref) <= TOL, (name, kind)
        side.wait_stream(torch.cuda.current_stream())
        got = ferrum.mm(view, weight, stream=side)
        side.synchronize()
        assert _rel_err(got.cpu().numpy(), ref) <= TOL, (name, "side stream")
        assert torch.equal(view, before), name
    mis = _misaligned_copy(torch, torch.from_numpy(a).cuda(), 2)
    assert _rel_err(ferrum.mm(mis, weight).copy_to_host(), ref) <= TOL


def test_outputs_that_cannot_be_written_in_place_are_refused(rng):
    torch = _torch()
    problem = random_problem(rng, 512, 128, 128)
    weight = _weight(problem)
    a = _activations(rng, 4, 512)
    ad = torch.from_numpy(a).cuda()
    out = torch.full((4, 128), float("nan"), dtype=torch.float16, device="cuda")
    read_only = _CAIOnly(out, data=(out.data_ptr(), True))
    with pytest.raises(ValueError, match="^out=.*read-only"):
        ferrum.mm(ad, weight, out=read_only)
    with pytest.raises(ValueError, match="^out=.*C-contiguous"):
        ferrum.mm(ad, weight, out=torch.empty((128, 4), dtype=torch.float16, device="cuda").t())
    flat = torch.empty(1 + 4 * 128, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="^out=.*16-byte boundary"):
        ferrum.mm(ad, weight, out=flat[1:].view(4, 128))
    buf = torch.from_numpy(np.concatenate([a.ravel(), np.zeros(64, np.float16)])).cuda()
    a_in_buf = buf[:4 * 512].view(4, 512)
    with pytest.raises(ValueError, match="^out=.*overlaps a"):
        ferrum.mm(a_in_buf, weight, out=buf[256:256 + 4 * 128].view(4, 128))
    with pytest.raises(ValueError, match="^out=.*overlaps the weight"):
        ferrum.mm(ad, weight, out=_CAIOnly(out, data=(weight.qweight.ptr, False)))
    assert torch.isnan(out).all()
    assert np.array_equal(a_in_buf.cpu().numpy(), a)
    np.testing.assert_array_equal(ferrum.cuda.BACKEND.to_host(weight.qweight),
                                  F.repack_reference(problem.qweights[0], 512, 128))


def test_host_a_with_a_device_out(rng):
    torch = _torch()
    problem = random_problem(rng, 256, 128, 64)
    weight = _weight(problem)
    a = _activations(rng, 3, 256)
    out = torch.full((3, 128), float("nan"), dtype=torch.float16, device="cuda")
    assert ferrum.mm(a, weight, out=out) is out
    assert _rel_err(out.cpu().numpy(), a.astype(np.float64) @ problem.dense[0]) <= TOL


def test_stream_handles_and_stream_objects(rng):
    """0 and 1 (the legacy default stream), 2 (the per-thread default stream), a torch stream,
    a Numba stream (int(stream)); a negative handle is refused before anything runs."""
    torch = _torch()
    problem = random_problem(rng, 1024, 256, 128)
    weight = _weight(problem)
    a = _activations(rng, 5, 1024)
    ad = torch.from_numpy(a).cuda()
    ref = a.astype(np.float64) @ problem.dense[0]
    streams = [0, 1, 2, torch.cuda.Stream()]
    try:
        from numba import cuda as numba_cuda
        if numba_cuda.is_available():
            streams.append(numba_cuda.stream())
    except Exception:   # no usable numba.cuda here: the stub test covers int(stream)
        pass
    for stream in streams:
        out = torch.full((5, 256), float("nan"), dtype=torch.float16, device="cuda")
        torch.cuda.synchronize()
        assert ferrum.mm(ad, weight, out=out, stream=stream) is out
        torch.cuda.synchronize()
        assert _rel_err(out.cpu().numpy(), ref) <= TOL, repr(stream)
    with pytest.raises(ValueError, match="^stream=-1"):
        ferrum.mm(ad, weight, out=out, stream=-1)


def test_per_thread_default_streams_in_threads(rng):
    """stream=2 is each thread's own per-thread default stream: the split-K workspace must be
    the thread's own too (one shared by all would be written by several kernels at once)."""
    torch = _torch()
    import threading
    problem = random_problem(rng, 4096, 512, 128)
    weight = _weight(problem)
    inputs = [_activations(rng, m, 4096) for m in (1, 3, 16, 40)]
    refs = [a.astype(np.float64) @ problem.dense[0] for a in inputs]
    start = threading.Barrier(len(inputs), timeout=60)   # a thread that fails breaks it

    def work(i):
        a = torch.from_numpy(inputs[i]).cuda()
        outs = [torch.full((a.shape[0], 512), float("nan"), dtype=torch.float16,
                           device="cuda") for _ in range(30)]
        torch.cuda.synchronize()
        start.wait()
        for out in outs:   # queued back to back, so the threads' kernels overlap
            ferrum.cuda.BACKEND.mm(a, weight, 0, out, stream=2, tile=2, splits=8)
        torch.cuda.synchronize()
        errors = [(i, _rel_err(out.cpu().numpy(), refs[i])) for out in outs]
        return [e for e in errors if e[1] > TOL]

    assert not _errors_in_threads(len(inputs), work)


def test_torch_result_is_allocated_for_the_call_stream(rng):
    """ferrum.mm(a, w, stream=side) outside torch's stream context: the result must not be a
    block the current stream has just freed while its queued work still writes it."""
    torch = _torch()
    problem = random_problem(rng, 1024, 256, 128)
    weight = _weight(problem)
    a = _activations(rng, 64, 1024)
    ad = torch.from_numpy(a).cuda()
    ref = a.astype(np.float64) @ problem.dense[0]
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    for _ in range(3):
        x = torch.empty((64, 256), dtype=torch.float16, device="cuda")   # the result's size
        torch.cuda._sleep(50_000_000)      # tens of ms of the current stream's time
        x.fill_(float("nan"))              # queued behind the sleep
        del x                              # its block is free for the current stream at once
        got = ferrum.mm(ad, weight, stream=side)
        side.synchronize()
        torch.cuda.synchronize()
        assert _rel_err(got.cpu().numpy(), ref) <= TOL


def test_device_weights_written_on_a_producer_stream(rng):
    """Weights given as CAI v3 arrays whose `stream` is a producer stream still writing them:
    ferrum waits for it before any call reads them, whatever stream the call runs on."""
    torch = _torch()
    problem = random_problem(rng, 1024, 256, 128)
    marlin = F.repack_reference(problem.qweights[0], 1024, 256)
    scales = F.permute_scales_reference(problem.scales[0], 1024, 256, 128)
    q_src, s_src = torch.from_numpy(marlin).cuda(), torch.from_numpy(scales).cuda()
    a = _activations(rng, 5, 1024)
    ad = torch.from_numpy(a).cuda()
    out = torch.full((5, 256), float("nan"), dtype=torch.float16, device="cuda")
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    producer.wait_stream(torch.cuda.current_stream())
    consumer.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(producer):
        q, s = torch.zeros_like(q_src), torch.zeros_like(s_src)
        torch.cuda._sleep(50_000_000)
        q.copy_(q_src)
        s.copy_(s_src)
    weight = ferrum.MarlinWeight(_CAIOnly(q, stream=producer.cuda_stream),
                                 _CAIOnly(s, stream=producer.cuda_stream),
                                 size_k=1024, size_n=256, group_size=128)
    ferrum.mm(ad, weight, out=out, stream=consumer)
    consumer.synchronize()
    torch.cuda.synchronize()
    assert _rel_err(out.cpu().numpy(), a.astype(np.float64) @ problem.dense[0]) <= TOL


def test_strided_and_misaligned_device_weights_and_repack_input(rng):
    torch = _torch()
    problem = random_problem(rng, 512, 128, 64)
    marlin = F.repack_reference(problem.qweights[0], 512, 128)
    scales = F.permute_scales_reference(problem.scales[0], 512, 128, 64)
    q_wide = torch.from_numpy(np.repeat(marlin, 2, axis=1)).cuda()[:, ::2]   # strided views
    s_wide = torch.from_numpy(np.repeat(scales, 2, axis=1)).cuda()[:, ::2]
    weight = ferrum.MarlinWeight(q_wide, s_wide, size_k=512, size_n=128, group_size=64)
    a = _activations(rng, 7, 512)
    ref = a.astype(np.float64) @ problem.dense[0]
    assert _rel_err(ferrum.mm(torch.from_numpy(a).cuda(), weight).cpu().numpy(), ref) <= TOL
    q_gptq = torch.from_numpy(problem.qweights[0].view(np.int32)).cuda()
    for x in (_misaligned_copy(torch, q_gptq, 2), torch.from_numpy(
            np.repeat(problem.qweights[0].view(np.int32), 2, axis=1)).cuda()[:, ::2]):
        got = ferrum.repack(x, 512, 128, backend="cuda")
        np.testing.assert_array_equal(ferrum.cuda.BACKEND.to_host(got), marlin)


def test_weight_on_another_gpu(rng):
    """A weight on GPU 1 while GPU 0 is current: ferrum makes GPU 1 current for the call (and
    back after); an activation on GPU 0 is refused, naming both."""
    torch = _torch()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    problem = random_problem(rng, 512, 128, 64)
    marlin = F.repack_reference(problem.qweights[0], 512, 128)
    scales = F.permute_scales_reference(problem.scales[0], 512, 128, 64)
    weight = ferrum.MarlinWeight(torch.from_numpy(marlin).to("cuda:1"),
                                 torch.from_numpy(scales).to("cuda:1"),
                                 size_k=512, size_n=128, group_size=64)
    a = _activations(rng, 3, 512)
    ref = a.astype(np.float64) @ problem.dense[0]
    torch.cuda.set_device(0)
    got = ferrum.mm(torch.from_numpy(a).to("cuda:1"), weight)
    assert got.device.index == 1
    assert _rel_err(got.cpu().numpy(), ref) <= TOL
    assert _rel_err(ferrum.mm(a, weight), ref) <= TOL   # numpy in: copied to GPU 1
    assert ferrum._cuda.get_device() == 0
    with pytest.raises(ValueError, match="^a=.*cuda:0 but the weight is on cuda:1"):
        ferrum.mm(torch.from_numpy(a).to("cuda:0"), weight)
    assert ferrum._cuda.get_device() == 0
