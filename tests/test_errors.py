"""Bad input: a clear ValueError or TypeError naming the argument, before any work."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ferrum
from ferrum.check import random_problem

K, N = 256, 128


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(1)
    prob = random_problem(rng, K, N, 64)
    return prob, ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=64)


@pytest.fixture(scope="module")
def stack():
    rng = np.random.default_rng(2)
    prob = random_problem(rng, K, N, 128, experts=3)
    return prob, ferrum.load_stacked(prob.qweights, prob.scales, group_size=128)


def raises(exc, argument):
    return pytest.raises(exc, match=rf"^{argument}=")


# --- sizes, bits, group sizes -------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(-1024, 4096), st.integers(-512, 2048))
def test_repack_sizes_are_checked(size_k, size_n):
    qweight = np.zeros((max(size_k, 8) // 8, max(size_n, 1)), np.int32)
    valid = size_k > 0 and size_k % 128 == 0 and size_n > 0 and size_n % 64 == 0
    if valid:
        assert ferrum.repack(qweight, size_k, size_n).shape == (size_k // 16, 2 * size_n)
    else:
        with pytest.raises(ValueError, match=r"^size_[kn]="):
            ferrum.repack(qweight, size_k, size_n)


@settings(max_examples=40, deadline=None)
@given(st.integers(-300, 300))
def test_group_size_is_checked(group_size):
    scales = np.ones((max(1, K // group_size) if group_size > 0 else 1, N), np.float16)
    if group_size in (-1, 32, 64, 128, K):
        ferrum.permute_scales(scales, K, N, group_size)
    else:
        with raises(ValueError, "group_size"):
            ferrum.permute_scales(scales, K, N, group_size)


def test_num_bits(layer):
    prob, _ = layer
    with raises(ValueError, "num_bits") as err:
        ferrum.repack(prob.qweights[0], K, N, num_bits=8)
    assert "not supported yet" in str(err.value)
    with raises(ValueError, "num_bits"):
        ferrum.repack(prob.qweights[0], K, N, num_bits=3)
    with raises(ValueError, "bits"):
        ferrum.load_stacked(prob.qweights, prob.scales, group_size=64, bits=8)
    with raises(TypeError, "num_bits"):
        ferrum.repack(prob.qweights[0], K, N, num_bits=4.0)
    with raises(TypeError, "size_k"):
        ferrum.repack(prob.qweights[0], True, N)


# --- dtypes and shapes ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.int16, np.uint8, np.float16])
def test_qweight_dtype(layer, dtype):
    prob, _ = layer
    qweight = np.zeros(prob.qweights[0].shape, dtype)
    with raises(TypeError, "qweight"):
        ferrum.repack(qweight, K, N)
    with raises(TypeError, "qweight"):
        ferrum.MarlinWeight.from_gptq(qweight, prob.scales[0], group_size=64)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 70), min_size=1, max_size=3))
def test_qweight_shape(shape):
    qweight = np.zeros(shape, np.int32)
    if tuple(shape) == (K // 8, N):
        return
    with raises(ValueError, "qweight"):
        ferrum.repack(qweight, K, N)


def test_scales_checks(layer):
    prob, _ = layer
    with raises(TypeError, "scales"):
        ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0].astype(np.int32), group_size=64)
    with raises(ValueError, "scales"):
        ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0][:-1], group_size=64)
    with raises(ValueError, "scales"):
        ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=128)
    bad = prob.scales[0].copy()
    bad[1, 2] = np.nan
    with raises(ValueError, "scales"):
        ferrum.MarlinWeight.from_gptq(prob.qweights[0], bad, group_size=64)
    with raises(ValueError, "scales"):
        ferrum.permute_scales(np.ones((4, N, 1), np.float16), K, N, 64)
    # float32 scales are stored as float16 (the format's type): beyond its range is an error,
    # not an inf in every product.
    big = prob.scales[0].astype(np.float32)
    big[0, 1] = 1e5
    with raises(ValueError, "scales") as err:
        ferrum.MarlinWeight.from_gptq(prob.qweights[0], big, group_size=64)
    assert "float16" in str(err.value)
    with raises(ValueError, "scales"):
        ferrum.permute_scales(big, K, N, 64)
    with raises(ValueError, r"scales\[1\]"):
        ferrum.load_stacked(prob.qweights * 2, [prob.scales[0], big], group_size=64)
    big[0, 1] = 65504.0                     # the float16 maximum itself is fine
    ferrum.MarlinWeight.from_gptq(prob.qweights[0], big, group_size=64)


def test_constructor_stacked_flag_must_be_a_bool(layer):
    _, weight = layer
    for bad in ("no", 1, np.zeros(2)):
        with raises(TypeError, "stacked"):
            ferrum.MarlinWeight(weight.qweight, weight.scales, size_k=K, size_n=N, group_size=64,
                                stacked=bad)
    for ok in (False, np.False_, None):
        ferrum.MarlinWeight(weight.qweight, weight.scales, size_k=K, size_n=N, group_size=64,
                            stacked=ok)


def test_constructor_checks_scales_and_copies_host_arrays(layer):
    prob, weight = layer
    marlin, scales = weight.qweight.copy(), weight.scales.copy()
    bad = scales.copy()
    bad[0, 3] = np.inf
    with raises(ValueError, "scales"):
        ferrum.MarlinWeight(marlin, bad, size_k=K, size_n=N, group_size=64)
    # The weight owns its memory: changing the caller's arrays afterwards changes nothing.
    own = ferrum.MarlinWeight(marlin.view(np.uint32), scales, size_k=K, size_n=N, group_size=64)
    assert own.qweight.dtype == np.int32 and own.qweight.flags.c_contiguous
    a = np.ones((2, K), np.float16)
    before = ferrum.mm(a, own)
    scales *= 2
    marlin[:] = 0
    assert np.array_equal(ferrum.mm(a, own), before)
    assert np.array_equal(ferrum.dequantize(own), ferrum.dequantize(weight))


class _ArrayLike:
    """A host array that is not an np.ndarray: numpy reads it through __array__."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None, copy=None):
        return self.array


@pytest.mark.parametrize("stacked", [False, True])
def test_constructor_refuses_non_finite_scales_of_any_host_kind(layer, stacked):
    # A list of float16 scalars or an object with __array__ holds float16 scales as an ndarray
    # does; an inf among them must be refused the same way, not become inf weights.
    _, weight = layer
    marlin, bad = weight.qweight, weight.scales.copy()
    bad[1, 5] = np.inf
    if stacked:
        marlin, bad = marlin[None], bad[None]
    as_list = [list(map(np.float16, row)) for row in bad.reshape(-1, N)]
    as_list = [as_list] if stacked else as_list
    for scales in (_ArrayLike(bad), as_list):
        assert np.asarray(scales).dtype == np.float16
        with raises(ValueError, "scales"):
            ferrum.MarlinWeight(marlin, scales, size_k=K, size_n=N, group_size=64)


# --- permutations and act-order groupings ------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-5, K + 5), min_size=K - 2, max_size=K + 2))
def test_perm_must_be_a_permutation(values):
    qweight = np.zeros((K // 8, N), np.int32)
    perm = np.array(values, np.int32)
    if sorted(values) == list(range(K)):
        ferrum.repack(qweight, K, N, perm=perm)
    else:
        with raises(ValueError, "perm"):
            ferrum.repack(qweight, K, N, perm=perm)


def test_perm_dtype(layer):
    prob, _ = layer
    with raises(TypeError, "perm"):
        ferrum.repack(prob.qweights[0], K, N, perm=np.arange(K, dtype=np.float32))


def test_empty_perm_and_g_idx_are_a_shape_error(layer):
    # [] reads as a float64 array: the error is its length, not a dtype the caller never chose.
    prob, _ = layer
    with raises(ValueError, "perm") as err:
        ferrum.repack(prob.qweights[0], K, N, perm=[])
    assert f"shape [{K}]" in str(err.value)
    with raises(ValueError, "g_idx") as err:
        ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=64, g_idx=[])
    assert f"shape [{K}]" in str(err.value)


def test_g_idx_must_be_a_valid_grouping(layer):
    prob, _ = layer
    good = np.random.default_rng(0).permutation(K) // 64
    ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=64, g_idx=good)
    bad_range = good.copy()
    bad_range[0] = 4
    uneven = good.copy()
    uneven[np.flatnonzero(good == 0)[0]] = 1      # group 0 one short, group 1 one over
    for bad in (bad_range, uneven, good[:-1], -good):
        with raises(ValueError, "g_idx"):
            ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=64, g_idx=bad)
    with raises(TypeError, "g_idx"):
        ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=64,
                                      g_idx=good.astype(np.float64))


def test_stacked_g_idx_checks_name_the_expert(layer):
    # load_stacked's g_idx: one entry per expert (a list, None for an expert without act-order,
    # or an [E, K] array); each entry's rules are from_gptq's, named g_idx[e]
    prob, _ = layer
    qs, ss = [prob.qweights[0]] * 2, [prob.scales[0]] * 2
    good = np.random.default_rng(0).permutation(K) // 64
    uneven = good.copy()
    uneven[np.flatnonzero(good == 0)[0]] = 1
    before = good.copy()
    for bad, exc, named in (([good], ValueError, "g_idx"),              # one entry for two experts
                            ([good, good, good], ValueError, "g_idx"),
                            (good, ValueError, "g_idx"),                # [K]: not one per expert
                            (np.stack([good] * 3), ValueError, "g_idx"),
                            ([good, uneven], ValueError, r"g_idx\[1\]"),
                            ([None, good[:-1]], ValueError, r"g_idx\[1\]"),
                            ([good.astype(np.float32), good], TypeError, r"g_idx\[0\]"),
                            (np.stack([good, good]).astype(np.float64), TypeError, r"g_idx\[0\]")):
        with raises(exc, named):
            ferrum.load_stacked(qs, ss, group_size=64, g_idx=bad)
    assert np.array_equal(good, before)


def test_stacked_perm_is_one_permutation_per_expert(layer):
    prob, weight = layer
    qweight = np.stack([np.asarray(weight.qweight)] * 2)
    scales = np.stack([np.asarray(weight.scales)] * 2)
    perm = np.stack([np.arange(K), np.random.default_rng(1).permutation(K)]).astype(np.int32)
    ferrum.MarlinWeight(qweight, scales, size_k=K, size_n=N, group_size=64, perm=perm)
    with raises(ValueError, "perm"):       # a single layer's [K] perm for a stack
        ferrum.MarlinWeight(qweight, scales, size_k=K, size_n=N, group_size=64, perm=perm[1])
    twice = perm.copy()
    twice[1, 0] = twice[1, 1]
    with raises(ValueError, r"perm\[1\]"):
        ferrum.MarlinWeight(qweight, scales, size_k=K, size_n=N, group_size=64, perm=twice)


# --- mm -------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(0, 5), st.integers(0, 600),
       st.sampled_from([np.float16, np.float32, np.float64, np.int16]), st.integers(1, 3))
def test_mm_activation_checks(m, k, dtype, ndim):
    rng = np.random.default_rng(3)
    prob = random_problem(rng, K, N, 64)
    weight = ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=64)
    shape = {1: (k,), 2: (m, k), 3: (1, m, k)}[ndim]
    a = np.ones(shape, dtype)
    valid = ndim == 2 and dtype == np.float16 and k == K and m >= 1
    if valid:
        assert ferrum.mm(a, weight).shape == (m, N)
    else:
        with pytest.raises((ValueError, TypeError), match=r"^a="):
            ferrum.mm(a, weight)


def test_mm_expert_checks(stack, layer):
    prob, weight = stack
    a = np.ones((2, K), np.float16)
    for bad in (-1, 3, 10):
        with raises(ValueError, "expert"):
            ferrum.mm(a, weight, expert=bad)
    with raises(TypeError, "expert"):
        ferrum.mm(a, weight, expert=1.5)
    with raises(ValueError, "expert"):
        ferrum.mm(a, layer[1], expert=1)
    with raises(ValueError, "expert"):
        ferrum.dequantize(weight, expert=3)


def test_mm_out_checks(layer, stack):
    _, weight = layer
    a = np.ones((3, K), np.float16)
    with raises(ValueError, "out"):
        ferrum.mm(a, weight, out=np.empty((3, N + 64), np.float16))
    with raises(TypeError, "out"):
        ferrum.mm(a, weight, out=np.empty((3, N), np.float32))
    ro = np.empty((3, N), np.float16)
    ro.flags.writeable = False
    with raises(ValueError, "out"):
        ferrum.mm(a, weight, out=ro)
    with raises(TypeError, "out"):     # written in place, so it must be an array to write to
        ferrum.mm(a, weight, out=memoryview(np.empty((3, N), np.float16)))
    with raises(TypeError, "out"):
        ferrum.mm(a, weight, out=np.empty((3, N), np.float16).tolist())
    _, stacked = stack
    with raises(ValueError, "out"):
        ferrum.mm(a, stacked, out=np.empty((3, N), np.float16))     # all experts: [M, 3N]
    ferrum.mm(a, stacked, out=np.empty((3, 3 * N), np.float16))


def test_out_overlapping_a_is_refused_whatever_a_is_converted_to(layer):
    # a byte-swapped a is converted to a native copy; out must still not overlap the caller's a.
    _, weight = layer
    buf = np.zeros((4, 2 * K), np.dtype(">f2"))
    a = buf[:, :K]
    with raises(ValueError, "out"):
        ferrum.mm(a, weight, out=buf[:, K - 64:K - 64 + N])
    assert (buf == 0).all()


def test_out_overlapping_the_weight_is_refused(layer, stack):
    # A cpu weight's arrays are host arrays: writing the product over them would change the
    # weight (the cuda backend refuses the same call).
    for (_, weight), expert in ((layer, None), (stack, 1)):
        scales = weight.scales if expert is None else weight.scales[expert]    # [groups, N]
        before = weight.scales.copy()
        with raises(ValueError, "out") as err:
            ferrum.mm(np.ones((scales.shape[0], K), np.float16), weight, out=scales,
                      expert=expert)
        assert "overlap" in str(err.value)
        assert np.array_equal(weight.scales, before)


def test_out_overlapping_the_weights_act_order_perm_is_refused():
    # perm (int32 [K]) is a host array of the weight on every backend. A product written over it
    # left row indices out of range, and the next mm read A out of bounds (a segfault on cpu).
    # perm is read-only now, so such an out is refused as not writable (else as overlapping).
    prob = random_problem(np.random.default_rng(3), K, 64, 64, act_order=True)
    weight = ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=64,
                                           g_idx=prob.g_idx)
    assert weight.perm is not None
    before = weight.perm.copy()
    over = weight.perm.view(np.float16).reshape(-1, 64)     # [8, 64]: the K int32 as float16
    with raises(ValueError, "out") as err:
        ferrum.mm(np.ones((over.shape[0], K), np.float16), weight, out=over)
    assert "writable" in str(err.value) or "overlap" in str(err.value)
    assert np.array_equal(weight.perm, before)


def test_act_order_perm_is_the_weights_own_and_read_only():
    # The kernels index A with perm without checking it again, so the weight keeps its own copy
    # of the checked permutation and nobody writes to it afterwards.
    g_idx = np.random.default_rng(4).permutation(K) // 64
    qweight = np.random.default_rng(5).integers(0, 2**31, (K // 8, 64), dtype=np.int32)
    scales = np.ones((K // 64, 64), np.float16)
    weight = ferrum.MarlinWeight.from_gptq(qweight, scales, group_size=64, g_idx=g_idx)
    assert weight.perm is not None and not weight.perm.flags.writeable
    with pytest.raises(ValueError):
        weight.perm[0] = K + 5
    perm = np.random.default_rng(6).permutation(K).astype(np.int32)
    marlin = ferrum.repack(qweight, K, 64, perm=perm)
    direct = ferrum.MarlinWeight(marlin, ferrum.permute_scales(scales, K, 64, 64), size_k=K,
                                 size_n=64, group_size=64, perm=perm)
    perm[:] = 0                          # the caller's array is not the weight's
    assert not np.shares_memory(direct.perm, perm) and len(set(direct.perm.tolist())) == K


def test_mm_weight_and_backend_checks(layer):
    _, weight = layer
    a = np.ones((1, K), np.float16)
    with raises(TypeError, "weight"):
        ferrum.mm(a, np.zeros((K // 16, 2 * N), np.int32))
    with raises(ValueError, "backend"):
        ferrum.mm(a, weight, backend="tpu")
    with raises(ValueError, "backend") as err:
        ferrum.mm(a, weight, backend="cuda")
    assert "weight.to('cuda')" in str(err.value)
    with raises(ValueError, "stream"):
        ferrum.mm(a, weight, stream=0)
    with raises(ValueError, "backend"):
        ferrum.repack(np.zeros((K // 8, N), np.int32), K, N, backend="gpu")
    for not_a_name in (5, b"cpu", ["cpu"]):   # a wrong kind of value: TypeError
        with raises(TypeError, "backend"):
            ferrum.mm(a, weight, backend=not_a_name)
        with raises(TypeError, "backend"):
            weight.to(not_a_name)
    with raises(TypeError, "backend"):
        weight.to(None)     # (mm's backend=None is the weight's own)


def test_unavailable_backend_says_why():
    for name, info in ferrum.backends().items():
        if not info.available:
            assert info.reason
            with pytest.raises(ValueError, match=name):
                ferrum.repack(np.zeros((K // 8, N), np.int32), K, N, backend=name)


def test_load_stacked_checks(stack):
    prob, _ = stack
    with raises(ValueError, "scales"):
        ferrum.load_stacked(prob.qweights, prob.scales[:2], group_size=128)
    with raises(ValueError, "qweights"):
        ferrum.load_stacked([], [], group_size=128)
    with raises(ValueError, r"qweights\[1\]"):
        ferrum.load_stacked([prob.qweights[0], prob.qweights[1][:, :64]], prob.scales[:2],
                            group_size=128)
    with raises(ValueError, "qweights"):
        ferrum.load_stacked(np.zeros((K // 8, N), np.int32), prob.scales, group_size=128)


def test_load_stacked_checks_everything_before_repacking(stack, monkeypatch):
    """A bad last expert's scales, or a backend that is not available, fail before any expert
    is repacked."""
    prob, _ = stack
    from ferrum.cpu import BACKEND as CPU

    def no_work(*args, **kwargs):
        raise AssertionError("load_stacked started repacking before checking its arguments")
    monkeypatch.setattr(CPU, "repack", no_work)
    bad = [s.copy() for s in prob.scales]
    bad[-1][0, 0] = np.nan
    with raises(ValueError, r"scales\[2\]"):
        ferrum.load_stacked(prob.qweights, bad, group_size=128)
    for name, info in ferrum.backends().items():
        if not info.available:
            with raises(ValueError, "backend"):
                ferrum.load_stacked(prob.qweights, prob.scales, group_size=128, backend=name)


def test_messages_show_long_values_cut_short(stack):
    # A tuple of arrays or a long tuple is shown in at most 60 characters, not its whole repr.
    prob, _ = stack
    with raises(ValueError, "scales") as err:
        ferrum.load_stacked(tuple(prob.qweights), tuple(prob.scales[:2]), group_size=128)
    assert len(str(err.value)) < 200
    with raises(ValueError, "perm") as err:
        ferrum.repack(prob.qweights[0], K, N, perm=tuple(range(K + 1)))
    assert len(str(err.value)) < 200


def test_a_value_that_cannot_be_shown_still_gives_the_arguments_error():
    class BadRepr:
        def __repr__(self):
            raise RuntimeError("no repr")

    class OddShape:
        shape, dtype = 5, "?"

    for value in (BadRepr(), OddShape()):
        with pytest.raises((TypeError, ValueError), match=r"^w=<(BadRepr|OddShape) object>: "):
            ferrum.quantize(value)


def test_messages_show_numpy_scalars_by_value(stack):
    prob, weight = stack
    a = np.ones((1, K), np.float16)
    with pytest.raises(ValueError, match=r"^expert=np\.int64\(7\): "):
        ferrum.mm(a, weight, expert=np.int64(7))
    with pytest.raises(ValueError, match=r"^expert=array\(9\): "):
        ferrum.dequantize(weight, expert=np.array(9))
    with pytest.raises(ValueError, match=r"^group_size=np\.int32\(48\): "):
        ferrum.load_stacked(prob.qweights, prob.scales, group_size=np.int32(48))


def test_quantize_checks():
    with raises(ValueError, r"w\.shape\[0\]"):
        ferrum.quantize(np.ones((100, 64), np.float32))
    with raises(ValueError, "w"):
        ferrum.quantize(np.full((128, 64), np.inf, np.float32))
    with raises(ValueError, "w"):
        ferrum.quantize(np.full((128, 64), 1e6, np.float32))
    with raises(TypeError, "w"):
        ferrum.quantize(np.ones((128, 64), np.int32))
    with raises(ValueError, "group_size"):
        ferrum.quantize(np.ones((128, 64), np.float32), group_size=48)


def test_values_numpy_cannot_read_are_named(layer, stack):
    """A ragged nested list, or an object whose __array__ fails, is an error naming the argument
    (not numpy's bare message, nor the object's own exception)."""
    prob, weight = layer
    ragged = [[1, 2], [3]]

    class Unreadable:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("no")

    a = np.ones((2, K), np.float16)
    calls = [("qweight", lambda x: ferrum.repack(x, K, N)),
             ("perm", lambda x: ferrum.repack(prob.qweights[0], K, N, perm=x)),
             ("scales", lambda x: ferrum.permute_scales(x, K, N, 64)),
             ("g_idx", lambda x: ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0],
                                                                group_size=64, g_idx=x)),
             (r"qweights\[0\]", lambda x: ferrum.load_stacked([x], [prob.scales[0]], group_size=64)),
             ("a", lambda x: ferrum.mm(x, weight)),
             ("out", lambda x: ferrum.mm(a, weight, out=x)),
             ("w", lambda x: ferrum.quantize(x))]
    for argument, call in calls:
        with raises(ValueError, argument) as err:
            call(ragged)
        assert "rectangular" in str(err.value)
        with raises(TypeError, argument) as err:
            call(Unreadable())
        assert "cannot be read as an array" in str(err.value)


class _Shifty:
    """An array-like whose __array__ answers the good array once, then a bad one (a short row
    of zeros): a call that reads it twice checks one array and runs on the other."""

    def __init__(self, good):
        self.good, self.reads = good, 0

    def __array__(self, dtype=None, copy=None):
        self.reads += 1
        return self.good if self.reads == 1 else np.zeros((1, 8), self.good.dtype)


def test_array_likes_are_read_once(layer, stack):
    # What passed the checks is what the kernels get: every argument that takes an array-like
    # reads it exactly once, and the call gives what the numpy array would.
    prob, weight = layer
    a = np.random.default_rng(5).standard_normal((3, K)).astype(np.float16)
    w = np.random.default_rng(6).standard_normal((K, N)).astype(np.float32)
    marlin = ferrum.repack(prob.qweights[0], K, N)
    permuted = ferrum.permute_scales(prob.scales[0], K, N, 64)
    calls = [(a, lambda x: ferrum.mm(x, weight)),
             (a, lambda x: ferrum.mm(x, stack[1], expert=1)),
             (prob.qweights[0], lambda x: ferrum.repack(x, K, N)),
             (prob.scales[0], lambda x: ferrum.permute_scales(x, K, N, 64)),
             (marlin, lambda x: ferrum.dequantize(ferrum.MarlinWeight(x, permuted, size_k=K, size_n=N,
                                                                      group_size=64))),
             (permuted, lambda x: ferrum.dequantize(ferrum.MarlinWeight(marlin, x, size_k=K, size_n=N,
                                                                        group_size=64))),
             (prob.qweights[0], lambda x: ferrum.dequantize(
                 ferrum.MarlinWeight.from_gptq(x, prob.scales[0], group_size=64))),
             (prob.scales[0], lambda x: ferrum.dequantize(
                 ferrum.MarlinWeight.from_gptq(prob.qweights[0], x, group_size=64))),
             (prob.qweights[0], lambda x: ferrum.dequantize(
                 ferrum.load_stacked([x], [prob.scales[0]], group_size=64))),
             (np.stack([prob.scales[0]]), lambda x: ferrum.dequantize(
                 ferrum.load_stacked(np.stack([prob.qweights[0]]), x, group_size=64))),
             (w, lambda x: ferrum.quantize(x, group_size=64))]
    for good, call in calls:
        shifty = _Shifty(good)
        got, want = call(shifty), call(good)
        assert shifty.reads == 1
        for g, v in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            assert np.array_equal(g, v)


def test_failed_calls_leave_inputs_unmodified(layer):
    prob, weight = layer
    a = np.ones((2, K), np.float16)
    out = np.full((2, N + 64), 7, np.float16)
    with pytest.raises(ValueError):
        ferrum.mm(a, weight, out=out)
    assert (out == 7).all() and (a == 1).all()


class _Interface:
    """An object whose __cuda_array_interface__ is whatever it was given."""

    def __init__(self, cai):
        self.__cuda_array_interface__ = cai


@pytest.mark.parametrize("cai", [
    5,                                                          # not a dict
    {"typestr": "<f2", "data": (0, False), "version": 3},       # no shape
    {"shape": (2, K), "data": (0, False), "version": 3},        # no typestr
    {"shape": None, "typestr": "<f2", "data": (0, False)},      # shape not a tuple
    {"shape": (2, "x"), "typestr": "<f2", "data": (0, False)},  # shape not integers
    {"shape": (2, K), "typestr": 7, "data": (0, False)},        # typestr not a string
    {"shape": (2, K), "typestr": "<f2"},                        # no data
])
def test_a_malformed_cuda_array_interface_is_the_arguments_type_error(layer, cai):
    # Was a KeyError / AttributeError (or a TypeError from Python naming nothing), on a
    # machine with or without the cuda backend, for a, out and the weight's arrays.
    prob, weight = layer
    a = np.ones((2, K), np.float16)
    bad = _Interface(cai)
    with raises(TypeError, "a") as err:
        ferrum.mm(bad, weight)
    assert "__cuda_array_interface__" in str(err.value)
    with raises(TypeError, "out"):
        ferrum.mm(a, weight, out=bad)
    with raises(TypeError, "qweight"):
        ferrum.MarlinWeight.from_gptq(bad, prob.scales[0], group_size=64)
    with raises(TypeError, "qweight"):
        ferrum.repack(bad, K, N, backend="cpu")
