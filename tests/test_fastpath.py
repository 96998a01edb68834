"""mm's fast path accepts nothing its general path rejects, and hands the backend the same call.

With a GPU and torch, ferrum.mm first offers a plain torch call to the cuda backend's compiled
shortcut (_cuda.mm_direct, the last test here). Then it tries api._mm_fast_accept (a few attribute reads for torch, cupy, ferrum and
plain __cuda_array_interface__ device arrays); anything it declines goes to api._mm_checked,
which holds the rules. These tests call both on the same inputs, with the backend's mm replaced
by a recorder, and compare: the same error (type and message), or the same backend call.

Without a GPU the cuda backend runs on a stub CUDA layer and the arrays are stand-ins
(tests/fake_device.py; torch and cupy stand-ins only where the real library is absent). The
cuda-marked test at the end does the same with real torch (and cupy) device arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ferrum
import ferrum.cuda
from ferrum import api
from ferrum.check import random_problem

import fake_device as FD

K, N, E = 256, 128, 3


@pytest.fixture(scope="module")
def env():
    """(fake modules, single-layer cuda weight, stacked cuda weight, cpu weight) on the stub."""
    with FD.fake_modules() as fakes, FD.stub_cuda():
        rng = np.random.default_rng(5)
        single = random_problem(rng, K, N, 64)
        stacked = random_problem(rng, K, N, 128, experts=E)
        host = ferrum.MarlinWeight.from_gptq(single.qweights[0], single.scales[0], group_size=64)
        layer = host.to("cuda")
        stack = ferrum.load_stacked(stacked.qweights, stacked.scales, group_size=128).to("cuda")
        yield fakes, layer, stack, host


class _Recorder:
    """Replaces the cuda backend's mm: records each call, runs nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, a, weight, expert, out, **options):
        self.calls.append((a, weight, expert, out, options))
        return "result"


def _outcome(fn, *args, **kwargs):
    try:
        return ("ok", fn(*args, **kwargs))
    except (TypeError, ValueError) as exc:
        return (type(exc), str(exc))


def _same_call(x, y):
    if len(x) != len(y):
        return False
    for u, v in zip(x, y):
        if isinstance(u, np.ndarray) and isinstance(v, np.ndarray):
            if u.shape != v.shape or u.dtype != v.dtype or not np.shares_memory(u, v):
                return False
        elif isinstance(u, dict):
            if u != v:
                return False
        elif u is not v and not (isinstance(u, int) and type(u) is type(v) and u == v):
            return False
    return True


def compare(monkeypatch, a, weight, **kwargs):
    """Run ferrum.mm and api._mm_checked on the same call; assert they agree. Returns whether
    the fast path accepted the call."""
    recorder = _Recorder()
    # the backend the call reaches: the weight's (a cpu weight's calls go to the cpu backend)
    target = weight.backend if isinstance(weight, ferrum.MarlinWeight) else "cuda"
    monkeypatch.setattr(ferrum._registry.get(target), "mm", recorder)
    got = _outcome(ferrum.mm, a, weight, **kwargs)
    want = _outcome(api._mm_checked, a, weight, kwargs.get("expert"), kwargs.get("out"),
                    kwargs.get("backend"), kwargs.get("stream"))
    assert got[0] == want[0], (got, want)
    if got[0] == "ok":
        assert len(recorder.calls) == 2
        assert _same_call(recorder.calls[0], recorder.calls[1]), recorder.calls
    else:
        assert got[1] == want[1]
        assert recorder.calls == []
    try:
        fast = api._mm_fast_accept(a, weight, kwargs.get("expert"), kwargs.get("out"),
                                   kwargs.get("backend"))
    except Exception:
        fast = None
    if fast is not None:
        assert want[0] == "ok", f"fast path accepted what the general path rejects: {want}"
    return fast is not None


# --- array makers: kind -> (shape, dtype name) -> array ----------------------------------------

def _maker(fakes, kind):
    torch, cupy = fakes["torch"], fakes["cupy"]
    if kind == "torch":
        if torch is None:
            return None
        return lambda shape, dt: torch.Tensor(shape, getattr(torch, dt))
    if kind == "torch_cpu":
        if torch is None:
            return None
        return lambda shape, dt: torch.Tensor(shape, getattr(torch, dt), is_cuda=False)
    if kind == "torch_strided":
        if torch is None:
            return None
        return lambda shape, dt: torch.Tensor(shape, getattr(torch, dt), contiguous=False)
    if kind == "cupy":
        if cupy is None:
            return None
        return lambda shape, dt: cupy.ndarray(shape, _np_dtype(dt))
    if kind == "cai":
        return lambda shape, dt: FD.CAIArray(shape, _np_dtype(dt))
    if kind == "cai_stream":
        return lambda shape, dt: FD.CAIArray(shape, _np_dtype(dt), stream=7)
    if kind == "dlpack":
        return lambda shape, dt: FD.DLPackArray(shape, _np_dtype(dt))
    if kind == "dlpack_rocm":
        return lambda shape, dt: FD.DLPackArray(shape, _np_dtype(dt), device_type=10)
    if kind == "numpy":
        return lambda shape, dt: np.zeros(shape, _np_dtype(dt))
    raise AssertionError(kind)


def _np_dtype(name):
    return np.dtype("uint16" if name == "bfloat16" else name)


KINDS = ["torch", "torch_cpu", "torch_strided", "cupy", "cai", "cai_stream", "dlpack",
         "dlpack_rocm", "numpy"]
DTYPES = ["float16", "float32", "int32", "bfloat16"]


# --- the fast path is taken where it should be -------------------------------------------------

@pytest.mark.parametrize("kind", ["torch", "cupy", "cai", "cai_stream", "dlpack"])
def test_fast_path_takes_the_common_device_calls(env, kind, monkeypatch):
    fakes, layer, stack, _ = env
    make = _maker(fakes, kind)
    if make is None:
        pytest.skip(f"the real {kind} is installed here; see the cuda-marked test")
    a = make((4, K), "float16")
    assert compare(monkeypatch, a, layer)
    assert compare(monkeypatch, a, layer, out=make((4, N), "float16"))
    assert compare(monkeypatch, a, layer, out=make((4, N), "float16"), stream=3, backend="cuda")
    assert compare(monkeypatch, a, stack)
    assert compare(monkeypatch, a, stack, out=make((4, E * N), "float16"))
    assert compare(monkeypatch, a, stack, expert=2, out=make((4, N), "float16"))


# --- every rejection is the general path's -------------------------------------------------------

# Calls the fast path must leave to the general path: all are rejected there but the last (a
# host out, which the general path accepts and the backend copies back).
BAD = [  # (what, a shape, a dtype, kwargs builder(make) -> kwargs, weight name)
    ("a dtype float32", (2, K), "float32", lambda mk: {}, "layer"),
    ("a dtype int32", (2, K), "int32", lambda mk: {}, "layer"),
    ("a dtype bfloat16", (2, K), "bfloat16", lambda mk: {}, "layer"),
    ("a 1-D", (K,), "float16", lambda mk: {}, "layer"),
    ("a 3-D", (1, 2, K), "float16", lambda mk: {}, "layer"),
    ("a wrong K", (2, K + 64), "float16", lambda mk: {}, "layer"),
    ("a no rows", (0, K), "float16", lambda mk: {}, "layer"),
    ("out wrong cols", (2, K), "float16", lambda mk: {"out": mk((2, N + 64), "float16")}, "layer"),
    ("out wrong rows", (2, K), "float16", lambda mk: {"out": mk((3, N), "float16")}, "layer"),
    ("out float32", (2, K), "float16", lambda mk: {"out": mk((2, N), "float32")}, "layer"),
    ("out 3-D", (2, K), "float16", lambda mk: {"out": mk((1, 2, N), "float16")}, "layer"),
    ("out one expert's width for all", (2, K), "float16",
     lambda mk: {"out": mk((2, N), "float16")}, "stack"),
    ("expert too large", (2, K), "float16", lambda mk: {"expert": E}, "stack"),
    ("expert negative", (2, K), "float16", lambda mk: {"expert": -1}, "stack"),
    ("expert on a single layer", (2, K), "float16", lambda mk: {"expert": 1}, "layer"),
    ("expert a bool", (2, K), "float16", lambda mk: {"expert": True}, "stack"),
    ("expert a float", (2, K), "float16", lambda mk: {"expert": 1.0}, "stack"),
    ("expert a string", (2, K), "float16", lambda mk: {"expert": "1"}, "stack"),
    ("backend unknown", (2, K), "float16", lambda mk: {"backend": "tpu"}, "layer"),
    ("backend not a string", (2, K), "float16", lambda mk: {"backend": 3}, "layer"),
    ("backend another", (2, K), "float16", lambda mk: {"backend": "cpu"}, "layer"),
    ("weight on the cpu", (2, K), "float16", lambda mk: {}, "host"),
    ("weight on the cpu, with a stream", (2, K), "float16", lambda mk: {"stream": 1}, "host"),
    ("weight not a MarlinWeight", (2, K), "float16", lambda mk: {}, "not a weight"),
    ("out a host array", (2, K), "float16", lambda mk: {"out": np.zeros((2, N), np.float16)},
     "layer"),
]


@pytest.mark.parametrize("kind", ["torch", "cupy", "cai", "dlpack"])
@pytest.mark.parametrize("what,shape,dtype,kwargs,weight", BAD, ids=[b[0] for b in BAD])
def test_fast_path_leaves_bad_calls_to_the_general_path(env, kind, what, shape, dtype, kwargs,
                                                          weight, monkeypatch):
    fakes, layer, stack, host = env
    make = _maker(fakes, kind)
    if make is None:
        pytest.skip(f"the real {kind} is installed here; see the cuda-marked test")
    w = {"layer": layer, "stack": stack, "host": host, "not a weight": layer.qweight}[weight]
    accepted = compare(monkeypatch, make(shape, dtype), w, **kwargs(make))
    assert not accepted, what


@settings(max_examples=300, deadline=None)
@given(a_kind=st.sampled_from(KINDS), a_dtype=st.sampled_from(DTYPES),
       a_shape=st.sampled_from([(1, K), (5, K), (0, K), (5, K + 64), (K,), (1, 5, K)]),
       out_kind=st.sampled_from([None] + KINDS), out_dtype=st.sampled_from(DTYPES),
       out_rows=st.sampled_from([None, 0, 1, 5]), out_cols=st.sampled_from([N, E * N, N + 64]),
       expert=st.sampled_from([None, 0, 1, 2, 3, -1, True, 1.0, np.int64(1)]),
       backend=st.sampled_from([None, "cuda", "cpu", "metal", "tpu", 3]),
       stream=st.sampled_from([None, 0, 5]),
       weight=st.sampled_from(["layer", "stack", "host"]))
def test_fast_and_general_paths_agree(env, a_kind, a_dtype, a_shape, out_kind, out_dtype,
                                      out_rows, out_cols, expert, backend, stream, weight):
    fakes, layer, stack, host = env
    make_a, make_out = _maker(fakes, a_kind), _maker(fakes, out_kind) if out_kind else None
    if make_a is None or (out_kind and make_out is None):
        return
    a = make_a(a_shape, a_dtype)
    rows = a_shape[0] if out_rows is None and len(a_shape) == 2 else (out_rows or 0)
    out = make_out((rows, out_cols), out_dtype) if make_out else None
    w = {"layer": layer, "stack": stack, "host": host}[weight]
    with pytest.MonkeyPatch.context() as monkeypatch:   # compare records the weight's backend
        compare(monkeypatch, a, w, expert=expert, out=out, backend=backend, stream=stream)


@pytest.mark.parametrize("kind", ["torch_cpu", "dlpack_rocm", "numpy"])
def test_fast_path_declines_arrays_the_cuda_backend_does_not_own(env, kind, monkeypatch):
    fakes, layer, _, _ = env
    make = _maker(fakes, kind)
    if make is None:
        pytest.skip(f"the real {kind} is installed here; see the cuda-marked test")
    assert not compare(monkeypatch, make((2, K), "float16"), layer)
    assert not compare(monkeypatch, make((2, K), "float16"), layer,
                       out=_maker(fakes, "cai")((2, N), "float16"))


def test_fast_path_reads_a_dlpack_arrays_instance_cai_as_the_general_path_does(env, monkeypatch):
    _, layer, _, _ = env
    a = FD.DLPackArray((2, K), np.float16)
    a.__cuda_array_interface__ = FD.CAIArray((2, K), np.float32).__cuda_array_interface__
    assert not compare(monkeypatch, a, layer)      # the general path reads float32 from the CAI


def test_a_misbehaving_array_gets_the_general_paths_error(env, monkeypatch):
    _, layer, _, _ = env

    class Broken:
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("driver gone")

    with pytest.raises(RuntimeError, match="driver gone"):
        ferrum.mm(Broken(), layer)


# --- the backend's few-attribute views agree with _device_view ---------------------------------

@pytest.mark.parametrize("strides,stream_field,stream,ptr", [
    (None, None, 0, None), (None, 1, 0, None), (None, 7, 7, None), (None, 7, 0, None),
    (None, 1, 5, None), (None, 2, 2, None), ((2 * N, 2), None, 0, None),
    ((4 * N, 2), None, 0, None), ((2, 6), None, 0, None), (None, None, 0, 0x7E0000000002)])
def test_backend_cai_view_matches_device_view(env, strides, stream_field, stream, ptr):
    """_fast_view uses an array as it is only where _device_view would (same pointer, same
    waits); where _device_view copies (strided, misaligned), _fast_view copies alike."""
    stub = ferrum.cuda._cuda
    x = FD.CAIArray((3, N), np.float16, strides=strides, stream=stream_field, ptr=ptr)

    def run(fn):
        stub.waits.clear()
        stub.copies.clear()
        outcome = _outcome(fn, x, stream, 0)
        return outcome, list(stub.waits), [c[2:] for c in stub.copies]

    got, got_waits, got_copies = run(ferrum.cuda._fast_view)
    want, want_waits, want_copies = run(ferrum.cuda._device_view)
    assert got[0] == want[0] == "ok"
    assert got_waits == want_waits and got_copies == want_copies
    copied = strides == (4 * N, 2) or strides == (2, 6) or ptr is not None
    assert bool(want_copies) == copied
    if copied:   # a C-contiguous copy of the same shape, made on the call's stream
        assert want_copies == [((3, N), strides or (2 * N, 2), 2, stream)]
        assert got[1][0] != x.ptr and want[1][0] != x.ptr and got[1][1] == 3
    else:
        assert got[1][:2] == (want[1][0], want[1][1][0]) == (x.ptr, 3)


# --- real device arrays ------------------------------------------------------------------------

_CUDA = ferrum.backends()["cuda"]


def test_host_out_the_backend_cannot_write_receives_a_device_result(env, tmp_path, monkeypatch):
    """A byte-swapped out is filled by assignment from the backend's result (fetched to the host
    when a is a device array); a memmap out reaches the backend as a plain ndarray view."""
    _, layer, _, _ = env
    seen = []

    def backend_mm(a, weight, expert, out, **options):
        seen.append(type(out))
        return FD.CAIArray((3, N)) if out is None else out
    monkeypatch.setattr(ferrum.cuda.BACKEND, "mm", backend_mm)
    swapped = np.full((3, N), 7, np.dtype(">f2"))
    assert ferrum.mm(FD.CAIArray((3, K)), layer, out=swapped) is swapped
    assert (swapped == 0).all()                 # the stub's copy to the host is zeros
    mapped = np.memmap(tmp_path / "c", np.float16, "w+", shape=(3, N))
    assert ferrum.mm(FD.CAIArray((3, K)), layer, out=mapped) is mapped
    assert seen == [type(None), np.ndarray]


def test_byte_swapped_device_arrays_are_still_refused(env):
    # Host arrays in another byte order are converted; a device array cannot be, so '>f2' on the
    # device stays a dtype error.
    _, layer, _, _ = env
    with pytest.raises(TypeError, match=r"^a=.*dtype must be float16, got >f2"):
        ferrum.mm(FD.CAIArray((3, K), ">f2"), layer)


@pytest.mark.cuda
@pytest.mark.skipif(not _CUDA.available, reason=f"cuda backend: {_CUDA.reason}")
def test_real_device_arrays_fast_and_general_paths_agree(monkeypatch):
    torch = pytest.importorskip("torch")
    # The module's stub fixture (env) may still be active: this test needs the real CUDA layer.
    import ferrum._cuda as real_cuda
    monkeypatch.setattr(ferrum.cuda, "_cuda", real_cuda)
    rng = np.random.default_rng(7)
    prob = random_problem(rng, K, N, 128, experts=E)
    layer = ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=128,
                                          backend="cuda")
    stack = ferrum.load_stacked(prob.qweights, prob.scales, group_size=128, backend="cuda")
    makers = {"torch": lambda shape, dt: torch.zeros(shape, dtype=getattr(torch, dt),
                                                     device="cuda"),
              "ferrum": lambda shape, dt: ferrum.cuda._cuda.empty(shape, _np_dtype(dt))}
    try:
        import cupy
        makers["cupy"] = lambda shape, dt: cupy.zeros(shape, _np_dtype(dt))
    except ImportError:
        pass
    for kind, make in makers.items():
        a = make((4, K), "float16")
        assert compare(monkeypatch, a, layer, out=make((4, N), "float16")), kind
        assert compare(monkeypatch, a, stack, expert=1), kind
        for what, shape, dtype, kwargs, weight in BAD:
            if kind == "ferrum" and dtype == "bfloat16":
                continue
            w = {"layer": layer, "stack": stack, "host": layer.to("cpu"),
                 "not a weight": layer.qweight}[weight]
            assert not compare(monkeypatch, make(shape, dtype), w, **kwargs(make)), (kind, what)
    # a CPU tensor takes the host path, as before
    assert not compare(monkeypatch, torch.zeros((2, K), dtype=torch.float16), layer)


@pytest.mark.cuda
@pytest.mark.skipif(not _CUDA.available, reason=f"cuda backend: {_CUDA.reason}")
def test_real_torch_direct_path_launches_only_the_plain_call(monkeypatch):
    """_cuda.mm_direct (ferrum.mm's compiled shortcut for torch a and out) takes the plain call
    -- and gives the general path's result -- and declines (None) every other, which then gets
    the general path's outcome: the same result or the same error."""
    torch = pytest.importorskip("torch")
    import ferrum._cuda as real_cuda
    monkeypatch.setattr(ferrum.cuda, "_cuda", real_cuda)
    if real_cuda.probe()["count"] != 1:
        pytest.skip("mm_direct serves one visible GPU only")
    rng = np.random.default_rng(11)
    prob = random_problem(rng, K, N, 128, experts=E)
    layer = ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=128,
                                          backend="cuda")
    stack = ferrum.load_stacked(prob.qweights, prob.scales, group_size=128, backend="cuda")
    dev = lambda x: torch.from_numpy(np.ascontiguousarray(x)).cuda()
    a_host = rng.standard_normal((5, K)).astype(np.float16)
    a = dev(a_host)
    for w in (layer, stack):       # resident now: the general path's first call made it so
        ferrum.mm(a, w, expert=0, out=torch.empty(5, N, dtype=torch.float16, device="cuda"))
    assert ferrum._registry.DIRECT_MM.get(torch.Tensor) is real_cuda.mm_direct

    def general(*args, **kwargs):
        return api._mm_checked(*args, **kwargs)

    # the plain calls: the direct path's result equals the general path's, bit for bit; on the
    # default stream and on a stream of torch's given as an int handle
    side = torch.cuda.Stream()
    for w, expert, cols, stream in ((layer, None, N, None), (layer, 0, N, 0), (stack, 2, N, None),
                                    (stack, None, E * N, side.cuda_stream)):
        out = torch.full((5, cols), float("nan"), dtype=torch.float16, device="cuda")
        torch.cuda.synchronize()
        assert real_cuda.mm_direct(a, w, expert, out, stream) is out
        torch.cuda.synchronize()
        want = general(a, w, expert, None, None, None).cpu().numpy()
        np.testing.assert_array_equal(out.cpu().numpy(), want)
        dense = prob.dense[0] if w is layer else (
            np.concatenate(prob.dense, axis=1) if expert is None else prob.dense[expert])
        ref = a_host.astype(np.float64) @ dense
        assert np.linalg.norm(want - ref) / np.linalg.norm(ref) <= 1e-3
    # and ferrum.mm takes it without reaching the backend's Python glue
    def no_glue(*args, **kwargs):
        raise AssertionError("the plain torch call went through CudaBackend.mm")
    monkeypatch.setattr(ferrum.cuda.BACKEND, "mm", no_glue)
    out = torch.empty(5, N, dtype=torch.float16, device="cuda")
    assert ferrum.mm(a, layer, out=out) is out
    assert ferrum.mm(a, layer, out=out, stream=side.cuda_stream) is out
    torch.cuda.synchronize()
    monkeypatch.undo()
    monkeypatch.setattr(ferrum.cuda, "_cuda", real_cuda)

    # everything else: declined, and ferrum.mm's outcome is the general path's
    f16 = dict(dtype=torch.float16, device="cuda")
    flat = torch.empty(5 * N + 8, **f16)
    shared = torch.empty(5 * K + 5 * N, **f16)     # a, and an out over a's last 64 values
    a_shared = shared[:5 * K].view(5, K)
    a_shared.copy_(a)
    declined = [
        ("out transposed", a, layer, None, torch.empty(N, 5, **f16).t(), {}),
        ("out misaligned", a, layer, None, flat[1:1 + 5 * N].view(5, N), {}),
        ("out float32", a, layer, None, torch.empty(5, N, dtype=torch.float32, device="cuda"), {}),
        ("out wrong shape", a, layer, None, torch.empty(5, N + 64, **f16), {}),
        ("out on the host", a, layer, None, torch.empty(5, N, dtype=torch.float16), {}),
        ("a on the host", a.cpu(), layer, None, torch.empty(5, N, **f16), {}),
        ("a strided", dev(rng.standard_normal((5, 2 * K)).astype(np.float16))[:, ::2], layer,
         None, torch.empty(5, N, **f16), {}),
        ("a wrong width", dev(a_host[:, :128]), layer, None, torch.empty(5, N, **f16), {}),
        ("out overlaps a", a_shared, layer, None, shared[5 * K - 64:5 * K - 64 + 5 * N].view(5, N),
         {}),
        ("expert out of range", a, stack, E, torch.empty(5, N, **f16), {}),
        ("expert a bool", a, stack, True, torch.empty(5, N, **f16), {}),
        ("a host weight", a, layer.to("cpu"), None, torch.empty(5, N, **f16), {}),
        ("stream as an object", a, layer, None, torch.empty(5, N, **f16), {"stream": side}),
        ("stream negative", a, layer, None, torch.empty(5, N, **f16), {"stream": -1}),
        ("backend given", a, layer, None, torch.empty(5, N, **f16), {"backend": "cuda"}),
    ]
    for what, aa, w, expert, out, kwargs in declined:
        if "backend" not in kwargs:
            assert real_cuda.mm_direct(aa, w, expert, out, kwargs.get("stream")) is None, what
        got = _outcome(ferrum.mm, aa, w, expert=expert, out=out, **kwargs)
        want = _outcome(general, aa, w, expert, out, kwargs.get("backend"), kwargs.get("stream"))
        assert got[0] == want[0], (what, got, want)
        if got[0] != "ok":
            assert got[1] == want[1], what


@pytest.mark.cuda
@pytest.mark.skipif(not _CUDA.available, reason=f"cuda backend: {_CUDA.reason}")
def test_real_cupy_direct_path_launches_only_the_plain_call(monkeypatch):
    """The same for cupy arrays: mm_direct takes the plain call with the general path's
    result, and declines the rest, which gets the general path's outcome."""
    cupy = pytest.importorskip("cupy")
    import ferrum._cuda as real_cuda
    monkeypatch.setattr(ferrum.cuda, "_cuda", real_cuda)
    if real_cuda.probe()["count"] != 1:
        pytest.skip("mm_direct serves one visible GPU only")
    rng = np.random.default_rng(12)
    prob = random_problem(rng, K, N, 64, experts=E)
    layer = ferrum.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0], group_size=64,
                                          backend="cuda")
    stack = ferrum.load_stacked(prob.qweights, prob.scales, group_size=64, backend="cuda")
    a_host = rng.standard_normal((3, K)).astype(np.float16)
    a = cupy.asarray(a_host)
    for w in (layer, stack):
        ferrum.mm(a, w, expert=0, out=cupy.empty((3, N), np.float16))
    assert ferrum._registry.DIRECT_MM.get(cupy.ndarray) is real_cuda.mm_direct
    for w, expert, cols in ((layer, None, N), (stack, 1, N), (stack, None, E * N)):
        out = cupy.full((3, cols), np.nan, np.float16)
        assert real_cuda.mm_direct(a, w, expert, out, None) is out
        want = cupy.asnumpy(api._mm_checked(a, w, expert, None, None, None))
        np.testing.assert_array_equal(cupy.asnumpy(out), want)
        dense = prob.dense[0] if w is layer else (
            np.concatenate(prob.dense, axis=1) if expert is None else prob.dense[expert])
        ref = a_host.astype(np.float64) @ dense
        assert np.linalg.norm(want - ref) / np.linalg.norm(ref) <= 1e-3
    flat = cupy.empty(3 * N + 8, np.float16)
    shared = cupy.empty(3 * K + 3 * N, np.float16)
    a_shared = shared[:3 * K].reshape(3, K)
    a_shared[...] = a
    declined = [
        ("out transposed", a, layer, cupy.empty((N, 3), np.float16).T),
        ("out misaligned", a, layer, flat[1:1 + 3 * N].reshape(3, N)),
        ("out float32", a, layer, cupy.empty((3, N), np.float32)),
        ("a strided", cupy.asarray(rng.standard_normal((3, 2 * K)).astype(np.float16))[:, ::2],
         layer, cupy.empty((3, N), np.float16)),
        ("out overlaps a", a_shared, layer, shared[3 * K - 64:3 * K - 64 + 3 * N].reshape(3, N)),
    ]
    try:
        import torch
        declined.append(("out a torch tensor", a, layer,
                         torch.empty(3, N, dtype=torch.float16, device="cuda")))
    except ImportError:
        pass
    for what, aa, w, out in declined:
        assert real_cuda.mm_direct(aa, w, None, out, None) is None, what
        got = _outcome(ferrum.mm, aa, w, out=out)
        want = _outcome(api._mm_checked, aa, w, None, out, None, None)
        assert got[0] == want[0], (what, got, want)
        if got[0] != "ok":
            assert got[1] == want[1], what
