"""The cuda backend's host code (ferrum/cuda.py) on the stub CUDA layer: streams, layouts,
devices, read-only and overlapping outputs. No GPU needed: launches, copies, waits and device
switches are recorded by tests/fake_device.StubCuda, and the arrays are stand-ins (torch and
cupy ones only where the real library is absent). The same behaviour on a GPU is checked in
tests/test_cuda.py. The tests at the end need the compiled extension, not a GPU: they call C
API entry points whose argument checks run before any CUDA call.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import ferrum
import ferrum.cuda
from ferrum.check import random_problem

import fake_device as FD

K, N, E = 256, 128, 3


@pytest.fixture(scope="module")
def fakes():
    with FD.fake_modules() as made:
        yield made


@pytest.fixture(scope="module")
def host_weights():
    rng = np.random.default_rng(3)
    single = random_problem(rng, K, N, 64)
    stacked = random_problem(rng, K, N, 128, experts=E)
    layer = ferrum.MarlinWeight.from_gptq(single.qweights[0], single.scales[0], group_size=64)
    stack = ferrum.load_stacked(stacked.qweights, stacked.scales, group_size=128)
    return layer, stack


@pytest.fixture
def stub(fakes):
    with FD.stub_cuda() as s:
        yield s


@pytest.fixture
def layer(stub, host_weights):
    return host_weights[0].to("cuda")


@pytest.fixture
def stack(stub, host_weights):
    return host_weights[1].to("cuda")


def _torch(fakes):
    if fakes["torch"] is None:
        pytest.skip("the real torch is installed here; tests/test_cuda.py covers it")
    return fakes["torch"]


def _cupy(fakes):
    if fakes["cupy"] is None:
        pytest.skip("the real cupy is installed here; tests/test_cuda.py covers it")
    return fakes["cupy"]


def raises(exc, argument, text=""):
    return pytest.raises(exc, match=rf"^{argument}=.*{text}")


def _launch(stub):
    """(a pointer, c pointer, stream, device) of the one recorded launch."""
    assert len(stub.launches) == 1, stub.launches
    args = stub.launches[0]
    return args[0], args[3], args[13], args[19]


# --- streams -------------------------------------------------------------------------------------

class _NumbaLikeStream:
    """As numba.cuda's Stream: .handle is a ctypes pointer, int(stream) the handle."""

    def __init__(self, value):
        self.handle = ctypes.c_void_p(value)

    def __int__(self):
        return self.handle.value or 0


class _CudaCoreLikeStream:
    def __init__(self, value):
        self.value = value

    def __cuda_stream__(self):
        return (0, self.value)


class _TorchLikeStream:
    def __init__(self, value):
        self.cuda_stream = value


@pytest.mark.parametrize("stream,handle", [
    (None, 0), (0, 0), (1, 1), (2, 2), (np.uint64(2 ** 64 - 1), 2 ** 64 - 1),
    (_NumbaLikeStream(0x5000), 0x5000), (_NumbaLikeStream(0), 0),
    (_CudaCoreLikeStream(0x6000), 0x6000), (_TorchLikeStream(0x7000), 0x7000)])
def test_stream_handles(stream, handle):
    assert ferrum.cuda._stream_handle(stream) == handle


@pytest.mark.parametrize("stream,exc", [
    (-1, ValueError), (2 ** 64, ValueError), (np.int64(-5), ValueError),
    (_TorchLikeStream(-3), ValueError), (np.bool_(True), TypeError),
    (True, TypeError), (1.0, TypeError), ("0", TypeError), (object(), TypeError),
    (np.float64(3.0), TypeError)])
def test_bad_streams_are_refused_before_any_work(layer, stub, stream, exc):
    a = FD.CAIArray((2, K))
    with raises(exc, "stream"):
        ferrum.mm(a, layer, stream=stream)
    with raises(exc, "stream"):
        ferrum.mm(np.zeros((2, K), np.float16), layer, stream=stream)
    assert stub.launches == [] and stub.copies == []


def test_stream_objects_reach_the_launch(layer, stub):
    ferrum.mm(FD.CAIArray((2, K)), layer, stream=_NumbaLikeStream(0x5000))
    assert _launch(stub)[2] == 0x5000


# --- outputs -------------------------------------------------------------------------------------

def test_host_a_with_a_device_out_returns_out(layer, stub, fakes):
    outs = [FD.CAIArray((2, N))]
    if fakes["torch"] is not None:
        outs.append(fakes["torch"].Tensor((2, N)))
    for out in outs:
        stub.launches.clear()
        got = ferrum.mm(np.ones((2, K), np.float16), layer, out=out)
        assert got is out
        assert _launch(stub)[1] == ferrum.cuda._fast_view(out, 0, 0, writable=True)[0]


def test_read_only_cai_out_is_refused(layer, stub):
    a = FD.CAIArray((2, K))
    out = FD.CAIArray((2, N), read_only=True)
    with raises(ValueError, "out", "read-only"):
        ferrum.mm(a, layer, out=out)
    with raises(ValueError, "out", "read-only"):
        ferrum.cuda.BACKEND.mm(a, layer, 0, out)
    assert stub.launches == []
    ferrum.mm(FD.CAIArray((2, K), read_only=True), layer)   # a read-only input is fine
    assert len(stub.launches) == 1


@pytest.mark.parametrize("argument", ["a", "out"])
def test_masked_and_unknown_cai_arrays_are_refused(layer, stub, argument):
    masked = {"a": FD.CAIArray((2, K), mask=FD.CAIArray((2, K), np.bool_)),
              "out": FD.CAIArray((2, N), mask=FD.CAIArray((2, N), np.bool_))}
    odd = {"a": FD.CAIArray((2, K), typestr="<zz"), "out": FD.CAIArray((2, N), typestr="<zz")}
    for bad, exc, text in ((masked, ValueError, "mask"), (odd, TypeError, "typestr")):
        kwargs = {"a": bad["a"], "out": None} if argument == "a" else \
            {"a": FD.CAIArray((2, K)), "out": bad["out"]}
        with raises(exc, argument, text):
            ferrum.mm(kwargs["a"], layer, out=kwargs["out"])
    assert stub.launches == []


def test_cai_typestr_spellings(layer, stub):
    """float16 spelled '<f2', '|f2', '=f2', '<e' is float16; big-endian '>f2' is not."""
    for typestr in ("<f2", "|f2", "=f2", "<e"):
        ferrum.mm(FD.CAIArray((2, K), typestr=typestr), layer,
                  out=FD.CAIArray((2, N), typestr=typestr))
    assert len(stub.launches) == 4
    with raises(TypeError, "a", "float16, got >f2"):
        ferrum.mm(FD.CAIArray((2, K), typestr=">f2"), layer)
    with raises(TypeError, "out", "float16, got >f2"):
        ferrum.mm(FD.CAIArray((2, K)), layer, out=FD.CAIArray((2, N), typestr=">f2"))
    assert len(stub.launches) == 4


@pytest.mark.parametrize("offset", [0, 64, -2 * N * 2 + 16])
def test_out_overlapping_a_is_refused(layer, stub, offset):
    a = FD.CAIArray((2, K))
    out = FD.CAIArray((2, N), ptr=a.ptr + offset)
    with raises(ValueError, "out", "overlaps a"):
        ferrum.mm(a, layer, out=out)
    assert stub.launches == []
    ferrum.mm(a, layer, out=FD.CAIArray((2, N), ptr=a.ptr + 2 * K * 2))   # just past a
    assert len(stub.launches) == 1


def test_out_overlapping_the_weight_is_refused(stack, stub):
    a = FD.CAIArray((2, K))
    for target in (stack.qweight.ptr + 4096, stack.scales.ptr):
        with raises(ValueError, "out", "overlaps the weight"):
            ferrum.mm(a, stack, expert=1, out=FD.CAIArray((2, N), ptr=target))
    assert stub.launches == []


def test_out_must_be_contiguous_and_aligned(layer, stub, fakes):
    a = FD.CAIArray((2, K))
    with raises(ValueError, "out", "C-contiguous"):
        ferrum.mm(a, layer, out=FD.CAIArray((2, N), strides=(4 * N, 2)))
    with raises(ValueError, "out", "16-byte boundary"):
        ferrum.mm(a, layer, out=FD.CAIArray((2, N), ptr=0x7E0000000008))
    if fakes["torch"] is not None:
        with raises(ValueError, "out", "C-contiguous"):
            ferrum.mm(a, layer, out=fakes["torch"].Tensor((2, N), contiguous=False))
    assert stub.launches == [] and stub.copies == []
    ferrum.mm(a, layer, out=FD.CAIArray((2, N), strides=(2 * N, 2)))   # C strides, spelled out
    ferrum.mm(FD.CAIArray((1, K)), layer, out=FD.CAIArray((1, N), strides=(12345, 2)))
    assert len(stub.launches) == 2 and stub.copies == []


# --- input layouts: copied on the call's stream ------------------------------------------------

def test_strided_or_misaligned_inputs_are_copied_on_the_call_stream(layer, stub, fakes):
    cases = [("CAI every other column", FD.CAIArray((3, K), strides=(4 * K, 4)), (4 * K, 4)),
             ("CAI transposed", FD.CAIArray((3, K), strides=(2, 6)), (2, 6)),
             ("CAI at an odd address", FD.CAIArray((3, K), ptr=0x7E0000000002), (2 * K, 2)),
             ("DLPack strided", FD.DLPackArray((3, K), strides=(4 * K, 2)), (4 * K, 2))]
    if fakes["torch"] is not None:
        cases.append(("torch view", fakes["torch"].Tensor((3, K), contiguous=False), (4 * K, 4)))
        cases.append(("torch transposed", fakes["torch"].Tensor((3, K), contiguous=False,
                                                                   strides=(1, 3)), (2, 6)))
    if fakes["cupy"] is not None:
        cases.append(("cupy view", fakes["cupy"].ndarray((3, K), contiguous=False), (4 * K, 4)))
    for what, a, strides in cases:
        stub.launches.clear()
        stub.copies.clear()
        ferrum.mm(a, layer, stream=0x9000)
        assert len(stub.copies) == 1, what
        src, dst, shape, got_strides, itemsize, stream = stub.copies[0]
        src_ptr = a.ptr if hasattr(a, "ptr") else ferrum.cuda._describe(a, 0, "a")[0]
        assert (src, shape, got_strides, itemsize, stream) == (src_ptr, (3, K), strides, 2, 0x9000), what
        a_ptr, _, launch_stream, _ = _launch(stub)
        assert a_ptr == dst and launch_stream == 0x9000, what


def test_contiguous_aligned_inputs_are_not_copied(layer, stub, fakes):
    arrays = [FD.CAIArray((3, K)), FD.CAIArray((3, K), strides=(2 * K, 2)),
              FD.CAIArray((1, K), strides=(7, 2)), FD.DLPackArray((3, K))]
    if fakes["torch"] is not None:
        arrays.append(fakes["torch"].Tensor((3, K)))
    if fakes["cupy"] is not None:
        arrays.append(fakes["cupy"].ndarray((3, K)))
    for a in arrays:
        ferrum.mm(a, layer)
    assert stub.copies == [] and len(stub.launches) == len(arrays)


# --- devices -------------------------------------------------------------------------------------

def test_arrays_on_another_gpu_are_refused(layer, stub, fakes):
    a1 = FD.CAIArray((2, K))
    stub.pointer_devices[a1.ptr] = (2, 1)
    with raises(ValueError, "a", "cuda:1 but the weight is on cuda:0"):
        ferrum.mm(a1, layer)
    out1 = FD.CAIArray((2, N))
    stub.pointer_devices[out1.ptr] = (2, 1)
    with raises(ValueError, "out", "cuda:1"):
        ferrum.mm(FD.CAIArray((2, K)), layer, out=out1)
    with raises(ValueError, "a", "cuda:1"):
        ferrum.mm(FD.DLPackArray((2, K), device_id=1), layer)
    if fakes["torch"] is not None:
        with raises(ValueError, "a", "cuda:1"):
            ferrum.mm(fakes["torch"].Tensor((2, K), device_index=1), layer)
    if fakes["cupy"] is not None:
        with raises(ValueError, "a", "cuda:1"):
            ferrum.mm(fakes["cupy"].ndarray((2, K), device_index=1), layer)
    host = FD.CAIArray((2, K))
    stub.pointer_devices[host.ptr] = (0, -1)
    with raises(ValueError, "a", "not CUDA memory"):
        ferrum.mm(host, layer)
    assert stub.launches == [] and stub.device_log == []
    managed = FD.CAIArray((2, K))
    stub.pointer_devices[managed.ptr] = (3, 1)   # managed memory: any GPU may read it
    ferrum.mm(managed, layer)
    assert len(stub.launches) == 1


def test_the_weights_gpu_is_made_current_for_the_call(stub, host_weights):
    weight = host_weights[0].to("cuda")
    stub.pointer_devices[weight.qweight.ptr] = (2, 1)
    stub.pointer_devices[weight.scales.ptr] = (2, 1)
    a = FD.CAIArray((2, K))
    stub.pointer_devices[a.ptr] = (2, 1)
    assert stub.current == 0
    ferrum.cuda.BACKEND._resident(weight)   # its perm, copies and waits are made on GPU 1 too
    assert stub.device_log == [1, 0]
    stub.device_log.clear()
    ferrum.mm(a, weight)
    assert stub.device_log == [1, 0] and stub.current == 0
    assert _launch(stub)[3] == 1
    stub.device_log.clear()
    with raises(ValueError, "a", "cuda:0 but the weight is on cuda:1"):
        ferrum.mm(FD.CAIArray((2, K)), weight)
    assert stub.device_log == [1, 0] and stub.current == 0   # restored after the error too


def test_with_one_gpu_mm_asks_no_device_questions(stub, host_weights, fakes):
    # One GPU visible: every device array is on it, so the call skips the current-device query
    # and the arrays' device reads (host overhead), and launches as before.
    stub.gpus = 1
    weight = host_weights[0].to("cuda")
    a, out = FD.CAIArray((2, K)), FD.CAIArray((2, N))
    ferrum.mm(a, weight, out=out)           # the first call makes the weight resident
    asked = []
    stub.get_device = lambda: asked.append(1) or stub.current
    assert ferrum.mm(a, weight, out=out) is out
    assert asked == [] and len(stub.launches) == 2
    if fakes["torch"] is not None:
        torch = fakes["torch"]
        ta = torch.empty((2, K), dtype=torch.float16, device="cuda")
        tout = torch.empty((2, N), dtype=torch.float16, device="cuda")
        ta.get_device = tout.get_device = lambda: pytest.fail("get_device read with one GPU")
        assert ferrum.mm(ta, weight, out=tout) is tout
        assert asked == [] and len(stub.launches) == 3


def test_a_weights_arrays_must_share_a_gpu(stub, host_weights):
    weight = host_weights[0].to("cuda")
    stub.pointer_devices[weight.scales.ptr] = (2, 1)
    with raises(ValueError, "scales", "cuda:1 but qweight is on cuda:0"):
        ferrum.mm(FD.CAIArray((2, K)), weight)
    assert stub.launches == []


# --- device weights ------------------------------------------------------------------------------

def _device_weight(stub, **cai):
    q = FD.CAIArray((K // 16, 2 * N), np.int32, **cai)
    s = FD.CAIArray((K // 64, N), np.float16)
    return ferrum.MarlinWeight(q, s, size_k=K, size_n=N, group_size=64), q


def test_device_weight_producer_streams_are_waited_for_once(stub):
    weight, q = _device_weight(stub, stream=0x4400)
    ferrum.mm(FD.CAIArray((2, K)), weight, stream=0x9000)
    ferrum.mm(FD.CAIArray((2, K)), weight, stream=0x9000)
    # waited on the legacy stream and then synchronized, so any stream sees the weights
    assert stub.waits == [(0, 0x4400)] and stub.syncs == [0]
    assert [args[17] for args in stub.launches] == [1, 0]   # weights_pending on the first call


def test_strided_device_weights_are_copied_once(stub):
    weight, q = _device_weight(stub, strides=(8 * 2 * N, 4))
    ferrum.mm(FD.CAIArray((2, K)), weight)
    ferrum.mm(FD.CAIArray((2, K)), weight)
    assert [c[:1] + c[2:] for c in stub.copies] == [(q.ptr, (K // 16, 2 * N), (8 * 2 * N, 4), 4, 0)]
    assert stub.syncs == [0]
    assert stub.launches[0][1] == stub.copies[0][1]


def test_plain_device_weights_need_no_synchronization(stub):
    weight, q = _device_weight(stub)
    ferrum.mm(FD.CAIArray((2, K)), weight)
    assert stub.syncs == [] and stub.waits == [] and stub.launches[0][1] == q.ptr


# --- results allocated by the array's library ----------------------------------------------------

def test_torch_result_belongs_to_the_call_stream(layer, stub, fakes):
    torch = _torch(fakes)
    a = torch.Tensor((2, K))
    assert ferrum.mm(a, layer).alloc_stream == 0
    side = torch.cuda.Stream()
    assert ferrum.mm(a, layer, stream=side).alloc_stream == side.cuda_stream
    assert ferrum.mm(a, layer, stream=0x4321).alloc_stream == 0x4321
    with torch.cuda.stream(side):   # the current stream is the call's: a plain allocation
        got = ferrum.mm(a, layer, stream=side.cuda_stream)
        assert got.alloc_stream == side.cuda_stream
        assert ferrum.mm(a, layer).alloc_stream == 0    # the call runs on the legacy stream
        assert ferrum.mm(a, layer, stream=1).alloc_stream == 0
    assert [launch[13] for launch in stub.launches] == [0, side.cuda_stream, 0x4321,
                                                        side.cuda_stream, 0, 1]


def test_cupy_result_belongs_to_the_call_stream(layer, stub, fakes):
    cupy = _cupy(fakes)
    a = cupy.ndarray((2, K))
    assert ferrum.mm(a, layer).alloc_stream == 0
    assert ferrum.mm(a, layer, stream=0x4321).alloc_stream == 0x4321
    assert ferrum.mm(a, layer, stream=2).alloc_stream == 2
    with cupy.cuda.Stream() as side:
        assert ferrum.mm(a, layer).alloc_stream == 0
        assert ferrum.mm(a, layer, stream=side).alloc_stream == side.ptr


# --- the compiled extension's argument checks (no GPU needed) ------------------------------------

_cuda = ferrum.cuda._cuda if ferrum.cuda._IMPORT_ERROR is None else None
needs_extension = pytest.mark.skipif(_cuda is None, reason="ferrum._cuda is not built here")


def _real_cuda():
    import importlib
    return importlib.import_module("ferrum._cuda")


@needs_extension
def test_empty_counts_bytes_without_wrapping():
    cu = _real_cuda()
    with pytest.raises(MemoryError, match="bytes"):
        cu.empty((1 << 40, 1 << 40), np.float16)   # 2**81 bytes: a size_t product would wrap
    with pytest.raises(ValueError, match="negative"):
        cu.empty((4, -1), np.float16)


@needs_extension
@pytest.mark.parametrize("args,message", [
    ({"expert0": -1}, "expert0=-1"),
    ({"num_groups": 0}, "num_groups=0"),
    ({"size_k": 100}, "size_k=100"),
    ({"num_experts": 0}, "num_experts=0"),
    ({"a": 0x1000 + 2}, "16-byte aligned"),
    ({"c": 0x3000 + 8}, "16-byte aligned"),
    ({"perm": 0x4000 + 2}, "perm must be 4-byte aligned"),
    ({"ldc": 100}, "ldc=100"),
])
def test_mm_c_api_refuses_bad_arguments(args, message):
    cu = _real_cuda()
    call = {"a": 0x1000, "b": 0x2000, "scales": 0x2800, "c": 0x3000, "perm": 0, "size_m": 4,
            "size_k": 256, "size_n": 128, "expert0": 0, "num_experts": 1, "num_groups": 1,
            "group_size": 256, "ldc": 128}
    call.update(args)
    with pytest.raises(ValueError, match=message):
        cu.mm(*call.values(), 0, device=0)   # device given: no CUDA call before the checks


@needs_extension
def test_copy_and_repack_c_api_refuse_bad_arguments():
    cu = _real_cuda()
    with pytest.raises(ValueError, match="negative extent"):
        cu.copy_strided(0x1000, 0x2000, (2, -1), (2, 2), 2)
    with pytest.raises(ValueError, match="elem_bytes=0"):
        cu.copy_strided(0x1000, 0x2000, (2, 2), (4, 2), 0)
    with pytest.raises(ValueError, match="up to 3 dims"):
        cu.copy_strided(0x1000, 0x2000, (1, 2, 2, 2), (8, 8, 4, 2), 2)
    cu.copy_strided(0, 0, (0, 5), (10, 2), 2)   # nothing to copy: no launch
    with pytest.raises(ValueError, match="4-byte aligned"):
        cu.repack(0x1002, 0, 0x2000, 128, 64)
    with pytest.raises(ValueError, match="nbytes=24"):
        cu.stream_probe(0x1000, 0x2000, 24)
    with pytest.raises(ValueError, match="nbytes=0"):
        cu.stream_probe(0x1000, 0, 0)
    with pytest.raises(ValueError, match="16-byte aligned"):
        cu.stream_probe(0x1008, 0x2000, 64)
    with pytest.raises(ValueError, match="16-byte aligned"):
        cu.stream_probe(0x1000, 0x2004, 64)
    with pytest.raises(ValueError, match="sm_blocks=9"):
        cu.stream_probe(0x1000, 0x2000, 64, 9)


@needs_extension
def test_no_driver_is_reported_as_such():
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        pass
    else:
        pytest.skip("an NVIDIA driver is installed here")
    reason = ferrum.cuda.CudaBackend().info().reason
    assert "no NVIDIA driver found" in reason, reason
