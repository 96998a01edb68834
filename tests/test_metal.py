"""The metal backend (WGSL through wgpu): repack bit for bit, mm against a float64 reference.

Small shapes only: on lavapipe (Mesa's CPU Vulkan) with two cores the whole file runs in a couple
of minutes. Every mm output is poisoned with NaN first, so an element the kernels never wrote fails.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys

import numpy as np
import pytest

import ferrum
from ferrum import format as F
from ferrum.check import random_problem

pytestmark = pytest.mark.metal

_INFO = ferrum.backends()["metal"]
if not _INFO.available:
    pytest.skip(f"metal backend not available: {_INFO.reason}", allow_module_level=True)

from ferrum.metal import BACKEND  # noqa: E402  (after the availability check)

TOLERANCE = 1e-3
M_VALUES = (1, 3, 16, 33, 200)


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


def poisoned(m: int, n: int) -> np.ndarray:
    return np.full((m, n), np.nan, dtype=np.float16)


def check_mm(weight, a: np.ndarray, dense: np.ndarray, expert=None):
    out = poisoned(a.shape[0], dense.shape[1])
    got = ferrum.mm(a, weight, expert=expert, out=out)
    assert got is out
    assert not np.isnan(out).any(), f"{int(np.isnan(out).sum())} elements left unwritten"
    err = rel_error(out, a.astype(np.float64) @ dense)
    assert err < TOLERANCE, f"relative Frobenius error {err:.2e}"


def metal_problem(seed: int, size_k: int, size_n: int, group_size: int, act_order=False):
    """(rng, problem, its weight on metal): a random problem from a seeded generator, which the
    test goes on drawing activations from."""
    rng = np.random.default_rng(seed)
    p = random_problem(rng, size_k, size_n, group_size, act_order=act_order)
    w = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=group_size,
                                      g_idx=p.g_idx, backend="metal")
    return rng, p, w


@contextlib.contextmanager
def _overridden(attribute: str, value: int):
    saved = getattr(BACKEND, attribute)
    setattr(BACKEND, attribute, value)
    try:
        yield
    finally:
        setattr(BACKEND, attribute, saved)


def binding_limit(nbytes: int):
    """Make the planner believe storage bindings hold only ``nbytes`` (forces the split paths)."""
    return _overridden("binding_limit", nbytes)


def last_plan(weight):
    return list(weight._aux["metal_plans"].values())[-1]


def target_workgroups(count: int):
    """The workgroup count the k-split aims for (small on lavapipe; large GPUs use 1024)."""
    return _overridden("target_workgroups", count)


@contextlib.contextmanager
def subgroups(enabled: bool):
    saved = BACKEND.subgroups
    BACKEND.subgroups = enabled and saved
    try:
        yield
    finally:
        BACKEND.subgroups = saved


def test_info_names_adapter_and_native_api():
    assert " via " in _INFO.device
    assert _INFO.device.split(" via ")[-1] in ("Vulkan", "Metal")


def test_import_without_wgpu_reports_unavailable():
    code = ("import sys; sys.modules['wgpu'] = None\n"
            "import ferrum\n"
            "info = ferrum.backends()['metal']\n"
            "assert not info.available and 'wgpu' in info.reason, info\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def _metal_info_with(env: dict) -> str:
    """backends()['metal'] in a fresh process with these environment variables: 'ok' or the
    reason it is not available."""
    import os
    code = ("import ferrum\n"
            "info = ferrum.backends()['metal']\n"
            "print('ok' if info.available else 'REASON ' + info.reason)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("name,value", [
    ("FERRUM_METAL_GEMV_K_SLOTS", "12"), ("FERRUM_METAL_BINDING_LIMIT", "abc"),
    ("FERRUM_METAL_TARGET_WORKGROUPS", "0"), ("FERRUM_METAL_TILED_UNROLL", "maybe"),
    ("FERRUM_METAL_SPIN_US", "-5"), ("FERRUM_METAL_ADAPTER", "no such gpu"),
    ("FERRUM_METAL_NATIVE", "maybe")])
def test_a_bad_tuning_variable_is_named_in_the_reason(name, value):
    # Not a traceback on the first mm, and not silently ignored: metal reports itself
    # unavailable, with the variable and its value as the reason.
    said = _metal_info_with({name: value})
    assert said.startswith("REASON ") and f"{name}={value!r}" in said, said


def test_a_workgroup_target_past_float_range_is_refused_not_an_error_in_every_mm():
    # FERRUM_METAL_TARGET_WORKGROUPS took any positive integer, and the planner scales it by
    # float shares: a target past float range left metal available and every mm raised
    # OverflowError ("int too large to convert to float").
    huge = "1" + "0" * 320
    said = _metal_info_with({"FERRUM_METAL_TARGET_WORKGROUPS": huge})
    assert said.startswith("REASON ") and f"FERRUM_METAL_TARGET_WORKGROUPS={huge!r}" in said, said


def test_quads_in_flight_past_any_use_are_refused_not_compiled():
    # FERRUM_METAL_GEMV_LOADS took any integer >= 0 and gemv.wgsl repeats its per-quad step
    # that many times: 200 took 94 s to build on lavapipe and a million never finished, so
    # the first mm hung where a refusal with the variable's name was due.
    said = _metal_info_with({"FERRUM_METAL_GEMV_LOADS": "1000000"})
    assert said.startswith("REASON ") and "FERRUM_METAL_GEMV_LOADS='1000000'" in said, said
    assert _metal_info_with({"FERRUM_METAL_GEMV_LOADS": "4"}) == "ok"


@pytest.mark.parametrize("name", ["FERRUM_METAL_TILED_UNROLL", "FERRUM_METAL_NATIVE"])
def test_a_bad_switch_value_is_refused_with_every_spelling_it_takes(name):
    # The switches take 0/1, false/true, off/on and no/yes (metal/README.md); the reason said
    # "must be 0 or 1" alone, as if "off" or "yes" were refused too.
    said = _metal_info_with({name: "maybe"})
    assert said.startswith("REASON ") and "0 or 1" in said, said
    assert all(word in said for word in ("false", "true", "off", "on", "no", "yes")), said
    assert _metal_info_with({name: "Off"}) == "ok"


def test_good_tuning_variables_are_taken():
    assert _metal_info_with({"FERRUM_METAL_GEMV_K_SLOTS": "16", "FERRUM_METAL_TILED_UNROLL": "false",
                             "FERRUM_METAL_ADAPTER": _INFO.device.split(" via ")[0][:4]}) == "ok"


@pytest.mark.parametrize("value,path", [("0", "wgpu-py"), ("false", "wgpu-py"), ("off", "wgpu-py"),
                                        ("1", "native"), ("yes", "native")])
def test_native_path_variable_takes_every_spelling_of_a_flag(value, path):
    # FERRUM_METAL_NATIVE was compared with "0" alone: "false" or "off" left the C-API path on
    # (and "maybe" was taken silently), unlike FERRUM_METAL_TILED_UNROLL's 0/1/false/true/off/on.
    import os
    code = ("import ferrum\n"
            "info = ferrum.backends()['metal']\n"
            "print(info.version if info.available else 'REASON ' + info.reason)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "FERRUM_METAL_NATIVE": value}, timeout=300)
    assert done.returncode == 0, done.stderr
    said = done.stdout.strip().splitlines()[-1]
    if path == "native" and BACKEND._native is None:
        pytest.skip("the C-API path's self-test fails on this machine")
    assert said.endswith(f"mm path {path}"), said


def test_old_wgpu_is_reported_not_used(monkeypatch):
    from ferrum.metal import backend as mb
    monkeypatch.setattr(mb.wgpu, "__version__", "0.25.0")
    info = mb.MetalBackend().info()
    assert not info.available and "0.25.0" in info.reason and "0.26" in info.reason


def test_weights_pickle_and_deepcopy_on_metal():
    import copy
    import pickle
    rng, p, w = metal_problem(77, 256, 128, 64, act_order=True)
    a = rng.standard_normal((3, 256)).astype(np.float16)
    want = ferrum.mm(a, w)
    for twin in (copy.deepcopy(w), pickle.loads(pickle.dumps(w))):
        assert twin.backend == "metal" and twin.perm is not None
        assert twin.qweight is not w.qweight
        assert np.array_equal(ferrum.mm(a, twin), want)


def test_plans_are_kept_per_expert_and_least_recently_used_goes(monkeypatch):
    # A mixture-of-experts layer calls each expert at many M: with 8 experts x 9 M values (72
    # plans, more than PLANS_PER_WEIGHT) nothing is rebuilt after the first round.
    from ferrum.metal import backend as mb
    rng = np.random.default_rng(5)
    p = random_problem(rng, 128, 64, 32, experts=8)
    w = ferrum.load_stacked(p.qweights, p.scales, group_size=32, backend="metal")
    built = []
    make = BACKEND._make_plan
    monkeypatch.setattr(BACKEND, "_make_plan", lambda *args: built.append(args[1:]) or make(*args))
    a = {m: rng.standard_normal((m, 128)).astype(np.float16) for m in range(1, 10)}
    ferrum.mm(rng.standard_normal((128, 128)).astype(np.float16), w)    # staging at full size
    for round_ in range(3):     # (a plan is rebuilt once if the staging grew after it was made)
        built.clear()
        for e in range(8):
            for m in range(1, 10):
                got = ferrum.mm(a[m], w, expert=e)
                if round_ == 2 and m in (1, 9):
                    assert np.abs(got - a[m].astype(np.float64) @ p.dense[e]).max() < 0.05
    assert built == [] and len(w._aux["metal_plans"]) >= 72 > mb.PLANS_PER_WEIGHT
    # Least recently used goes first: with room for 64, a hot key survives 100 others.
    monkeypatch.setattr(mb, "PLANS_PER_EXPERT", 0)
    single = metal_problem(6, 128, 64, 32)[2]
    x = rng.standard_normal((1, 128)).astype(np.float16)
    ferrum.mm(x, single)
    built.clear()
    for m in range(2, 102):
        ferrum.mm(x, single)
        ferrum.mm(rng.standard_normal((m, 128)).astype(np.float16), single)
    assert 1 not in [args[1] for args in built] and len(built) == 100


def test_trim_releases_workspaces_and_the_plans_that_bind_them():
    rng, p, w = metal_problem(8, 256, 64, 64)
    small = rng.standard_normal((2, 256)).astype(np.float16)
    ferrum.mm(rng.standard_normal((3000, 256)).astype(np.float16), w)
    assert max(s.size for s in BACKEND._stagings.values()) >= 3000 * 256 * 2
    assert len([k for k in BACKEND._stagings if k[0] == "upload"]) == 1   # one of each kind
    BACKEND.trim()
    assert "metal_plans" not in w._aux and not BACKEND._work
    check_mm(w, small, p.dense[0])
    assert max(s.size for s in BACKEND._stagings.values()) < 3000 * 256 * 2


def test_a_shader_that_does_not_compile_says_so():
    with pytest.raises(RuntimeError, match="did not compile"):
        BACKEND._compile("fn main( {")


# ------------------------------------------------------------------------------------------------
# repack

def test_repack_matches_golden_vectors(golden):
    data = golden
    for i in range(6):
        size_k, size_n, _ = (int(v) for v in data[f"c{i}_meta"])
        perm = data[f"c{i}_perm"]
        got = ferrum.repack(data[f"c{i}_qweight"], size_k, size_n,
                            perm=perm if perm.size else None, backend="metal")
        np.testing.assert_array_equal(got, data[f"c{i}_marlin"], err_msg=f"case c{i}")


@pytest.mark.parametrize("size_k,size_n,act_order", [(128, 64, False), (384, 320, True),
                                                      (1024, 192, False), (512, 512, True)])
def test_repack_matches_reference(size_k, size_n, act_order):
    rng = np.random.default_rng(size_k + size_n)
    qweight = rng.integers(0, 2**32, (size_k // 8, size_n), dtype=np.uint32).view(np.int32)
    perm = rng.permutation(size_k).astype(np.int32) if act_order else None
    got = ferrum.repack(qweight, size_k, size_n, perm=perm, backend="metal")
    np.testing.assert_array_equal(got, F.repack_reference(qweight, size_k, size_n, perm))


@pytest.mark.parametrize("act_order", [False, True])
def test_repack_larger_than_one_binding(act_order):
    size_k, size_n = 1024, 512       # 256 KiB each way; the limit forces 4 x 4 blocks
    rng = np.random.default_rng(7)
    qweight = rng.integers(0, 2**32, (size_k // 8, size_n), dtype=np.uint32).view(np.int32)
    perm = rng.permutation(size_k).astype(np.int32) if act_order else None
    with binding_limit(64 * 1024 + BACKEND.offset_alignment):
        got = ferrum.repack(qweight, size_k, size_n, perm=perm, backend="metal")
    np.testing.assert_array_equal(got, F.repack_reference(qweight, size_k, size_n, perm))


@pytest.mark.parametrize("act_order", [False, True])
def test_repack_windows_within_the_dispatch_grid(monkeypatch, act_order):
    # A dispatch holds at most MAX_GRID (65535) workgroups a dimension, so a repack window's
    # chunks and kt rows are cut to it (a weight of 4.2M columns or 1M k-tile rows would exceed
    # it). With the grid posed at 2: windows of at most 2 chunks x 2 kt rows, bit for bit the
    # reference.
    import wgpu.backends.wgpu_native as native
    import ferrum.metal.backend as metal_backend
    size_k, size_n = 512, 320
    rng = np.random.default_rng(11)
    qweight = rng.integers(0, 2**32, (size_k // 8, size_n), dtype=np.uint32).view(np.int32)
    perm = rng.permutation(size_k).astype(np.int32) if act_order else None
    grids = []
    dispatch = native.GPUComputePassEncoder.dispatch_workgroups

    def recorded(self, x, y=1, z=1):
        grids.append((x, y, z))
        return dispatch(self, x, y, z)
    monkeypatch.setattr(metal_backend, "MAX_GRID", 2)
    monkeypatch.setattr(native.GPUComputePassEncoder, "dispatch_workgroups", recorded)
    got = ferrum.repack(qweight, size_k, size_n, perm=perm, backend="metal")
    np.testing.assert_array_equal(got, F.repack_reference(qweight, size_k, size_n, perm))
    assert len(grids) == 3 * 16 and max(max(g) for g in grids) == 2, grids


# ------------------------------------------------------------------------------------------------
# mm

@pytest.mark.parametrize("size_k,group_size", [(512, -1), (384, -1), (512, 32), (512, 64),
                                               (384, 128), (512, 128), (384, 384)])
def test_mm_every_group_size(size_k, group_size):
    size_n = 192
    rng, p, w = metal_problem(size_k + group_size, size_k, size_n, group_size)
    for m in M_VALUES:
        check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), p.dense[0])


@pytest.mark.parametrize("group_size", [32, 128])
def test_mm_act_order(group_size):
    size_k, size_n = 512, 128
    rng, p, w = metal_problem(200 + group_size, size_k, size_n, group_size, act_order=True)
    assert w.perm is not None
    for m in (1, 5, 40):
        check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), p.dense[0])


@pytest.mark.parametrize("group_size", [-1, 64])
def test_mm_stacked_experts_one_and_all(group_size):
    size_k, size_n, experts = 256, 128, 3
    rng = np.random.default_rng(300 + group_size)
    p = random_problem(rng, size_k, size_n, group_size, experts=experts)
    w = ferrum.load_stacked(p.qweights, p.scales, group_size=group_size, backend="metal")
    assert w.stacked and w.num_experts == experts
    for m in (1, 7, 36):
        a = rng.standard_normal((m, size_k)).astype(np.float16)
        for e in range(experts):
            check_mm(w, a, p.dense[e], expert=e)
        check_mm(w, a, np.concatenate(p.dense, axis=1))


@pytest.mark.parametrize("group_size", [32, 128])
def test_mm_stacked_act_order_experts(group_size):
    # each expert with its own act-order (load_stacked's g_idx): A permuted per expert, one
    # expert a plan; expert by expert and all at once against float64
    size_k, size_n, experts = 256, 128, 3
    rng = np.random.default_rng(310 + group_size)
    p = random_problem(rng, size_k, size_n, group_size, act_order=True, experts=experts)
    w = ferrum.load_stacked(p.qweights, p.scales, group_size=group_size, g_idx=p.g_idx,
                            backend="metal")
    assert w.perm.shape == (experts, size_k)
    for m in (1, 7, 36):
        a = rng.standard_normal((m, size_k)).astype(np.float16)
        for e in range(experts):
            check_mm(w, a, p.dense[e], expert=e)
        check_mm(w, a, np.concatenate(p.dense, axis=1))


@pytest.mark.parametrize("m", [5, 40])     # the vector kernel, the tiled kernel
def test_mm_non_finite_activations_propagate_as_in_float64(m):
    # inf times a zero weight (q == 8) is NaN, times any other weight an inf of the product's
    # sign; NaN spreads along its row: what the cpu reference and float64 say.
    rng, p, w = metal_problem(900 + m, 256, 128, 64)
    a = rng.standard_normal((m, 256)).astype(np.float16)
    a[0, 5], a[1, 7], a[2, 9] = np.inf, -np.inf, np.nan
    a[3, 20], a[3, 200] = np.inf, -np.inf      # inf - inf where the two products' signs differ
    with np.errstate(invalid="ignore"):
        ref = a.astype(np.float64) @ p.dense[0]
    assert np.isinf(ref).any() and np.isnan(ref[:2]).any()
    assert np.isnan(ref[3]).any() and np.isinf(ref[3]).any()
    got = ferrum.mm(a, w).astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    assert np.array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])
    assert rel_error(got[4:], ref[4:]) < TOLERANCE


@pytest.mark.parametrize("group_size", [-1, 64])
def test_mm_non_finite_activations_at_one_and_two_rows(group_size):
    # M <= 2 may take the 72 of uint4b8 out of gemv's column sums as 72 x sum(a), which is
    # inf - inf where a holds an inf: mm sees the inf or NaN and prescales the call instead, where
    # inf x 0 = NaN comes by itself. Each kind of non-finite row alone, next to a finite row, on
    # one k-split (gemv writes C) and on several, with 1 or 2 quads in flight and 8 or 32 k-slots.
    size_k, size_n = 512, 128
    rng, p, w = metal_problem(930 + group_size, size_k, size_n, group_size)
    kinds = [{7: np.inf}, {300: -np.inf}, {64: np.nan}, {20: np.inf, 500: -np.inf}]
    for knobs in (dict(target_workgroups=1, gemv_loads=2), dict(target_workgroups=4096, gemv_loads=1),
                  dict(target_workgroups=1, gemv_k_slots=32, gemv_loads=2)):
        with planner(**knobs):
            for m in (1, 2):
                for kind in kinds:
                    a = rng.standard_normal((m, size_k)).astype(np.float16)
                    for col, value in kind.items():
                        a[0, col] = value
                    with np.errstate(invalid="ignore"):
                        ref = a.astype(np.float64) @ p.dense[0]
                    got = ferrum.mm(a, w).astype(np.float64)
                    assert np.array_equal(np.isnan(got), np.isnan(ref)), (knobs, m, kind)
                    assert np.array_equal(got[np.isinf(ref)], ref[np.isinf(ref)]), (knobs, m, kind)
                    if m == 2:
                        assert rel_error(got[1:], ref[1:]) < TOLERANCE
                    summary = last_plan(w).summary
                    assert summary.startswith("gemv m1" if m == 1 else "gemv m2"), summary
                    assert "sums" not in summary, summary


@pytest.mark.parametrize("group_size", [-1, 64])
def test_mm_split_over_k_as_on_a_large_gpu(group_size):
    # The k-splits a large GPU gets (many workgroups per layer), on a small layer.
    size_k, size_n = 1024, 128
    rng, p, w = metal_problem(800 + group_size, size_k, size_n, group_size)
    with target_workgroups(1024):
        for m in (1, 6, 16, 50):
            check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), p.dense[0])
            main_grid = last_plan(w).dispatches[0].grid
            assert main_grid[1] > 1, f"M={m}: no k-split ({main_grid})"


def planner(**values):
    """Override several planner knobs at once (vector_m_tile, gemv_loads, target_workgroups)."""
    stack = contextlib.ExitStack()
    for name, value in values.items():
        stack.enter_context(_overridden(name, value))
    return stack


@pytest.mark.parametrize("group_size", [-1, 128])
def test_mm_vector_kernel_every_m_up_to_16(group_size):
    # gemv serves every M <= 16 (odd M too: rows past M re-read row M - 1 and are never written),
    # in one m-tile of up to 16 rows or in tiles of 8, with one k-split (C written by gemv, no
    # reduce pass) or several, 1, 2 or 4 quads in flight per lane, and 8, 16 or 32 k-slots.
    size_k, size_n = 512, 192
    rng, p, w = metal_problem(900 + group_size, size_k, size_n, group_size)
    variants = [dict(vector_m_tile=16, gemv_loads=1, target_workgroups=1),
                dict(vector_m_tile=8, gemv_loads=2, target_workgroups=1024),
                dict(vector_m_tile=16, gemv_loads=4, target_workgroups=64),
                # 16 or 32 k-slots a workgroup: the k-slots folded in halves before the last 8
                dict(vector_m_tile=8, gemv_loads=1, target_workgroups=4096, gemv_k_slots=32),
                dict(vector_m_tile=16, gemv_loads=2, target_workgroups=1, gemv_k_slots=16)]
    seen = set()
    for knobs in variants:
        with planner(**knobs):
            for m in range(1, 17):
                check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), p.dense[0])
                plan = last_plan(w)
                assert plan.summary.startswith("gemv"), plan.summary
                seen.add(("direct" in plan.summary, len(plan.dispatches)))
    # both ways of finishing ran: gemv alone writing C, and gemv + reduce over k-splits
    assert (True, 1) in seen and any(not direct and n == 2 for direct, n in seen), seen


def test_mm_vector_kernel_direct_write_for_stacked_experts():
    # gemv writing C itself (one k-slot) for every expert at once and for one, next to the
    # k-split + reduce path of the same shapes
    size_k, size_n, experts = 1024, 128, 3     # 64 kt rows: room for a k-split
    rng = np.random.default_rng(950)
    p = random_problem(rng, size_k, size_n, 64, experts=experts)
    w = ferrum.load_stacked(p.qweights, p.scales, group_size=64, backend="metal")
    for target in (1, 4096):
        with planner(target_workgroups=target):
            for m in (1, 5, 16):
                a = rng.standard_normal((m, size_k)).astype(np.float16)
                check_mm(w, a, np.concatenate(p.dense, axis=1))
                assert ("direct" in last_plan(w).summary) == (target == 1)
                check_mm(w, a, p.dense[2], expert=2)


def test_bench_batches_are_bounded_command_buffers():
    # the bench's timed batches are cut into command buffers of at most BATCH_UNITS units (wgpu
    # reuses encoders, and one that held thousands of passes slowed every later submission)
    from ferrum.metal import backend as MB
    counts = []
    with BACKEND._lock:
        buffers = BACKEND._batch(lambda enc, count: counts.append(count), 2 * MB.BATCH_UNITS + 3)
        BACKEND._run_and_wait(buffers)
    assert len(buffers) == 3 and counts == [MB.BATCH_UNITS, MB.BATCH_UNITS, 3]


def test_mm_without_subgroups_matches_reference():
    size_k, size_n = 512, 128
    rng = np.random.default_rng(400)
    p = random_problem(rng, size_k, size_n, 128)
    w = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=128, backend="metal")
    with subgroups(False):
        for m in (1, 9):
            check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), p.dense[0])


@pytest.mark.parametrize("group_size,limit_kib,m_values", [
    (-1, 32, (1, 3, 20, 200)),   # four kt pieces; A and the scratch cut into small m-blocks
    (32, 32, (1, 3, 20, 200)),
    (128, 96, (40, 100)),        # two kt pieces under the tiled kernel
])
def test_mm_weight_larger_than_one_binding(group_size, limit_kib, m_values):
    size_k, size_n = 1024, 256       # 128 KiB of packed weight
    rng, p, w = metal_problem(500 + group_size, size_k, size_n, group_size)
    with binding_limit(limit_kib * 1024 + BACKEND.offset_alignment):
        for m in m_values:
            check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), p.dense[0])
            assert len(last_plan(w).dispatches) > 2          # really split


def test_mm_stacked_larger_than_one_binding():
    # Each expert (32 KiB) fits a binding but the stack does not: one piece per expert.
    size_k, size_n, experts = 256, 256, 3
    rng = np.random.default_rng(600)
    p = random_problem(rng, size_k, size_n, 64, experts=experts)
    w = ferrum.load_stacked(p.qweights, p.scales, group_size=64, backend="metal")
    with binding_limit(40 * 1024):
        for m in (2, 70):
            a = rng.standard_normal((m, size_k)).astype(np.float16)
            check_mm(w, a, np.concatenate(p.dense, axis=1))
            check_mm(w, a, p.dense[1], expert=1)


@contextlib.contextmanager
def bindings_recorded():
    """Every storage range bound while inside (the uniform parameters left out): a list of
    byte sizes, so a test can check that no binding exceeds the planner's limit."""
    sizes = []
    original = BACKEND._bind_group

    def recording(pipeline, entries):
        sizes.extend(int(size) for buffer, _, size in entries
                     if not buffer.usage & ferrum.metal.backend.wgpu.BufferUsage.UNIFORM)
        return original(pipeline, entries)
    BACKEND._bind_group = recording
    try:
        yield sizes
    finally:
        del BACKEND._bind_group


def test_mm_serves_what_whole_rows_do_not_fit():
    """A weight wider than 8 k-tile rows of one binding, and a stack whose partial sums at two
    rows exceed one, were refused; both run now, in windows of the weight and column blocks of
    the output, with every binding within the limit."""
    rng = np.random.default_rng(650)
    p = random_problem(rng, 256, 256, 128)
    wide = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=128,
                                         backend="metal")
    limit = 8 * 1024 + BACKEND.offset_alignment
    with binding_limit(limit), bindings_recorded() as sizes:
        for m in (2, 24):
            check_mm(wide, rng.standard_normal((m, 256)).astype(np.float16), p.dense[0])
            assert " p" in last_plan(wide).summary, last_plan(wide).summary   # in pieces
    assert sizes and max(sizes) <= limit, max(sizes)
    experts = 80                     # 80 x 64 output columns: 40 KiB of fp32 partials at 2 rows
    q = random_problem(rng, 128, 64, -1, experts=experts)
    stack = ferrum.load_stacked(q.qweights, q.scales, group_size=-1, backend="metal")
    a = rng.standard_normal((4, 128)).astype(np.float16)
    with binding_limit(32 * 1024), bindings_recorded() as sizes:
        check_mm(stack, a, np.concatenate(q.dense, axis=1))
        check_mm(stack, a, q.dense[3], expert=3)
    assert sizes and max(sizes) <= 32 * 1024, max(sizes)
    check_mm(stack, a, np.concatenate(q.dense, axis=1))


#: The documented minimum of FERRUM_METAL_BINDING_LIMIT.
SMALLEST_LIMIT = 1024


@pytest.mark.parametrize("size_k,size_n,act_order", [(128, 64, False), (384, 192, True),
                                                      (256, 256, False)])
def test_repack_at_the_smallest_binding_limit(size_k, size_n, act_order):
    # Not even 64 columns of all K rows fit: the source is cut along K too (act-order's perm
    # applied on the host), bit for bit the reference.
    rng = np.random.default_rng(size_k + 3 * size_n)
    qweight = rng.integers(0, 2**32, (size_k // 8, size_n), dtype=np.uint32).view(np.int32)
    perm = rng.permutation(size_k).astype(np.int32) if act_order else None
    before = qweight.copy()
    with binding_limit(SMALLEST_LIMIT), bindings_recorded() as sizes:
        got = ferrum.repack(qweight, size_k, size_n, perm=perm, backend="metal")
    np.testing.assert_array_equal(got, F.repack_reference(qweight, size_k, size_n, perm))
    np.testing.assert_array_equal(qweight, before)
    assert sizes and max(sizes) <= SMALLEST_LIMIT, max(sizes)


def test_mm_m_blocks_within_the_dispatch_grid(monkeypatch):
    # gemv's workgroups along x are 64-column chunks x m-tiles of 8 rows; where they would pass
    # the grid's 65535 (a layer of 2.1M-4.2M columns at 9-16 rows), the rows are cut into
    # m-blocks instead of refusing the call. The tiled kernel has its m-tiles along y, with the
    # k-splits, which the planner caps. With the grid posed at 500 and 300 chunks: M = 16 ->
    # m-blocks of 8 rows; M = 200 (2 m-tiles of 128 rows) runs in one m-block.
    import ferrum.metal.backend as metal_backend
    size_k, size_n = 128, 300 * 64
    rng, p, w = metal_problem(17, size_k, size_n, 128)
    monkeypatch.setattr(metal_backend, "MAX_GRID", 500)
    for m, kernel, blocks in ((16, "gemv", True), (200, "tiled", False)):
        check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), p.dense[0])
        plan = last_plan(w)
        assert plan.summary.startswith(kernel), plan.summary
        assert bool(re.search(r" b\d+$", plan.summary)) == blocks, plan.summary
        assert max(max(d.grid) for d in plan.dispatches) <= 500, [d.grid for d in plan.dispatches]


@pytest.mark.parametrize("group_size,act_order", [(-1, False), (64, True)])
def test_mm_more_chunks_than_the_dispatch_grid(monkeypatch, group_size, act_order):
    # A layer of more 64-column chunks than a dispatch holds along one dimension (65535: about
    # 4.2M columns) runs in column blocks; experts past it are dispatched in groups along z;
    # k-splits are capped by it; and the reduction's grid (512 columns a workgroup) stays
    # within it. With the grid posed at 4: 10 chunks of one weight, and a stack of 12 experts of
    # 3 chunks each (2 304 columns, past the reduction's 2 048 at once). Every dispatch of every
    # plan within the grid, every result against float64.
    import ferrum.metal.backend as metal_backend
    grid = 4
    monkeypatch.setattr(metal_backend, "MAX_GRID", grid)
    size_k = 512
    rng, p, w = metal_problem(40 + group_size, size_k, 10 * 64, group_size, act_order=act_order)
    stack = random_problem(rng, size_k, 3 * 64, group_size, experts=12)
    ws = ferrum.load_stacked(stack.qweights, stack.scales, group_size=group_size,
                             backend="metal")
    for m in (1, 3, 16, 40):
        a = rng.standard_normal((m, size_k)).astype(np.float16)
        check_mm(w, a, p.dense[0])
        plan = last_plan(w)
        assert " n" in plan.summary, plan.summary          # cut into column blocks
        assert max(max(d.grid) for d in plan.dispatches) <= grid, [d.grid for d in plan.dispatches]
        check_mm(ws, a, np.concatenate(stack.dense, axis=1))
        check_mm(ws, a, stack.dense[11], expert=11)
        for plan in ws._aux["metal_plans"].values():
            assert max(max(d.grid) for d in plan.dispatches) <= grid, \
                (plan.summary, [d.grid for d in plan.dispatches])


@pytest.mark.parametrize("size_k,group_size,act_order", [(256, -1, False), (256, 32, True),
                                                         (384, 64, False), (256, 128, True),
                                                         (384, 384, False)])
def test_mm_at_the_smallest_binding_limit(size_k, group_size, act_order):
    # One k-tile row of one 64-column chunk a binding: weight windows, A cut along k, C in
    # column blocks and the k-pieces added into the same scratch slots.
    size_n = 192
    rng = np.random.default_rng(size_k + group_size + act_order)
    p = random_problem(rng, size_k, size_n, group_size, act_order=act_order)
    with binding_limit(SMALLEST_LIMIT), bindings_recorded() as sizes:
        w = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=group_size,
                                          g_idx=p.g_idx, backend="metal")
        for m in (1, 5, 21):
            check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), p.dense[0])
            assert " acc" in last_plan(w).summary, last_plan(w).summary
    assert sizes and max(sizes) <= SMALLEST_LIMIT, max(sizes)


@pytest.mark.parametrize("size_k,size_n,group_size,usable,m,kernel", [
    (128, 1024, 64, 8192, 32, "tiled m32 k1 bk16"),   # one kt row a piece: BK = 16's steps
    (512, 256, 128, 16000, 30, "tiled m32 k1 bk32"),  # pieces of even kt rows
])
def test_mm_windows_under_the_tiled_kernel(size_k, size_n, group_size, usable, m, kernel):
    rng, p, w = metal_problem(900 + m, size_k, size_n, group_size)
    limit = usable + BACKEND.offset_alignment + 16     # usable bytes once a range is aligned
    with binding_limit(limit), bindings_recorded() as sizes:
        check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), p.dense[0])
        summary = last_plan(w).summary
    assert summary.startswith(kernel) and " acc" in summary, summary
    assert max(sizes) <= limit, max(sizes)


def test_stacked_at_the_smallest_binding_limit():
    size_k, size_n, experts = 256, 128, 3
    rng = np.random.default_rng(660)
    p = random_problem(rng, size_k, size_n, 64, experts=experts)
    w = ferrum.load_stacked(p.qweights, p.scales, group_size=64, backend="metal")
    with binding_limit(SMALLEST_LIMIT), bindings_recorded() as sizes:
        for m in (1, 18):
            a = rng.standard_normal((m, size_k)).astype(np.float16)
            check_mm(w, a, np.concatenate(p.dense, axis=1))
            check_mm(w, a, p.dense[2], expert=2)
    assert sizes and max(sizes) <= SMALLEST_LIMIT, max(sizes)


def test_the_smallest_binding_limit_from_the_environment_serves_a_weight():
    # FERRUM_METAL_BINDING_LIMIT=1024 (its documented minimum) leaves metal available, and
    # repack and mm serve a weight there; 1023 is refused with the variable named.
    import os
    code = ("import numpy as np, ferrum\n"
            "from ferrum.check import random_problem\n"
            "rng = np.random.default_rng(1)\n"
            "p = random_problem(rng, 256, 128, 128, act_order=True)\n"
            "w = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=128, "
            "g_idx=p.g_idx, backend='metal')\n"
            "a = rng.standard_normal((3, 256)).astype(np.float16)\n"
            "ref = a.astype(np.float64) @ p.dense[0]\n"
            "err = np.linalg.norm(ferrum.mm(a, w) - ref) / np.linalg.norm(ref)\n"
            "print('limit', ferrum.metal.BACKEND.binding_limit, 'err', err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "FERRUM_METAL_BINDING_LIMIT": "1024"}, timeout=300)
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[1] == "1024" and float(words[3]) < TOLERANCE, done.stdout
    said = _metal_info_with({"FERRUM_METAL_BINDING_LIMIT": "1023"})
    assert said.startswith("REASON ") and "FERRUM_METAL_BINDING_LIMIT='1023'" in said, said


def test_mm_returns_new_array_without_out_and_weight_moves_from_cpu():
    size_k, size_n = 256, 64
    rng = np.random.default_rng(700)
    p = random_problem(rng, size_k, size_n, 128)
    on_cpu = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=128,
                                           backend="cpu")
    w = on_cpu.to("metal")
    assert w.backend == "metal" and isinstance(w.qweight, ferrum.metal.MetalArray)
    np.testing.assert_array_equal(BACKEND.to_host(w.qweight), on_cpu.qweight)
    np.testing.assert_array_equal(BACKEND.to_host(w.scales), on_cpu.scales)
    a = rng.standard_normal((4, size_k)).astype(np.float16)
    got = ferrum.mm(a, w)
    assert got.dtype == np.float16 and got.shape == (4, size_n)
    assert rel_error(got, a.astype(np.float64) @ p.dense[0]) < TOLERANCE
    again = ferrum.mm(a, w)          # cached plan, reused buffers: same answer
    np.testing.assert_array_equal(got, again)


def test_mm_call_paths_agree_bit_for_bit():
    # mm's per-call path through wgpu-native's C API (when its self-test passed) and through
    # wgpu-py's public API run the same plan: the results must be identical, also for a
    # non-contiguous out and for M-blocks past the first call's workspace size.
    size_k, size_n = 256, 128
    rng = np.random.default_rng(800)
    p = random_problem(rng, size_k, size_n, 64)
    w = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=64, backend="metal")
    saved, saved_upload = BACKEND._native, BACKEND.mapped_upload
    try:
        for m in (1, 5, 40):
            a = rng.standard_normal((m, size_k)).astype(np.float16)
            got = {}
            # the C-API path with A through the mapped upload buffer and through write_buffer
            for name, native, mapped in (("native", saved, True), ("native write", saved, False),
                                         ("wgpu-py", None, True)):
                BACKEND._native, BACKEND.mapped_upload = native, mapped
                check_mm(w, a, p.dense[0])
                wide = poisoned(m, 2 * size_n)
                ferrum.mm(a, w, out=wide[:, ::2])
                assert not np.isnan(wide[:, ::2]).any() and np.isnan(wide[:, 1::2]).all()
                got[name] = ferrum.mm(a, w)
                np.testing.assert_array_equal(got[name], wide[:, ::2])
            np.testing.assert_array_equal(got["native"], got["wgpu-py"])
            np.testing.assert_array_equal(got["native"], got["native write"])
    finally:
        BACKEND._native, BACKEND.mapped_upload = saved, saved_upload


def test_stream_bandwidth_reports_every_rate():
    rates = BACKEND.stream_bandwidth(1 << 20, min_seconds=0.01)
    assert rates["bytes"] == 1 << 20
    for kind in ("buffer copy", "shader copy", "shader read"):
        assert rates[kind] > 0


@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_mm_tiled_kernel_every_tile_and_step(group_size):
    # tiled.wgsl for M > 16: TM = 2, 4 or 8 rows per invocation (tiles of 32, 64, 128 rows), BK =
    # 16 or 32 k per step, M on both sides of the tile edges (rows past M are read as zero and
    # never written), one k-split (the kernel writes C) and several (scratch + reduce).
    size_k, size_n = 512, 128
    rng, p, w = metal_problem(1000 + group_size, size_k, size_n, group_size)
    seen = set()
    for tm, bk in ((2, 32), (4, 16), (4, 32), (8, 16), (8, 32)):
        for target in (1, 1024):
            with planner(tiled_tm=tm, tiled_bk=bk, target_workgroups=target):
                for m in (17, 33, 63, 65, 130):
                    check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), p.dense[0])
                    plan = last_plan(w)
                    assert plan.summary.startswith(f"tiled m{16 * tm} "), plan.summary
                    seen.add(("direct" in plan.summary, plan.summary.split()[-1]))
    # both finishes ran, and each k step (BK 32 may be cut to 16 where memory is short)
    assert {d for d, _ in seen} == {True, False}, seen
    assert "bk16" in {s for _, s in seen}, seen


def test_mm_tiled_default_plan_every_m_block():
    # the planner's own tile choice across the M classes (32-, 64- and 128-row tiles), with the
    # large-M path cut into m-blocks by a small binding limit
    size_k, size_n = 256, 192
    rng = np.random.default_rng(1100)
    p = random_problem(rng, size_k, size_n, 64)
    w = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=64, backend="metal")
    tiles = set()
    for m in (17, 32, 40, 64, 65, 300):
        check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), p.dense[0])
        tiles.add(last_plan(w).summary.split()[1])
    assert tiles == {"m32", "m64", "m128"}, tiles
    with binding_limit(64 * 1024 + BACKEND.offset_alignment):
        check_mm(w, rng.standard_normal((300, size_k)).astype(np.float16), p.dense[0])
        assert " b" in last_plan(w).summary, last_plan(w).summary



def test_mm_tiled_kernel_k_loop_written_out():
    # the multiply stage with every k of a step written out by the host (tiled_unroll)
    size_k, size_n = 512, 128
    rng = np.random.default_rng(1400)
    p = random_problem(rng, size_k, size_n, 64)
    w = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=64, backend="metal")
    for unroll in (True, False):
        for tm, bk in ((2, 32), (4, 16), (8, 16)):
            with planner(tiled_unroll=unroll, tiled_tm=tm, tiled_bk=bk):
                for m in (17, 70):
                    check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), p.dense[0])


def test_mm_vector_kernel_wide_workgroups_at_m1():
    # M = 1 where the chunks number between GEMV_WIDE_SHARE of the workgroup target: 32 k-slots a
    # workgroup, no k-split, gemv writing C; outside the range (or turned off) the usual plan
    from ferrum.metal import backend as MB
    size_k, size_n = 1024, 256      # 4 chunks
    rng = np.random.default_rng(1500)
    p = random_problem(rng, size_k, size_n, 128)
    w = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=128, backend="metal")
    a = rng.standard_normal((1, size_k)).astype(np.float16)
    target = int(4 / MB.GEMV_WIDE_SHARE[1])        # 4 chunks: the top of the range
    for knobs, wide in ((dict(target_workgroups=target), True),
                        (dict(target_workgroups=target, gemv_wide=False), False),
                        (dict(target_workgroups=4 * target), False)):
        with planner(**knobs):
            check_mm(w, a, p.dense[0])
            summary = last_plan(w).summary
            assert ("s32" in summary and "direct" in summary) == wide, summary


@pytest.mark.parametrize("group_size", [-1, 128])
def test_mm_large_activations_on_zero_weights_at_one_and_two_rows(group_size):
    # A large activation (6e4, finite fp16) whose weight row is zero (q == 8) contributes nothing
    # to C, so C is the sum of the ordinary terms and must keep their precision. gemv's 72 x sum(a)
    # bias (M <= 2) computed sum(a (64 + q)) - 72 sum(a) at the magnitude of 72 x 6e4, which
    # rounded away the ordinary terms sharing a quad with it (relative error 1e-2).
    size_k, size_n = 1024, 128
    rng = np.random.default_rng(1600 + group_size)
    q = rng.integers(0, 16, (size_k, size_n), dtype=np.uint32)
    big = np.arange(0, size_k, 16)          # one row of each quad of lanes t % 4 == 0
    q[big] = 8
    groups = F.num_groups(size_k, group_size)
    scales = (rng.uniform(0.5, 1.5, (groups, size_n)) * rng.choice([-1, 1], (groups, size_n))
              / (4.0 * np.sqrt(size_k))).astype(np.float16)
    dense = F.dequantize_reference(q, scales, size_k, group_size, None)
    w = ferrum.MarlinWeight.from_gptq(F.pack_gptq(q), scales, group_size=group_size,
                                      backend="metal")
    for knobs in (dict(target_workgroups=1), dict(target_workgroups=4096)):
        with planner(**knobs):
            for m in (1, 2, 3):
                a = rng.standard_normal((m, size_k)).astype(np.float16)
                a[:, big] = 6e4
                check_mm(w, a, dense)
                assert "sums" not in last_plan(w).summary


def test_mm_column_sums_only_for_rows_that_fit():
    # gemv's column sums (M <= 2) round at the size of 72 |a|: mm takes them only when every row
    # is finite and no |a| exceeds COLUMN_SUM_SPAN times the median of the row's nonzero |a|. Up
    # to that bound, on zero weights (the worst case: the large values add nothing), they stay
    # as accurate as the prescaled way; past it in either row, mm prescales the call.
    from ferrum.metal import backend as MB
    size_k, size_n = 512, 128
    rng = np.random.default_rng(1700)
    q = rng.integers(0, 16, (size_k, size_n), dtype=np.uint32)
    big = np.array([3, 130, 257, 511])      # zero weights (q = 8) under the large values
    q[big] = 8
    scales = (rng.uniform(0.5, 1.5, (size_k // 128, size_n)) / (4.0 * np.sqrt(size_k))
              ).astype(np.float16)
    dense = F.dequantize_reference(q, scales, size_k, 128, None)
    w = ferrum.MarlinWeight.from_gptq(F.pack_gptq(q), scales, group_size=128, backend="metal")
    bound = MB.COLUMN_SUM_SPAN

    def row(ratio):
        # N(0, 1) values and, on the big rows, `ratio` times the median of the row's |a|
        a = rng.standard_normal(size_k).astype(np.float16)
        a[big] = 0
        a[big] = ratio * np.median(np.abs(a[a != 0].astype(np.float32)))
        return a

    for m in (1, 2):
        plain = rng.standard_normal((m, size_k)).astype(np.float16)
        check_mm(w, plain, dense)
        assert "sums" in last_plan(w).summary
    assert MB._column_sums_fit(np.zeros((2, size_k), np.float16))
    for value in (np.inf, -np.inf, np.nan):
        assert not MB._column_sums_fit(np.array([[0.0, 1.0, value]], np.float16))
    at_bound = np.stack([row(0.99 * bound), row(0.5 * bound)])
    past = np.stack([row(0.5 * bound), row(1.5 * bound)])
    for a, fits in ((at_bound, True), (past, False)):
        mag = np.abs(a.astype(np.float32))
        assert ((mag.max(1) / np.median(mag, axis=1)) <= bound).all() == fits
    for a, sums in ((at_bound[:1], True), (at_bound, True), (past[1:], False), (past, False)):
        got = ferrum.mm(a, w).astype(np.float64)
        assert ("sums" in last_plan(w).summary) == sums, (a.shape, sums)
        ref = a.astype(np.float64) @ dense
        # as accurate as cpu's fp32 dot products (both round C to fp16 last)
        cpu = ferrum.mm(a, w.to("cpu")).astype(np.float64)
        assert rel_error(got, ref) <= 1.5 * rel_error(cpu, ref) + 1e-6, (a.shape, sums)


def test_buffers_stay_within_the_adapters_largest_buffer():
    # Workspaces grow by doubling and staging buffers come in powers of two: neither may pass
    # the adapter's maxBufferSize (lavapipe's is 2^31 - 1, so a 2 GiB staging class is one byte
    # too many). A call or a repack needing a buffer larger than it is refused with a ValueError
    # before any GPU work, as from_host refuses such an array.
    size_k, size_n = 512, 64
    rng, p, w = metal_problem(1700, size_k, size_n, -1)
    cap = 100_000
    BACKEND.trim()
    try:
        with _overridden("max_buffer_size", cap):
            for m in (60, 90):      # A: 61440 bytes, then 92160 (doubling would make 122880)
                check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), p.dense[0])
                sizes = [b.size for b in BACKEND._work.values()]
                sizes += [s.size for s in BACKEND._stagings.values()]
                assert max(sizes) <= cap, sizes
            out = poisoned(120, size_n)     # A would take 122880 bytes
            with pytest.raises(ValueError, match="largest buffer"):
                ferrum.mm(rng.standard_normal((120, size_k)).astype(np.float16), w, out=out)
            assert np.isnan(out).all()
            qweight = rng.integers(0, 2**32, (1024 // 8, 512), dtype=np.uint32)
            # 256 KiB of Marlin words; the source goes in column blocks of 64 KiB
            with binding_limit(64 * 1024 + BACKEND.offset_alignment + 16), \
                    pytest.raises(ValueError, match="largest buffer"):
                ferrum.repack(qweight, 1024, 512, backend="metal")
    finally:
        BACKEND.trim()


def test_metal_arrays_are_taken_by_shape_and_dtype_not_as_objects():
    # A MetalArray (the backend's resident array) has a shape and a dtype; the API read it as a
    # 0-d object array: mm(MetalArray a) said "dtype must be float16, got object" of a float16
    # array, out=MetalArray the same, and a cpu weight given one was told the wrong rule. mm takes
    # one as `a` on a metal weight (the backend reads it back), and names the real rule otherwise.
    rng, p, w = metal_problem(1800, 256, 128, 64)
    a = rng.standard_normal((3, 256)).astype(np.float16)
    resident = BACKEND.from_host(a)
    np.testing.assert_array_equal(ferrum.mm(resident, w), ferrum.mm(a, w))
    out = poisoned(3, 128)
    assert ferrum.mm(resident, w, out=out) is out and not np.isnan(out).any()
    with pytest.raises(ValueError, match=r"a=<MetalArray shape=\(3, 128\).*size_k=256"):
        ferrum.mm(BACKEND.from_host(a[:, :128].copy()), w)
    with pytest.raises(TypeError, match=r"a=<MetalArray .*float32>: dtype must be float16"):
        ferrum.mm(BACKEND.from_host(a.astype(np.float32)), w)
    with pytest.raises(TypeError, match=r"out=<MetalArray .*must be a numpy array"):
        ferrum.mm(a, w, out=BACKEND.from_host(np.zeros((3, 128), np.float16)))
    with pytest.raises(TypeError, match=r"a=<MetalArray .*the weight lives on 'cpu'"):
        ferrum.mm(resident, w.to("cpu"))
    with pytest.raises(TypeError, match=r"out=<MetalArray .*is a metal array but the weight "
                                        r"lives on 'cpu'; out must be a numpy array$"):
        ferrum.mm(a, w.to("cpu"), out=BACKEND.from_host(np.zeros((3, 128), np.float16)))
    # a resident GPTQ qweight repacks on metal (a resident result) and is refused by cpu
    qweight = BACKEND.from_host(p.qweights[0])
    got = ferrum.repack(qweight, 256, 128, backend="metal")
    assert isinstance(got, ferrum.metal.MetalArray)
    np.testing.assert_array_equal(BACKEND.to_host(got), F.repack_reference(p.qweights[0], 256, 128))
    with pytest.raises(TypeError, match=r"qweight=<MetalArray .*backend='cpu'"):
        ferrum.repack(qweight, 256, 128, backend="cpu")


def test_load_stacked_refuses_a_resident_stack_by_name():
    # load_stacked takes host arrays; a 3-D MetalArray was indexed per expert and failed with
    # "'MetalArray' object is not subscriptable", naming no argument.
    p = random_problem(np.random.default_rng(1950), 256, 128, 128, experts=2)
    qweights, scales = np.stack(p.qweights), np.stack(p.scales)
    with pytest.raises(TypeError, match=r"^qweights=<MetalArray shape=\(2, 32, 128\).*host"):
        ferrum.load_stacked(BACKEND.from_host(qweights), scales, group_size=128)
    with pytest.raises(TypeError, match=r"^scales=<MetalArray shape=\(2, 2, 128\).*host"):
        ferrum.load_stacked(qweights, BACKEND.from_host(scales), group_size=128)


def test_a_weight_is_made_from_resident_metal_arrays():
    # MarlinWeight(qweight, scales) uses arrays its backend owns as they are; with a MetalArray
    # for scales the constructor ran its host finiteness check on it and failed inside numpy
    # ("ufunc 'isfinite' not supported"), naming no argument.
    rng, p, w = metal_problem(1900, 256, 128, 64)
    qweight = ferrum.repack(BACKEND.from_host(p.qweights[0]), 256, 128)
    scales = BACKEND.from_host(ferrum.permute_scales(p.scales[0], 256, 128, 64))
    made = ferrum.MarlinWeight(qweight, scales, size_k=256, size_n=128, group_size=64)
    assert made.backend == "metal" and made.qweight is qweight and made.scales is scales
    a = rng.standard_normal((3, 256)).astype(np.float16)
    np.testing.assert_array_equal(ferrum.mm(a, made), ferrum.mm(a, w))
    np.testing.assert_array_equal(ferrum.dequantize(made), ferrum.dequantize(w))


@pytest.mark.parametrize("m", [1, 2])
def test_mm_sparse_rows_with_large_values_on_zero_weights(m):
    # gemv's column sums (M <= 2) round at the size of 72 |a|. The bound on |a| was 64 times the
    # median of a row's NONZERO |a|, which assumes many ordinary terms to outweigh that rounding:
    # a sparse row (ReLU-like activations: a few values, most of the row zero) whose large values
    # sit on zero weights passed it (two 3e4 values make their own median) and lost the few
    # ordinary terms' precision (relative error 9e-2 against float64; cpu 2e-4).
    size_k, size_n = 512, 128
    rng = np.random.default_rng(1900 + m)
    q = rng.integers(0, 16, (size_k, size_n), dtype=np.uint32)
    big = np.arange(0, size_k, 16)
    q[big] = 8                              # zero weights under the large values
    scales = (rng.uniform(0.5, 1.5, (size_k // 128, size_n)) / (4.0 * np.sqrt(size_k))
              ).astype(np.float16)
    dense = F.dequantize_reference(q, scales, size_k, 128, None)
    w = ferrum.MarlinWeight.from_gptq(F.pack_gptq(q), scales, group_size=128, backend="metal")
    for trial in range(6):
        a = np.zeros((m, size_k), np.float16)
        for row in range(m):
            at = rng.choice(big, 2 + trial % 2, replace=False)
            a[row, at] = rng.uniform(2e4, 6e4, at.size)
            # ordinary values in the large values' quads (k rows r0 + 1, r0 + 8, r0 + 9)
            a[row, at[:1 + trial // 2] + (1, 8, 9)[trial % 3]] = rng.standard_normal()
        check_mm(w, a, dense)
    # dense rows still take the column sums
    check_mm(w, rng.standard_normal((m, size_k)).astype(np.float16), dense)
    assert "sums" in last_plan(w).summary


@pytest.mark.parametrize("m", [1, 2])
def test_mm_rows_mostly_of_large_values_on_zero_weights(m):
    # gemv's column sums (M <= 2) were taken for rows whose largest |a| is within 64 times the
    # median |a|. When half the row or more is large, the median is one of the large values: a
    # row of 6e4 on every zero weight row (q = 8) and N(0, 1) elsewhere passed, and the large
    # values rounded the ordinary terms away (relative error 5e-2 to 2e-1 against float64; cpu
    # 2e-4).
    size_k, size_n = 512, 128
    rng = np.random.default_rng(2100 + m)
    for ordinary_every in (2, 3, 4, 8):     # one k row in 2, 3, 4 or 8 is ordinary
        q = rng.integers(0, 16, (size_k, size_n), dtype=np.uint32)
        large = np.arange(size_k) % ordinary_every != 0
        q[large] = 8                        # zero weights under the large values
        scales = (rng.uniform(0.5, 1.5, (size_k // 128, size_n)) / (4.0 * np.sqrt(size_k))
                  ).astype(np.float16)
        dense = F.dequantize_reference(q, scales, size_k, 128, None)
        w = ferrum.MarlinWeight.from_gptq(F.pack_gptq(q), scales, group_size=128,
                                          backend="metal")
        for target in (1, 4096):
            with planner(target_workgroups=target):
                a = rng.standard_normal((m, size_k)).astype(np.float16)
                a[:, large] = 6e4
                check_mm(w, a, dense)


def test_a_weight_larger_than_the_largest_buffer_is_refused_naming_it():
    # from_gptq names the repack's K and N; load_stacked (the stacked Marlin qweight), .to("metal")
    # and MarlinWeight(...) said only "array of 262144 bytes exceeds this adapter's largest
    # buffer", without saying which argument.
    rng = np.random.default_rng(2000)
    p = random_problem(rng, 1024, 256, 128, experts=2)
    on_cpu = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=128)
    with _overridden("max_buffer_size", 100_000):
        with pytest.raises(ValueError, match=r"^qweight=<ndarray shape=\(2, 64, 512\).*262144 bytes"
                                             r".*largest buffer"):
            ferrum.load_stacked(p.qweights, p.scales, group_size=128, backend="metal")
        with pytest.raises(ValueError, match=r"^weight=MarlinWeight\(.*qweight.*131072 bytes"
                                             r".*largest buffer"):
            on_cpu.to("metal")
        with pytest.raises(ValueError, match=r"^qweight=.*131072 bytes.*largest buffer"):
            ferrum.MarlinWeight(on_cpu.qweight, on_cpu.scales, size_k=1024, size_n=256,
                                group_size=128, backend="metal")


_FORKED = {}     # what a forked child finds in its copy of the parent's memory


def _metal_mm_in_child(a):
    try:
        return ferrum.mm(a, _FORKED["weight"])
    except RuntimeError as exc:
        return str(exc)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork() on this platform")
def test_a_forked_child_is_told_to_spawn_instead_of_waiting_forever():
    # wgpu's device does not survive fork(): a child's first call on a weight it inherited used
    # to wait forever (and a pool with it). It now raises, naming the way out, and
    # backends() says so in the child; the parent goes on working.
    import multiprocessing
    rng, p, w = metal_problem(77, 256, 128, 64)
    a = rng.standard_normal((3, 256)).astype(np.float16)
    want = ferrum.mm(a, w)
    _FORKED["weight"] = w
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            said = pool.apply_async(_metal_mm_in_child, (a,)).get(timeout=60)
            reason = pool.apply_async(_metal_reason).get(timeout=60)
    finally:
        _FORKED.clear()
    assert isinstance(said, str) and "fork" in said and "spawn" in said, said
    assert "fork" in reason, reason
    assert np.array_equal(ferrum.mm(a, w), want)


def _metal_reason():
    return ferrum.backends()["metal"].reason
