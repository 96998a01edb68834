"""mm, dequantize and quantize on the cpu backend, against float64 references."""

import numpy as np
import pytest

import ferrum
from ferrum import format as F
from ferrum.check import random_problem, rel_error
from ferrum.cpu import BACKEND as CPU

TOL = 1e-3


def poisoned(shape):
    return np.full(shape, np.nan, dtype=np.float16)


def make_weight(prob, backend="cpu"):
    if prob.num_experts > 1:
        return ferrum.load_stacked(prob.qweights, prob.scales, group_size=prob.group_size,
                                   g_idx=prob.g_idx, backend=backend)
    return ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0],
                                         group_size=prob.group_size, g_idx=prob.g_idx,
                                         backend=backend)


@pytest.mark.parametrize("k,n", [(128, 64), (256, 192), (512, 128), (1152, 320)])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128, "K"])
@pytest.mark.parametrize("path", ["fused", "blas"])
def test_mm_matches_float64_reference(rng, k, n, group_size, path):
    g = k if group_size == "K" else group_size
    prob = random_problem(rng, k, n, g)
    weight = make_weight(prob)
    for m in (1, 3, 16, 67):
        a = rng.standard_normal((m, k)).astype(np.float16)
        ref = a.astype(np.float64) @ prob.dense[0]
        out = poisoned((m, n))
        got = CPU.mm(a, weight, 0, out, path=path)
        assert got is out
        assert np.isfinite(out).all(), "an output element was not written"
        assert rel_error(out, ref) <= TOL


@pytest.mark.parametrize("m", [1, 2, 5, 33, 300])
def test_public_mm_any_m(rng, m):
    prob = random_problem(rng, 384, 128, 128)
    weight = make_weight(prob)
    a = rng.standard_normal((m, 384)).astype(np.float16)
    c = ferrum.mm(a, weight)
    assert c.dtype == np.float16 and c.shape == (m, 128)
    assert rel_error(c, a.astype(np.float64) @ prob.dense[0]) <= TOL


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_act_order_equals_plain_path_on_permuted_problem(rng, group_size):
    k, n = 512, 192
    prob = random_problem(rng, k, n, group_size, act_order=True)
    weight = make_weight(prob)
    assert group_size == -1 or weight.perm is not None
    perm = F.act_order_perm(prob.g_idx)
    # The same layer with rows physically sorted by group is an ordinary grouped layer.
    q = F.unpack_gptq(prob.qweights[0], k)[perm]
    plain = ferrum.MarlinWeight.from_gptq(F.pack_gptq(q), prob.scales[0], group_size=group_size)
    for m in (1, 9, 40):
        a = rng.standard_normal((m, k)).astype(np.float16)
        c_act = ferrum.mm(a, weight)
        c_plain = ferrum.mm(np.ascontiguousarray(a[:, perm]), plain)
        assert np.array_equal(c_act, c_plain)
        assert rel_error(c_act, a.astype(np.float64) @ prob.dense[0]) <= TOL


def test_stacked_equals_per_expert(rng):
    prob = random_problem(rng, 256, 128, 64, experts=4)
    stacked = make_weight(prob)
    assert stacked.num_experts == 4 and stacked.qweight.shape == (4, 16, 256)
    for m in (1, 20):
        a = rng.standard_normal((m, 256)).astype(np.float16)
        whole = ferrum.mm(a, stacked)
        assert whole.shape == (m, 4 * 128)
        for e in range(4):
            single = ferrum.MarlinWeight.from_gptq(prob.qweights[e], prob.scales[e], group_size=64)
            one = ferrum.mm(a, single)
            assert np.array_equal(ferrum.mm(a, stacked, expert=e), one)
            assert np.array_equal(whole[:, e * 128:(e + 1) * 128], one)
            assert rel_error(one, a.astype(np.float64) @ prob.dense[e]) <= TOL


@pytest.mark.parametrize("group_size", [32, 128])
def test_stacked_act_order_experts_each_in_their_own_order(rng, group_size):
    # vLLM's MoE Marlin takes act-order experts, each with its own g_idx: each expert's rows
    # repacked in its group order and A permuted per expert. Expert by expert and all at once
    # equal the single act-order layers, and float64; dequantize undoes each expert's order.
    k, n, experts = 256, 128, 3
    prob = random_problem(rng, k, n, group_size, act_order=True, experts=experts)
    stacked = make_weight(prob)
    assert stacked.perm.shape == (experts, k)
    for e in range(experts):
        assert np.array_equal(stacked.perm[e], F.act_order_perm(prob.g_idx[e]))
        assert np.array_equal(ferrum.dequantize(stacked, expert=e), prob.dense[e].astype(np.float32))
    singles = [ferrum.MarlinWeight.from_gptq(prob.qweights[e], prob.scales[e],
                                             group_size=group_size, g_idx=prob.g_idx[e])
               for e in range(experts)]
    for m in (1, 20, 70):           # the fused path and BLAS
        a = rng.standard_normal((m, k)).astype(np.float16)
        whole = ferrum.mm(a, stacked, out=poisoned((m, experts * n)))
        assert np.isfinite(whole).all(), "an output element was not written"
        for e in range(experts):
            one = ferrum.mm(a, singles[e])
            assert np.array_equal(ferrum.mm(a, stacked, expert=e), one)
            assert np.array_equal(whole[:, e * n:(e + 1) * n], one)
            assert rel_error(one, a.astype(np.float64) @ prob.dense[e]) <= TOL
    # the same experts from one [E, K] g_idx array, and after pickling
    import pickle
    again = ferrum.load_stacked(np.stack(prob.qweights), np.stack(prob.scales),
                                group_size=group_size, g_idx=np.stack(prob.g_idx))
    copied = pickle.loads(pickle.dumps(stacked))
    a = rng.standard_normal((5, k)).astype(np.float16)
    assert np.array_equal(ferrum.mm(a, again), ferrum.mm(a, stacked))
    assert np.array_equal(ferrum.mm(a, copied), ferrum.mm(a, stacked))


def test_stacked_act_order_with_plain_experts_among_them(rng):
    # None for an expert without act-order (its rows in their own order); all None, or all
    # trivial g_idx, is no act-order at all (weight.perm None)
    k, n = 256, 64
    prob = random_problem(rng, k, n, 64, act_order=True, experts=2)
    plain = random_problem(rng, k, n, 64, experts=1)
    mixed = ferrum.load_stacked([prob.qweights[0], plain.qweights[0]],
                                [prob.scales[0], plain.scales[0]], group_size=64,
                                g_idx=[prob.g_idx[0], None])
    assert np.array_equal(mixed.perm[1], np.arange(k))
    a = rng.standard_normal((9, k)).astype(np.float16)
    ref = a.astype(np.float64) @ np.concatenate([prob.dense[0], plain.dense[0]], axis=1)
    assert rel_error(ferrum.mm(a, mixed), ref) <= TOL
    trivial = np.arange(k) // 64
    for g_idx in ([None, None], [trivial, trivial], np.stack([trivial, trivial])):
        w = ferrum.load_stacked(plain.qweights * 2, plain.scales * 2, group_size=64, g_idx=g_idx)
        assert w.perm is None


def test_load_stacked_accepts_lists_and_3d_arrays(rng):
    prob = random_problem(rng, 128, 64, 32, experts=3)
    from_lists = ferrum.load_stacked(prob.qweights, prob.scales, group_size=32)
    from_arrays = ferrum.load_stacked(np.stack(prob.qweights),
                                      np.stack(prob.scales).astype(np.float32), group_size=32)
    assert np.array_equal(from_lists.qweight, from_arrays.qweight)
    assert np.array_equal(from_lists.scales, from_arrays.scales)
    assert from_arrays.scales.dtype == np.float16


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_gives_the_gptq_weight_in_original_order(rng, act_order):
    prob = random_problem(rng, 256, 128, 32, act_order=act_order)
    weight = make_weight(prob)
    dense = ferrum.dequantize(weight)
    assert dense.dtype == np.float32 and dense.shape == (256, 128)
    assert np.array_equal(dense, prob.dense[0].astype(np.float32))


def test_dequantize_stacked(rng):
    prob = random_problem(rng, 128, 64, 128, experts=2)
    weight = make_weight(prob)
    assert np.array_equal(ferrum.dequantize(weight, expert=1), prob.dense[1].astype(np.float32))
    assert ferrum.dequantize(weight).shape == (128, 128)


@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("magnitude", [1.0, 1e-6])     # 1e-6: float16-subnormal scales
def test_quantize_then_mm_is_within_quantization_error(rng, group_size, magnitude):
    k, n = 512, 256
    w = (rng.standard_normal((k, n)) * magnitude).astype(np.float32)
    qweight, scales = ferrum.quantize(w, group_size=group_size)
    assert qweight.dtype == np.int32 and qweight.shape == (k // 8, n)
    weight = ferrum.MarlinWeight.from_gptq(qweight, scales, group_size=group_size)
    deq = ferrum.dequantize(weight)
    rows = k if group_size == -1 else group_size
    step = np.repeat(scales.astype(np.float64), rows, axis=0)
    # Round to nearest on a grid whose scale was rounded up: every weight within half a step.
    assert (np.abs(deq - w) <= step * (0.5 + 1e-6)).all()
    if magnitude != 1.0:
        return          # products of 1e-6 weights are float16 subnormals: no 1e-3 to hold there
    a = rng.standard_normal((8, k)).astype(np.float16)
    c = ferrum.mm(a, weight).astype(np.float64)
    exact = a.astype(np.float64) @ w
    assert rel_error(c, a.astype(np.float64) @ deq) <= TOL
    assert rel_error(c, exact) < 0.15       # 4-bit RTN on Gaussian weights: ~10% error


def test_mm_leaves_inputs_unmodified(rng):
    prob = random_problem(rng, 256, 64, 64, act_order=True)
    weight = make_weight(prob)
    q0, s0 = weight.qweight.copy(), weight.scales.copy()
    a = rng.standard_normal((5, 256)).astype(np.float16)
    a0 = a.copy()
    ferrum.mm(a, weight)
    assert np.array_equal(a, a0)
    assert np.array_equal(weight.qweight, q0) and np.array_equal(weight.scales, s0)


def test_non_contiguous_activations(rng):
    prob = random_problem(rng, 256, 64, 128)
    weight = make_weight(prob)
    big = rng.standard_normal((6, 512)).astype(np.float16)
    a = big[::2, ::2]
    assert rel_error(ferrum.mm(a, weight), a.astype(np.float64) @ prob.dense[0]) <= TOL


def test_byte_swapped_arrays_are_read_by_value(rng):
    """'>i4' / '>f2' arrays (as np.load gives from a big-endian file) hold int32 and float16
    values: every entry point reads them as such, and a byte-swapped out receives the result."""
    prob = random_problem(rng, 256, 128, 64, act_order=True, experts=1)
    q, s, g = prob.qweights[0], prob.scales[0], prob.g_idx
    swapped = lambda x: x.astype(x.dtype.newbyteorder(">" if x.dtype.byteorder != ">" else "<"))
    perm = F.act_order_perm(g)
    assert np.array_equal(ferrum.repack(swapped(q), 256, 128, perm=swapped(perm)),
                          ferrum.repack(q, 256, 128, perm=perm))
    assert np.array_equal(ferrum.permute_scales(swapped(s), 256, 128, 64),
                          ferrum.permute_scales(s, 256, 128, 64))
    weight = ferrum.MarlinWeight.from_gptq(q, s, group_size=64, g_idx=g)
    other = ferrum.MarlinWeight.from_gptq(swapped(q), swapped(s), group_size=64, g_idx=swapped(g))
    assert np.array_equal(ferrum.dequantize(other), ferrum.dequantize(weight))
    built = ferrum.MarlinWeight(swapped(weight.qweight), swapped(weight.scales), size_k=256,
                                size_n=128, group_size=64, perm=weight.perm)
    assert np.array_equal(ferrum.dequantize(built), ferrum.dequantize(weight))
    stack = ferrum.load_stacked([swapped(q)], swapped(s[None]), group_size=64)
    plain = ferrum.load_stacked([q], s[None], group_size=64)
    assert np.array_equal(ferrum.dequantize(stack), ferrum.dequantize(plain))
    for m in (3, 40):                               # fused and BLAS paths
        a = rng.standard_normal((m, 256)).astype(np.float16)
        want = ferrum.mm(a, weight)
        a_swapped = swapped(a)
        assert np.array_equal(ferrum.mm(a_swapped, weight), want)
        assert np.array_equal(a_swapped, a)         # the caller's array is left as it was
        out = np.full((m, 128), np.nan, np.dtype(">f2"))
        assert ferrum.mm(a, weight, out=out) is out and np.array_equal(out, want)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    for got, want in zip(ferrum.quantize(swapped(w)), ferrum.quantize(w)):
        assert np.array_equal(got, want)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")   # np.matrix
def test_numpy_subclasses_reach_backends_as_plain_arrays(rng, tmp_path, monkeypatch):
    """A memmap or np.matrix a / out is a host array: backends, which tell host arrays from
    device arrays by ``type(x) is np.ndarray`` (cuda), get a plain view of its memory, and the
    caller's out receives the result."""
    prob = random_problem(rng, 256, 64, 128)
    weight = make_weight(prob)
    a = rng.standard_normal((3, 256)).astype(np.float16)
    want = ferrum.mm(a, weight)
    seen = []
    real = CPU.mm

    def spy(a, weight, expert, out, **options):
        seen.append((type(a), type(out)))
        return real(a, weight, expert, out, **options)
    monkeypatch.setattr(CPU, "mm", spy)
    a_map = np.memmap(tmp_path / "a", np.float16, "w+", shape=a.shape)
    a_map[:] = a
    out_map = np.memmap(tmp_path / "c", np.float16, "w+", shape=want.shape)
    out_matrix = np.asmatrix(np.zeros(want.shape, np.float16))
    assert np.array_equal(ferrum.mm(a_map, weight), want)
    assert np.array_equal(ferrum.mm(np.asmatrix(a), weight), want)
    assert ferrum.mm(a, weight, out=out_map) is out_map and np.array_equal(out_map, want)
    assert ferrum.mm(a, weight, out=out_matrix) is out_matrix and np.array_equal(out_matrix, want)
    assert seen and all(ta is np.ndarray and to in (np.ndarray, type(None)) for ta, to in seen)


def test_weight_moves_and_keeps_its_values(rng):
    prob = random_problem(rng, 128, 64, 32)
    weight = make_weight(prob)
    assert weight.to("cpu") is weight
    assert "MarlinWeight(size_k=128" in repr(weight)


@pytest.mark.parametrize("slice_chunks", [1, 2, 3, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("kernel,m", [("mm_fused", 3), ("mm_fused_row", 1)])
def test_fused_kernel_any_slice_width(rng, slice_chunks, group_size, kernel, m):
    # The backend picks the slice width from the thread count; every width, with a remainder
    # slice (5 chunks), must give the same product, written at a column offset.
    from ferrum.cpu import kernels
    k, n = 512, 320
    prob = random_problem(rng, k, n, group_size)
    weight = make_weight(prob)
    marlin, scales = CPU._expert_arrays(weight, 0)
    inv = CPU._scale_inverse(n, weight.num_groups)
    a = rng.standard_normal((m, k)).astype(np.float16)
    out = np.full((m, n + 64), np.nan, np.float32)
    getattr(kernels, kernel)(a.astype(np.float32), marlin.view(np.int32), scales, inv,
                             F.effective_group_size(k, group_size), out, 64, slice_chunks)
    assert np.isnan(out[:, :64]).all(), "wrote outside its columns"
    assert np.isfinite(out[:, 64:]).all(), "an output element was not written"
    assert rel_error(out[:, 64:], a.astype(np.float64) @ prob.dense[0]) <= 1e-5


@pytest.mark.parametrize("path", ["fused", "blas"])
def test_non_finite_activations_propagate_as_in_float64(rng, path):
    # inf times a zero weight (q == 8) is NaN, times any other weight an inf of the product's
    # sign; NaN spreads along its row. The reference must say what IEEE arithmetic says.
    prob = random_problem(rng, 256, 128, 64)
    weight = make_weight(prob)
    a = rng.standard_normal((5, 256)).astype(np.float16)
    a[0, 5], a[1, 7], a[2, 9] = np.inf, -np.inf, np.nan
    a[3, 20], a[3, 200] = np.inf, -np.inf      # inf - inf where the two products' signs differ
    with np.errstate(invalid="ignore"):
        ref = a.astype(np.float64) @ prob.dense[0]
    assert np.isinf(ref).any() and np.isnan(ref[:2]).any()      # the data exercises both cases
    assert np.isnan(ref[3]).any() and np.isinf(ref[3]).any()
    got = CPU.mm(a, weight, 0, poisoned((5, 128)), path=path).astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    assert np.array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])
    assert rel_error(got[4:], ref[4:]) <= TOL
    for r in range(4):      # one row at a time (the fused path's M == 1 kernel)
        one = CPU.mm(a[r:r + 1], weight, 0, None, path=path).astype(np.float64)
        assert np.array_equal(one, got[r:r + 1], equal_nan=True)


def test_cpu_half_conversions_are_exact(rng):
    from ferrum.cpu import _HALF_TABLE, kernels
    halfs = _HALF_TABLE[np.isfinite(_HALF_TABLE)].astype(np.float64)
    h = np.unique(halfs)
    mids = ((h[1:] + h[:-1]) / 2).astype(np.float32)            # ties: round to even
    values = np.concatenate([
        mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
        _HALF_TABLE, np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, 1e9, 2 ** -25,
                               2 ** -26, 3e-8], np.float32),
        rng.standard_normal(100_000).astype(np.float32) * np.float32(1e-5),
        rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
    ]).reshape(1, -1)
    out = np.empty(values.shape, np.uint16)
    kernels.float_to_half(values, values.view(np.uint32), out)
    with np.errstate(over="ignore"):
        ref = values.astype(np.float16)
    nan = np.isnan(values)
    assert np.array_equal(out[~nan], ref.view(np.uint16)[~nan])
    assert np.isnan(out.view(np.float16)[nan]).all()
    bits = rng.integers(0, 1 << 16, (3, 512), dtype=np.uint16)
    back = np.empty((3, 512), np.float32)
    perm = rng.permutation(512).astype(np.int32)
    kernels.half_to_float(bits, _HALF_TABLE, perm, back)
    assert np.array_equal(back, bits.view(np.float16).astype(np.float32)[:, perm], equal_nan=True)


_THREADS_SCRIPT = """
import threading, numpy as np, ferrum
from ferrum.check import random_problem
p = random_problem(np.random.default_rng(0), 512, 256, 128)
w = ferrum.MarlinWeight.from_gptq(p.qweights[0], p.scales[0], group_size=128)
inputs = [np.random.default_rng(i).standard_normal((m, 512)).astype(np.float16)
          for i, m in enumerate((1, 5, 16, 40) * 3)]
want = [ferrum.mm(a, w) for a in inputs]
got = [None] * len(inputs)
def work(i):
    for _ in range(5):
        got[i] = ferrum.mm(inputs[i], w)
threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
for t in threads: t.start()
for t in threads: t.join()
import numba
print(numba.threading_layer(), all(np.array_equal(x, y) for x, y in zip(got, want)))
"""


@pytest.mark.parametrize("layer", ["workqueue", "default"])
def test_concurrent_calls_from_threads(layer):
    # Numba's workqueue layer (its fallback without OpenMP or TBB) aborts the process when two
    # threads run parallel kernels at once; the backend must serialize there, and stay correct.
    import os
    import subprocess
    import sys
    env = dict(os.environ)
    if layer == "workqueue":
        env["NUMBA_THREADING_LAYER"] = "workqueue"
    done = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    used, same = done.stdout.split()[-2:]
    assert same == "True"
    assert layer == "default" or used == "workqueue"


def test_calls_while_another_thread_imports_the_metal_backend(rng, monkeypatch):
    # A thread's first use of metal imports ferrum.metal.backend; until the import finishes the
    # module sits in sys.modules without MetalArray. Calls in other threads that ask whether an
    # argument is a MetalArray meanwhile must go on, not fail with AttributeError.
    import sys
    import types
    prob = random_problem(rng, 256, 128, 64, act_order=True)
    w = make_weight(prob)
    a = rng.standard_normal((3, 256)).astype(np.float16)
    monkeypatch.setitem(sys.modules, "ferrum.metal.backend",
                        types.ModuleType("ferrum.metal.backend"))
    assert rel_error(ferrum.mm(a, w), a.astype(np.float64) @ prob.dense[0]) < TOL
    ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=64)
    ferrum.load_stacked(prob.qweights, prob.scales, group_size=64)
    ferrum.repack(prob.qweights[0], 256, 128)
    ferrum.quantize(prob.dense[0], group_size=64)
    with pytest.raises(TypeError, match="^a="):    # None is not taken for a MetalArray either
        ferrum.mm(None, w)


def test_kernels_compile_where_numba_cannot_cache(monkeypatch):
    # A read-only install run by a user without a writable home: numba.njit(cache=True) raises
    # "cannot cache function ...: no locator available"; the kernels must compile uncached.
    # (Checked for real with setpriv dropping root's override of file permissions.)
    from ferrum.cpu import kernels
    real = kernels.njit

    def no_cache_location(*args, cache=False, **options):
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real(*args, **options)
    monkeypatch.setattr(kernels, "njit", no_cache_location)
    add = kernels._kernel(parallel=True)(lambda x: x + 1)
    assert add(np.arange(3)).tolist() == [1, 2, 3]


@pytest.mark.parametrize("block_n", [64, 128, 256])
def test_blas_path_in_column_and_row_blocks(rng, monkeypatch, block_n):
    # The large-M path dequantizes DEQUANT_BLOCK_K x DEQUANT_BLOCK_N blocks (so its scratch is
    # bounded for wide layers): every block width, with a narrower last column block (N=320)
    # and several row blocks, must give the product.
    import ferrum.cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "DEQUANT_BLOCK_K", 128)
    monkeypatch.setattr(cpu_backend, "DEQUANT_BLOCK_N", block_n)
    monkeypatch.setattr(CPU, "_local", __import__("threading").local())
    prob = random_problem(rng, 512, 320, 64)
    weight = make_weight(prob)
    a = rng.standard_normal((40, 512)).astype(np.float16)
    out = poisoned((40, 320))
    CPU.mm(a, weight, 0, out, path="blas")
    assert np.isfinite(out).all(), "an output element was not written"
    assert rel_error(out, a.astype(np.float64) @ prob.dense[0]) <= TOL
    assert CPU._local.scratch.size <= 128 * block_n


@pytest.mark.parametrize("experts", [1, 3])
def test_weights_pickle_and_copy(rng, experts):
    import copy
    import pickle
    prob = random_problem(rng, 256, 128, 64, act_order=experts == 1, experts=experts)
    weight = make_weight(prob)
    a = rng.standard_normal((3, 256)).astype(np.float16)
    want = ferrum.mm(a, weight)
    for twin in (copy.deepcopy(weight), pickle.loads(pickle.dumps(weight))):
        assert repr(twin) == repr(weight) and "_aux" not in pickle.dumps(twin).decode("latin-1")
        assert not np.shares_memory(twin.qweight, weight.qweight)
        assert np.array_equal(ferrum.mm(a, twin), want)
    shallow = copy.copy(weight)
    assert shallow.qweight is weight.qweight and np.array_equal(ferrum.mm(a, shallow), want)


def test_backend_named_by_a_numpy_string_is_kept_as_its_name(rng):
    # A name read from a numpy array of strings (np.str_) is the plain name: weights keep it as
    # str, so their repr and the messages that show it read backend='cpu'.
    prob = random_problem(rng, 128, 64, 128)
    name = np.array(["cpu"])[0]
    weights = [ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=128,
                                             backend=name),
               ferrum.load_stacked(prob.qweights, prob.scales, group_size=128, backend=name)]
    weights.append(ferrum.MarlinWeight(weights[0].qweight, weights[0].scales, size_k=128,
                                       size_n=64, group_size=128, backend=name))
    for weight in weights:
        assert type(weight.backend) is str and "backend='cpu'" in repr(weight)
    results = ferrum.crosscheck(name, quick=True, m_values=[1], seed=0)
    assert {type(r.backend) for r in results} == {str}


@pytest.mark.parametrize("m", [1, 3])
def test_serial_twins_equal_the_threaded_kernels(rng, m):
    # Small calls run the kernels' single-threaded twins (no worker wake-up); both must give
    # the same bits. (Slices are independent, so the thread count cannot change a result.)
    from ferrum.cpu import _HALF_TABLE, kernels
    k, n = 512, 320
    prob = random_problem(rng, k, n, 64)
    weight = make_weight(prob)
    marlin, scales = CPU._expert_arrays(weight, 0)
    inv = CPU._scale_inverse(n, weight.num_groups)
    a = rng.standard_normal((m, k)).astype(np.float16)
    perm = rng.permutation(k).astype(np.int32)
    name = "mm_fused_row" if m == 1 else "mm_fused"
    results = []
    for kernel in (getattr(kernels, name), kernels.SERIAL[name]):
        a32 = np.empty((m, k), np.float32)
        kernels.half_to_float(a.view(np.uint16), _HALF_TABLE, perm, a32)
        twin32 = np.empty((m, k), np.float32)
        kernels.SERIAL["half_to_float"](a.view(np.uint16), _HALF_TABLE, perm, twin32)
        assert np.array_equal(a32, twin32)
        out = np.full((m, n), np.nan, np.float32)
        kernel(a32, marlin.view(np.int32), scales, inv, 64, out, 0, 2)
        halves = [np.empty((m, n), np.uint16) for _ in range(2)]
        kernels.float_to_half(out, out.view(np.uint32), halves[0])
        kernels.SERIAL["float_to_half"](out, out.view(np.uint32), halves[1])
        assert np.array_equal(halves[0], halves[1])
        results.append(out)
    assert np.isfinite(results[0]).all() and np.array_equal(results[0], results[1])


def _mm_in_child(a, weight):
    return ferrum.mm(a, weight)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork() on this platform")
def test_mm_in_a_forked_child_after_parallel_work(rng):
    # A multiprocessing pool forked after the parent ran parallel kernels: GNU OpenMP (numba's
    # "omp" layer) would kill each child at its first parallel region and leave the pool
    # waiting forever; the children run single-threaded instead, with the parent's results.
    import multiprocessing
    prob = random_problem(rng, 1024, 1024, 128)
    weight = make_weight(prob)
    inputs = [rng.standard_normal((m, 1024)).astype(np.float16) for m in (16, 64)]  # fused, BLAS
    expected = [ferrum.mm(a, weight) for a in inputs]        # parallel regions in the parent
    with multiprocessing.get_context("fork").Pool(1) as pool:
        for a, want in zip(inputs, expected):
            got = pool.apply_async(_mm_in_child, (a, weight)).get(timeout=120)
            assert np.array_equal(got, want)
