"""The CUDA backend: ferrum's Marlin library (csrc/) through the Cython layer ferrum._cuda.

Importing this module never fails: without the compiled extension or without a GPU, ``info()``
says why. Arrays: numpy inputs are copied to the GPU and the result comes back as numpy; device
inputs (``__cuda_array_interface__`` or DLPack: PyTorch, CuPy, Numba, ferrum's own DeviceArray)
stay on the GPU, and the result is allocated by the library of ``a`` (torch or cupy) or is a
ferrum DeviceArray (a torch or cupy result is allocated as belonging to the stream the call
runs on). Streams: ``stream=`` takes an int handle or an object carrying one; the default is
the legacy default stream. A generic ``__cuda_array_interface__`` input whose ``stream`` field
names another stream is waited for (CAI v3); PyTorch and CuPy arrays are read through their
fast attributes, so work queued on another stream must be ordered by the caller (pass
``stream=``).

Layouts: an input that is not C-contiguous (a[:, ::2], a transposed tensor, a padded row
slice) or whose data does not start on a 16-byte boundary (a[1:] of a flat buffer) is copied
into a contiguous buffer first, on the call's stream; ``out`` must be usable in place
(contiguous, aligned, writable, not overlapping ``a`` or the weight), else ValueError. Every
array must be on the weight's GPU; that GPU is made current for the call.

On sm_90 an mm starts streaming its weights before the kernel before it on the stream has
finished (programmatic dependent launch; A, C and the workspace wait for it). The weights must
therefore not be written by that kernel: a MarlinWeight's first call waits, since its arrays may
have just been made on the device; a weight rewritten in place on the device later needs a new
MarlinWeight (or ``FERRUM_NO_PDL=1``).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any

import numpy as np

from . import _registry
from ._registry import Backend, BackendInfo
from .api import _fail, _short
from .errors import CudaError

try:
    from . import _cuda
    _IMPORT_ERROR: Exception | None = None
    _cuda.set_error_class(CudaError)
except ImportError as exc:   # not built (no nvcc at install time) or a broken build
    _cuda = None
    _IMPORT_ERROR = exc

__all__ = ["BACKEND", "CudaBackend", "CudaError", "DeviceArray", "run_bench"]

DeviceArray = _cuda.DeviceArray if _cuda is not None else None
_F16 = np.dtype(np.float16)


_ALIGN = 16   # the mm kernels move A, C, B and the scales 16 bytes at a time
_MAX_HANDLE = 1 << 64


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _stream_handle(stream: Any) -> int:
    """An int cudaStream_t from an int or an object carrying one: ``__cuda_stream__`` (CUDA
    Python), ``.cuda_stream`` (PyTorch), ``.ptr`` (CuPy), ``int(stream)`` (Numba, CUDA Python's
    CUstream). 0 is the legacy default stream, as are 1 (cudaStreamLegacy); 2 is the calling
    thread's per-thread default stream (cudaStreamPerThread)."""
    if stream is None:
        return 0
    if _is_int(stream):
        value = int(stream)
    else:
        value = _stream_object_handle(stream)
    if not 0 <= value < _MAX_HANDLE:
        raise ValueError(f"stream={stream!r}: a cudaStream_t handle is an integer in 0..2**64-1 "
                         f"(0 or 1: the legacy default stream, 2: the per-thread default stream), "
                         f"got {value}")
    return value


def _stream_object_handle(stream: Any) -> int:
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        value = protocol() if callable(protocol) else protocol
        value = value[1] if isinstance(value, tuple) and len(value) == 2 else value
        if _is_int(value):
            return int(value)
    for attr in ("cuda_stream", "ptr", "handle"):
        value = getattr(stream, attr, None)
        if _is_int(value):
            return int(value)
    # Numba's streams (whose .handle is a ctypes pointer) and CUDA Python's CUstream convert
    # with int(); numbers that are not integers do not name a stream.
    if not isinstance(stream, (bool, np.bool_, float, complex, str, bytes, np.floating,
                               np.complexfloating)) and hasattr(type(stream), "__int__"):
        try:
            return int(stream)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"stream={_short(stream)}: expected an int cudaStream_t or an object carrying "
                    "one (.cuda_stream, .ptr, __cuda_stream__, or int(stream))")


def _library(x: Any) -> str:
    module = type(x).__module__
    return module.split(".", 1)[0]


def _c_strides(shape: tuple, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for s in reversed(shape):
        strides.append(step)
        step *= s
    return tuple(reversed(strides))


def _is_c_contiguous(shape: tuple, strides: tuple, itemsize: int) -> bool:
    """Whether byte `strides` lay `shape` out C-contiguously (a dim of extent 1 may have any
    stride; an empty array is contiguous)."""
    if len(strides) != len(shape):
        return False
    if any(s == 0 for s in shape):
        return True
    step = itemsize
    for extent, stride in zip(reversed(shape), reversed(strides)):
        if extent != 1 and stride != step:
            return False
        step *= extent
    return True


def _array_device(x: Any, argument: str) -> int | None:
    """The device ordinal x's memory is on, or None where any device may read it (managed or
    pinned host memory) or it cannot be told."""
    if DeviceArray is not None and type(x) is DeviceArray:
        return x.device
    lib = _library(x)
    if lib == "torch" and x.is_cuda:
        return x.get_device()
    if lib == "cupy":
        return x.device.id
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        ptr = int(cai["data"][0])
        return _pointer_device(ptr, argument, x) if ptr else None
    dl = getattr(x, "__dlpack_device__", None)
    if dl is not None:
        return int(dl()[1])
    return None


def _pointer_device(ptr: int, argument: str, x: Any) -> int | None:
    kind, device = _cuda.pointer_device(ptr)
    if kind == 0:
        _fail(argument, x, f"its __cuda_array_interface__ data pointer {ptr:#x} is not CUDA "
              "memory (an unregistered host address)")
    return device if kind == 2 else None


def _describe(x: Any, stream: int, argument: str) -> tuple:
    """(pointer, shape, dtype, byte strides or None when C-contiguous, device or None,
    read-only, keepalive, waited) of a device array. A __cuda_array_interface__ producer's
    stream is waited for on `stream` (CAI v3: the consumer synchronizes on the producer's
    stream unless it is None; 1 is the legacy default stream, which ferrum calls 0); a DLPack
    producer is handed `stream` and orders its own work. `waited`: a wait was queued."""
    if DeviceArray is not None and type(x) is DeviceArray:
        return x.ptr, x.shape, x.dtype, None, x.device, False, x, False
    lib = _library(x)
    if lib == "torch" and x.is_cuda:
        dtype = np.dtype(str(x.dtype).rsplit(".", 1)[-1])
        shape = tuple(x.shape)
        strides = None if x.is_contiguous() else tuple(st * dtype.itemsize for st in x.stride())
        return x.data_ptr(), shape, dtype, strides, x.get_device(), False, x, False
    if lib == "cupy":
        shape = tuple(x.shape)
        strides = None if x.flags.c_contiguous else tuple(x.strides)
        return x.data.ptr, shape, x.dtype, strides, x.device.id, False, x, False
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        shape = tuple(int(s) for s in cai["shape"])
        try:
            dtype = np.dtype(cai["typestr"])
        except TypeError:
            _fail(argument, x, f"has __cuda_array_interface__ typestr {cai['typestr']!r}, which "
                  "is not a numpy type string", TypeError)
        if cai.get("mask") is not None:
            _fail(argument, x, "has a __cuda_array_interface__ mask; masked arrays are not "
                  "supported")
        strides = cai.get("strides")
        if strides is not None:
            strides = tuple(int(st) for st in strides)
            if _is_c_contiguous(shape, strides, dtype.itemsize):
                strides = None
        ptr, read_only = int(cai["data"][0]), bool(cai["data"][1])
        if not ptr and all(shape):
            _fail(argument, x, "has a null __cuda_array_interface__ data pointer")
        waited = False
        producer = cai.get("stream")
        if producer == 0:   # disallowed by CAI v3 (ambiguous); taken as the legacy stream
            producer = 1
        if producer is not None and producer != (1 if stream == 0 else stream):
            _cuda.stream_wait(stream, 0 if producer == 1 else producer)
            waited = True
        device = _pointer_device(ptr, argument, x) if ptr else None
        return ptr, shape, dtype, strides, device, read_only, x, waited
    if hasattr(x, "__dlpack__"):
        ptr, shape, dtype, strides, device, capsule = _cuda.dlpack_view(x, stream)
        return ptr, shape, dtype, strides, device, False, (x, capsule), False
    raise TypeError(f"{argument}={_short(x)}: is not a CUDA array (no __cuda_array_interface__ "
                    "or __dlpack__)")


def _device_view(x: Any, stream: int, device: int | None = None, argument: str = "array",
                 writable: bool = False, align: int = _ALIGN,
                 queued: list | None = None) -> tuple[int, tuple, np.dtype, Any]:
    """(pointer, shape, dtype, keepalive) of a device array the kernels can use as it is: on
    `device` (when given), C-contiguous and `align`-byte aligned. An input that is strided or
    misaligned is copied into a new C-contiguous array on `stream` (the keepalive holds the
    copy); an output (`writable`) that is not usable in place is refused, as is a read-only
    one. `queued` (a list) gets True appended when a wait or a copy was queued on `stream`."""
    ptr, shape, dtype, strides, dev, read_only, keep, waited = _describe(x, stream, argument)
    if queued is not None and waited:
        queued.append(True)
    if device is not None and dev is not None and dev != device:
        _fail(argument, x, f"is on cuda:{dev} but the weight is on cuda:{device}; ferrum does not "
              "copy between GPUs (move it with the array's own library)")
    if writable:
        if read_only:
            _fail(argument, x, "is read-only (its __cuda_array_interface__ says so), so it cannot "
                  "receive the result")
        if strides is not None:
            _fail(argument, x, f"must be C-contiguous to receive the result in place; its byte "
                  f"strides are {strides}")
        if ptr % align:
            _fail(argument, x, f"must start on a {align}-byte boundary to receive the result in "
                  f"place; its data pointer is {ptr:#x}")
        return ptr, shape, dtype, keep
    if strides is None and not ptr % align:
        return ptr, shape, dtype, keep
    copy = _cuda.empty(shape, dtype)
    _cuda.copy_strided(ptr, copy.ptr, shape,
                       strides if strides is not None else _c_strides(shape, dtype.itemsize),
                       dtype.itemsize, stream)
    copy.stream = stream
    if queued is not None:
        queued.append(True)
    return copy.ptr, shape, dtype, (copy, keep)


@contextlib.contextmanager
def _on_device(device: int | None):
    """Make `device` current for the block (where ferrum allocates and launches)."""
    current = _cuda.get_device()
    if device is None or device == current:
        yield
        return
    _cuda.set_device(device)
    try:
        yield
    finally:
        _cuda.set_device(current)


def _empty_like_lib(a: Any, shape: tuple, stream: int, stream_obj: Any) -> Any:
    """A float16 result allocated by the library `a` came from (torch, cupy), else ferrum's.

    The libraries' caching allocators hand out memory by stream: a block freed on stream P is
    given to the next allocation on P at once, however much of P's work on it is still queued.
    So the result is allocated as belonging to the stream ferrum writes it on (an allocation
    on another stream could be written while that stream's earlier work still uses it)."""
    lib = _library(a)
    if lib == "torch":
        torch = sys.modules["torch"]
        device = a.device
        if _torch_current_stream(torch, a) == (0 if stream == 1 else stream):
            return torch.empty(shape, dtype=torch.float16, device=device)
        if isinstance(stream_obj, torch.cuda.Stream):
            target = stream_obj
        elif stream in (0, 1):
            target = torch.cuda.default_stream(device)
        else:
            target = torch.cuda.ExternalStream(stream, device=device)
        with torch.cuda.stream(target):
            return torch.empty(shape, dtype=torch.float16, device=device)
    if lib == "cupy":
        cupy = sys.modules["cupy"]
        if cupy.cuda.get_current_stream().ptr == (0 if stream == 1 else stream):
            return cupy.empty(shape, dtype=np.float16)
        if stream in (0, 1):
            target = cupy.cuda.Stream.null
        elif stream == 2:
            target = cupy.cuda.Stream.ptds
        else:
            target = cupy.cuda.ExternalStream(stream)
        with target:
            return cupy.empty(shape, dtype=np.float16)
    return _cuda.empty(shape, _F16)


def _torch_current_stream(torch: Any, a: Any) -> int:
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)   # a few hundred ns less
    if raw is not None:
        return int(raw(a.get_device()))
    return int(torch.cuda.current_stream(a.device).cuda_stream)


def _overlap_error(out: Any, c_ptr: int, c_end: int, a_ptr: int, a_bytes: int, r: Any):
    if c_ptr < a_ptr + a_bytes and a_ptr < c_end:
        _fail("out", out, "overlaps a in device memory; the product cannot be written over its "
              "own input")
    _fail("out", out, "overlaps the weight's qweight or scales in device memory")


class _Resident:
    """Device pointers and sizes of one MarlinWeight, cached in weight._aux["cuda"]. (The
    compiled module's Resident, with the same fields typed, where there is one: see
    _enable_direct.)"""
    __slots__ = ("b", "s", "perm", "perm_array", "keep", "size_k", "size_n", "groups",
                 "group_size", "num_experts", "pending", "device", "b_end", "s_end", "only_gpu",
                 "perm_stride")


def _enable_direct() -> None:
    """Route ferrum.mm's plain torch and cupy calls (out= given, an int stream or none) to
    _cuda.mm_direct, which checks and launches them in C; anything it does not take comes back
    to the general path. Called once a weight is resident, and when mm first meets a torch or
    cupy type (either may be imported only after the weights were placed)."""
    direct = getattr(_cuda, "mm_direct", None)
    if direct is None:
        return
    torch, cupy = sys.modules.get("torch"), sys.modules.get("cupy")
    tensor, ndarray = getattr(torch, "Tensor", None), getattr(cupy, "ndarray", None)
    wanted = [t for t in (tensor, ndarray)
              if isinstance(t, type) and _registry.DIRECT_MM.get(t) is not direct]
    if not wanted:
        return
    from .api import MarlinWeight
    _cuda.enable_direct(MarlinWeight, tensor if tensor in wanted else None,
                        getattr(torch, "float16", None), ndarray if ndarray in wanted else None)
    for t in wanted:
        _registry.DIRECT_MM[t] = direct


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self):
        self._info: BackendInfo | None = None
        self._lock = threading.Lock()

    # --- status -----------------------------------------------------------------------------
    def info(self) -> BackendInfo:
        if self._info is None:
            self._info = self._probe()
        return self._info

    def _probe(self) -> BackendInfo:
        if _cuda is None:
            return BackendInfo("cuda", False, f"not built: ferrum._cuda could not be imported "
                               f"({_IMPORT_ERROR}); reinstall with nvcc on PATH or CUDA_HOME set")
        try:
            p = _cuda.probe()
        except CudaError as exc:
            return BackendInfo("cuda", False, f"no usable NVIDIA GPU or driver: {exc}")
        if p["major"] < 8:
            return BackendInfo("cuda", False, f"{p['name']} is sm_{p['major']}{p['minor']}; "
                               "ferrum's CUDA kernels need sm_80 or newer")
        def ver(v):
            return f"{v // 1000}.{v % 1000 // 10}"
        return BackendInfo("cuda", True, "", f"{p['name']} (sm_{p['major']}{p['minor']}, "
                           f"{p['sms']} SMs)", f"{_cuda.version()}, CUDA runtime "
                           f"{ver(p['runtime'])}, driver API {ver(p['driver'])}")

    # --- memory -----------------------------------------------------------------------------
    def from_host(self, array):
        return _cuda.from_host(np.ascontiguousarray(array))

    def to_host(self, resident):
        if isinstance(resident, np.ndarray):
            return resident.copy()
        if type(resident) is DeviceArray:
            return resident.copy_to_host()
        with _on_device(_array_device(resident, "array")):
            ptr, shape, dtype, keep = _device_view(resident, 0, align=1)
            _cuda.synchronize(0)
            return _cuda.to_host(ptr, shape, dtype, 0)

    def owns(self, array):
        if isinstance(array, np.ndarray):
            return False
        if DeviceArray is not None and type(array) is DeviceArray:
            return True
        lib = _library(array)
        if lib == "torch" and hasattr(array, "is_cuda"):   # torch builds its CAI dict per access
            return bool(array.is_cuda)
        if lib == "cupy" and hasattr(array, "data"):
            return True
        if hasattr(array, "__cuda_array_interface__"):
            return True
        device = getattr(array, "__dlpack_device__", None)
        if device is not None:
            try:
                return device()[0] == 2   # kDLCUDA
            except Exception:
                return False
        return False

    # --- kernels ----------------------------------------------------------------------------
    def repack(self, qweight, perm, size_k, size_n):
        host = isinstance(qweight, np.ndarray)
        with _on_device(None if host else _array_device(qweight, "qweight")):
            keep = []
            if host:
                src = _cuda.from_host(np.ascontiguousarray(qweight).view(np.int32))
                keep.append(src)
                src_ptr = src.ptr
            else:   # the kernel reads int32 words: 4-byte aligned, else a copy
                src_ptr, _, _, k = _device_view(qweight, 0, argument="qweight", align=4)
                keep.append(k)
            perm_ptr = 0
            if perm is not None:
                p = _cuda.from_host(np.ascontiguousarray(perm, dtype=np.int32))
                keep.append(p)
                perm_ptr = p.ptr
            out = _cuda.empty((size_k // 16, 2 * size_n), np.int32)
            _cuda.repack(src_ptr, perm_ptr, out.ptr, size_k, size_n, 0)
            _cuda.synchronize(0)   # the temporaries above may be freed once this returns
            out.stream = 0
            return out

    def _resident(self, weight) -> _Resident:
        r = weight._aux.get("cuda")
        if r is not None:
            return r
        with self._lock:
            r = weight._aux.get("cuda")
            if r is not None:
                return r
            device = _array_device(weight.qweight, "qweight")
            if device is None:
                device = _cuda.get_device()
            s_device = _array_device(weight.scales, "scales")
            if s_device is not None and s_device != device:
                _fail("scales", weight.scales, f"is on cuda:{s_device} but qweight is on "
                      f"cuda:{device}; a weight's arrays must be on one GPU")
            # A stack whose experts each have their own act-order order ([E, K] perm) takes the
            # Python class: its calls go one expert a launch (mm below), which the compiled
            # mm_direct, given only a Resident, never sees.
            per_expert = weight.perm is not None and weight.perm.ndim == 2
            r = _Resident() if per_expert else getattr(_cuda, "Resident", _Resident)()
            with _on_device(device):
                # A strided or misaligned weight array is copied (on the legacy default
                # stream); that, and any wait for a CAI producer's stream, completes here,
                # before a call on any stream reads the weights.
                queued = []
                r.b, _, _, kb = _device_view(weight.qweight, 0, device, "qweight", queued=queued)
                r.s, _, _, ks = _device_view(weight.scales, 0, device, "scales", queued=queued)
                if queued:
                    _cuda.synchronize(0)
                r.keep = (kb, ks)
                r.perm_array = None
                r.perm = 0
                if weight.perm is not None:
                    r.perm_array = _cuda.from_host(np.ascontiguousarray(weight.perm, dtype=np.int32))
                    r.perm = r.perm_array.ptr
            if per_expert:
                r.perm_stride = weight.size_k * 4       # bytes from one expert's perm to the next
            r.device = device
            # With one GPU visible every device array is on it: mm skips its device checks.
            r.only_gpu = _cuda.probe()["count"] == 1
            r.size_k, r.size_n = weight.size_k, weight.size_n
            r.groups = weight.num_groups
            r.group_size = weight.size_k if r.groups == 1 else weight.group_size
            r.num_experts = weight.num_experts
            r.b_end = r.b + r.num_experts * (r.size_k // 16) * 2 * r.size_n * 4
            r.s_end = r.s + r.num_experts * r.groups * r.size_n * 2
            r.pending = 1   # the first call reads the weights only after the previous kernel
            weight._aux["cuda"] = r
            _enable_direct()
            return r

    def mm(self, a, weight, expert, out, stream=None, tile=0, m_blocks=0, splits=0, stream_k=0):
        """C = A @ W. Options: stream; tile (1: k128 x n128, 2: k128 x n256, 3: k64 x n256,
        7: k256 x n64, all mma.sync; 4, 5, 6: wgmma k64 / k128 / k128 with two blocks per SM, x n256,
        8, 9: wgmma k128 x n128, k256 x n64 with the warpgroups splitting K; compute capability 9.0
        only), m_blocks (rows of 16 per block: 1..4 on mma.sync; tile 4 takes 4 or 8, tile 5 1, 2, 4
        or 8, tiles 6 and 8 1, 2 or 4, tile 9 1 or 2), splits (split-K)
        and stream_k (-1 off, 1 on with one wave of blocks, n >= 2 on with n blocks; mma.sync tiles
        with m_blocks 1, wgmma tiles 5, 6, 8 and 9)
        override the heuristic.

        Runs on the weight's GPU (made current for the call if another is). The hot path
        (device arrays, out= given) is kept to a few attribute reads: this is what bounds the
        host overhead of one call (measured by `ferrum bench`)."""
        s = 0 if stream is None else _stream_handle(stream)
        r = weight._aux.get("cuda")
        if r is None:
            r = self._resident(weight)
        device = r.device
        strict = not r.only_gpu
        if strict:
            current = _cuda.get_device()
            if current != device:   # the call again, with the weight's GPU current
                _cuda.set_device(device)
                try:
                    return self.mm(a, weight, expert, out, stream, tile, m_blocks, splits,
                                   stream_k)
                finally:
                    _cuda.set_device(current)
        host_in = type(a) is np.ndarray
        if host_in:
            a_dev = _cuda.from_host(np.ascontiguousarray(a, dtype=np.float16), s)
            a_ptr, size_m, a_keep = a_dev.ptr, a_dev.shape[0], a_dev
        else:
            a_ptr, size_m, a_keep = _fast_view(a, s, device, False, strict)
        if expert is None:
            expert0, experts = 0, r.num_experts
        else:
            expert0, experts = expert, 1
        cols = r.size_n * experts
        result = host_out = None
        if out is None:
            if host_in:
                result = _cuda.empty((size_m, cols), _F16)
            else:
                result = _empty_like_lib(a, (size_m, cols), s, stream)
            c_target = result
        elif type(out) is np.ndarray:
            host_out = out
            c_target = _cuda.empty((size_m, cols), _F16)
        else:
            result = c_target = out
        c_ptr, _, c_keep = _fast_view(c_target, s, device, True, strict)
        if result is out:   # the caller's device array: the kernel must not write what it reads
            c_end = c_ptr + size_m * cols * 2
            if (c_ptr < a_ptr + size_m * r.size_k * 2 and a_ptr < c_end) or \
                    (c_ptr < r.b_end and r.b < c_end) or (c_ptr < r.s_end and r.s < c_end):
                _overlap_error(out, c_ptr, c_end, a_ptr, size_m * r.size_k * 2, r)
        pending = r.pending
        if type(r) is _Resident and getattr(r, "perm_stride", 0):
            # each expert with its own act-order: a launch per expert, A gathered in its order,
            # its n columns of C at e*n (row stride ldc = cols)
            for i in range(experts):
                e = expert0 + i
                _cuda.mm(a_ptr, r.b, r.s, c_ptr + i * r.size_n * 2, r.perm + e * r.perm_stride,
                         size_m, r.size_k, r.size_n, e, 1, r.groups, r.group_size, cols, s, tile,
                         m_blocks, splits, pending, stream_k, device)
        else:
            _cuda.mm(a_ptr, r.b, r.s, c_ptr, r.perm, size_m, r.size_k, r.size_n, expert0, experts,
                     r.groups, r.group_size, cols, s, tile, m_blocks, splits, pending, stream_k,
                     device)
        r.pending = 0
        if type(c_target) is DeviceArray:
            c_target.stream = s
        if host_out is not None:
            host_out[...] = c_target.copy_to_host()
            return host_out
        if host_in and out is None:
            return result.copy_to_host()
        return result


def _fast_view(x: Any, stream: int, device: int, writable: bool = False,
               strict: bool = True) -> tuple[int, int, Any]:
    """(pointer, rows, keepalive): a few attribute reads for contiguous, aligned torch, cupy,
    ferrum and plain __cuda_array_interface__ arrays on `device` (any GPU when not strict: the
    only one there is); anything else (a copy to make, a stream to wait for, DLPack, an error
    to raise) goes through _device_view."""
    t = type(x)
    kind = _VIEW_KINDS.get(t) or _view_kind(t)
    if kind == "ferrum":
        ptr = x.ptr
        if not ptr & 15 and x.device == device:
            return ptr, x.shape[0], x
    elif kind == "torch":
        if x.is_cuda and x.is_contiguous():
            ptr = x.data_ptr()
            if not ptr & 15 and (not strict or x.get_device() == device):
                return ptr, x.shape[0], x
    elif kind == "cupy":
        if x.flags.c_contiguous:
            ptr = x.data.ptr
            if not ptr & 15 and (not strict or x.device.id == device):
                return ptr, x.shape[0], x
    else:   # what _device_view does for a CAI array that is C-contiguous (no strides), needs no
        # wait (written on no stream or on this one), is aligned, writable where it must be,
        # unmasked and in device memory of `device`
        cai = getattr(x, "__cuda_array_interface__", None)
        if cai is not None and cai.get("strides") is None and cai.get("mask") is None and \
                cai.get("stream") in (None, 1 if stream == 0 else stream):
            data = cai["data"]
            ptr = int(data[0])
            if ptr and not ptr & 15 and not (writable and data[1]) and \
                    _cuda.pointer_device(ptr) == (2, device):
                return ptr, int(cai["shape"][0]), x
    ptr, shape, _, keep = _device_view(x, stream, device, "out" if writable else "a", writable)
    return ptr, shape[0], keep


_VIEW_KINDS: dict[type, str] = {}   # exact type -> "ferrum" | "torch" | "cupy" | "other"


def _view_kind(t: type) -> str:
    """The branch of _describe an array of type t takes first (as _describe decides it)."""
    if DeviceArray is not None and t is DeviceArray:
        kind = "ferrum"
    elif t.__module__.split(".", 1)[0] == "torch":
        kind = "torch"
        _enable_direct()
    elif t.__module__.split(".", 1)[0] == "cupy":
        kind = "cupy"
        _enable_direct()
    else:
        kind = "other"
    _VIEW_KINDS[t] = kind
    return kind


BACKEND = CudaBackend()


def run_bench(options: dict) -> None:
    """`python -m ferrum bench --backend cuda`: see ferrum/_cuda_bench.py."""
    from . import _cuda_bench
    _cuda_bench.run(options)
