"""The CUDA backend: ferrum's Marlin library (csrc/) through the Cython layer ferrum._cuda.

Importing this module never fails: without the compiled extension or without a GPU, ``info()``
says why. Arrays: numpy inputs are copied to the GPU and the result comes back as numpy; device
inputs (``__cuda_array_interface__`` or DLPack: PyTorch, CuPy, Numba, ferrum's own DeviceArray)
stay on the GPU, and the result is allocated by the library of ``a`` (torch or cupy) or is a
ferrum DeviceArray. Streams: ``stream=`` takes an int handle or an object carrying one; the
default is the legacy default stream. A generic ``__cuda_array_interface__`` input whose
``stream`` field names another stream is waited for (CAI v3); PyTorch and CuPy arrays are read
through their fast attributes, so work queued on another stream must be ordered by the caller
(pass ``stream=``).

On sm_90 an mm starts streaming its weights before the kernel before it on the stream has
finished (programmatic dependent launch; A, C and the workspace wait for it). The weights must
therefore not be written by that kernel: a MarlinWeight's first call waits, since its arrays may
have just been made on the device; a weight rewritten in place on the device later needs a new
MarlinWeight (or ``FERRUM_NO_PDL=1``).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np

from ._registry import Backend, BackendInfo
from .errors import CudaError

try:
    from . import _cuda
    _IMPORT_ERROR: Exception | None = None
    _cuda.set_error_class(CudaError)
except ImportError as exc:   # not built (no nvcc at install time) or a broken build
    _cuda = None
    _IMPORT_ERROR = exc

__all__ = ["BACKEND", "CudaBackend", "CudaError", "DeviceArray", "bench"]

DeviceArray = _cuda.DeviceArray if _cuda is not None else None
_F16 = np.dtype(np.float16)


def _stream_handle(stream: Any) -> int:
    """An int cudaStream_t from an int or an object carrying one (torch, cupy, numba, CAI)."""
    if stream is None:
        return 0
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
        return int(stream)
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        value = protocol() if callable(protocol) else protocol
        return int(value[1] if isinstance(value, tuple) else value)
    for attr in ("cuda_stream", "ptr", "handle"):
        value = getattr(stream, attr, None)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
    raise TypeError(f"stream={stream!r}: expected an int cudaStream_t or an object with "
                    ".cuda_stream, .ptr or __cuda_stream__")


def _library(x: Any) -> str:
    module = type(x).__module__
    return module.split(".", 1)[0]


def _device_view(x: Any, stream: int) -> tuple[int, tuple, np.dtype, Any]:
    """(pointer, shape, dtype, keepalive) of a C-contiguous device array (made so if needed)."""
    if DeviceArray is not None and type(x) is DeviceArray:
        return x.ptr, x.shape, x.dtype, x
    lib = _library(x)
    if lib == "torch" and x.is_cuda:
        if not x.is_contiguous():
            x = x.contiguous()
        return x.data_ptr(), tuple(x.shape), np.dtype(str(x.dtype).rsplit(".", 1)[-1]), x
    if lib == "cupy":
        if not x.flags.c_contiguous:
            x = sys.modules["cupy"].ascontiguousarray(x)
        return x.data.ptr, tuple(x.shape), x.dtype, x
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        shape = tuple(int(s) for s in cai["shape"])
        dtype = np.dtype(cai["typestr"])
        strides = cai.get("strides")
        if strides is not None and tuple(strides) != _c_strides(shape, dtype.itemsize):
            raise ValueError(f"{type(x).__name__} array with strides {strides} is not "
                             "C-contiguous; pass a contiguous copy")
        producer = cai.get("stream")
        if producer is not None and producer != (1 if stream == 0 else stream):
            _cuda.stream_wait(stream, 0 if producer == 1 else producer)
        return int(cai["data"][0]), shape, dtype, x
    if hasattr(x, "__dlpack__"):
        ptr, shape, dtype, contiguous, capsule = _cuda.dlpack_view(x, stream)
        if not contiguous:
            raise ValueError(f"{type(x).__name__} DLPack array is not C-contiguous; "
                             "pass a contiguous copy")
        return ptr, shape, dtype, (x, capsule)
    raise TypeError(f"{type(x).__name__} is not a CUDA array")


def _c_strides(shape: tuple, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for s in reversed(shape):
        strides.append(step)
        step *= s
    return tuple(reversed(strides))


def _empty_like_lib(a: Any, shape: tuple) -> Any:
    """A float16 result allocated by the library `a` came from (torch, cupy), else ferrum's."""
    lib = _library(a)
    if lib == "torch":
        torch = sys.modules["torch"]
        return torch.empty(shape, dtype=torch.float16, device=a.device)
    if lib == "cupy":
        return sys.modules["cupy"].empty(shape, dtype=np.float16)
    return _cuda.empty(shape, _F16)


class _Resident:
    """Device pointers and sizes of one MarlinWeight, cached in weight._aux["cuda"]."""
    __slots__ = ("b", "s", "perm", "perm_array", "keep", "size_k", "size_n", "groups",
                 "group_size", "num_experts", "pending")


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
        ptr, shape, dtype, keep = _device_view(resident, 0)
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
        keep = []
        if isinstance(qweight, np.ndarray):
            src = _cuda.from_host(np.ascontiguousarray(qweight).view(np.int32))
            keep.append(src)
            src_ptr = src.ptr
        else:
            src_ptr, _, _, k = _device_view(qweight, 0)
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
            r = _Resident()
            r.b, _, _, kb = _device_view(weight.qweight, 0)
            r.s, _, _, ks = _device_view(weight.scales, 0)
            r.keep = (kb, ks)
            r.perm_array = None
            r.perm = 0
            if weight.perm is not None:
                r.perm_array = _cuda.from_host(np.ascontiguousarray(weight.perm, dtype=np.int32))
                r.perm = r.perm_array.ptr
            r.size_k, r.size_n = weight.size_k, weight.size_n
            r.groups = weight.num_groups
            r.group_size = weight.size_k if r.groups == 1 else weight.group_size
            r.num_experts = weight.num_experts
            r.pending = 1   # the first call reads the weights only after the previous kernel
            weight._aux["cuda"] = r
            return r

    def mm(self, a, weight, expert, out, stream=None, tile=0, m_blocks=0, splits=0, stream_k=0):
        """C = A @ W. Options: stream; tile (1: k128 x n128, 2: k128 x n256, 3: k64 x n256,
        7: k256 x n64, all mma.sync; 4, 5, 6: wgmma k64 / k128 / k128 with two blocks per SM, x n256, compute
        capability 9.0 only), m_blocks (rows of 16 per block: 1..4; 4 or 8 for wgmma), splits (split-K)
        and stream_k (-1 off, 1 on with one wave of blocks, n >= 2 on with n blocks; mma.sync tiles)
        override the heuristic.

        The hot path (device arrays, out= given) is kept to a few attribute reads: this is
        what bounds the host overhead of one call (measured by `ferrum bench`)."""
        s = 0 if stream is None else _stream_handle(stream)
        r = weight._aux.get("cuda")
        if r is None:
            r = self._resident(weight)
        host_in = type(a) is np.ndarray
        if host_in:
            a_dev = _cuda.from_host(np.ascontiguousarray(a, dtype=np.float16), s)
            a_ptr, size_m, a_keep = a_dev.ptr, a_dev.shape[0], a_dev
        else:
            a_ptr, size_m, a_keep = _fast_view(a, s)
        if expert is None:
            expert0, experts = 0, r.num_experts
        else:
            expert0, experts = expert, 1
        cols = r.size_n * experts
        result = host_out = None
        if out is None:
            result = _cuda.empty((size_m, cols), _F16) if host_in else _empty_like_lib(a, (size_m, cols))
            c_target = result
        elif type(out) is np.ndarray:
            host_out = out
            c_target = _cuda.empty((size_m, cols), _F16)
        else:
            result = c_target = out
        c_ptr, _, c_keep = _fast_view(c_target, s, writable=True)
        pending = r.pending
        _cuda.mm(a_ptr, r.b, r.s, c_ptr, r.perm, size_m, r.size_k, r.size_n, expert0, experts,
                 r.groups, r.group_size, cols, s, tile, m_blocks, splits, pending, stream_k)
        r.pending = 0
        if type(c_target) is DeviceArray:
            c_target.stream = s
        if host_out is not None:
            host_out[...] = c_target.copy_to_host()
            return host_out
        if host_in:
            return result.copy_to_host()
        return result


def _fast_view(x: Any, stream: int, writable: bool = False) -> tuple[int, int, Any]:
    """(pointer, rows, keepalive): a few attribute reads for contiguous torch, cupy, ferrum and
    plain __cuda_array_interface__ arrays; anything else (a copy to make, a stream to wait
    for, DLPack) goes through _device_view."""
    t = type(x)
    kind = _VIEW_KINDS.get(t) or _view_kind(t)
    if kind == "ferrum":
        return x.ptr, x.shape[0], x
    if kind == "torch":
        if x.is_cuda:
            if x.is_contiguous():
                return x.data_ptr(), x.shape[0], x
            if writable:
                raise ValueError("out: a non-contiguous tensor cannot receive the result; "
                                 "pass a contiguous one")
    elif kind == "cupy":
        if x.flags.c_contiguous:
            return x.data.ptr, x.shape[0], x
    else:   # what _device_view does for a CAI array that is C-contiguous (no strides) and
        # needs no wait (written on no stream or on this one)
        cai = getattr(x, "__cuda_array_interface__", None)
        if cai is not None and cai.get("strides") is None and \
                cai.get("stream") in (None, 1 if stream == 0 else stream):
            return int(cai["data"][0]), int(cai["shape"][0]), x
    if writable:
        ptr, shape, _, keep = _device_view(x, stream)
        if keep is not x and not (isinstance(keep, tuple) and keep[0] is x):
            raise ValueError("out: a non-contiguous array cannot receive the result")
        return ptr, shape[0], keep
    ptr, shape, _, keep = _device_view(x, stream)
    return ptr, shape[0], keep


_VIEW_KINDS: dict[type, str] = {}   # exact type -> "ferrum" | "torch" | "cupy" | "other"


def _view_kind(t: type) -> str:
    """The branch of _device_view an array of type t takes first (as _device_view decides it)."""
    if DeviceArray is not None and t is DeviceArray:
        kind = "ferrum"
    elif t.__module__.startswith("torch"):
        kind = "torch"
    elif t.__module__.split(".", 1)[0] == "cupy":
        kind = "cupy"
    else:
        kind = "other"
    _VIEW_KINDS[t] = kind
    return kind


BACKEND = CudaBackend()


def bench(options: dict) -> None:
    """`python -m ferrum bench --backend cuda`: see ferrum/_cuda_bench.py."""
    from . import _cuda_bench
    _cuda_bench.run(options)
