"""Stand-ins for CUDA device arrays and for the compiled CUDA layer, so that the front API's
handling of device arrays can be tested (and its host overhead measured) on a machine without a
GPU. Nothing here touches a GPU: launches are recorded, not run.

- ``CAIArray``: a generic ``__cuda_array_interface__`` (v3) array, the dict built per access
  as numba's arrays do; optional ``strides`` and ``stream``.
- ``DLPackArray``: a device array that offers only DLPack (like JAX).
- ``fake_torch()`` / ``fake_cupy()``: modules named ``torch`` / ``cupy`` whose ``Tensor`` /
  ``ndarray`` expose the attributes ferrum reads from the real ones (``is_cuda``, ``dtype``,
  ``shape``, ``is_contiguous()``, ``data_ptr()``; ``data.ptr``, ``flags.c_contiguous``). Install
  them in ``sys.modules`` only where the real library is absent.
- ``stub_cuda()``: a context manager that makes the cuda backend available with ``ferrum._cuda``
  replaced by ``StubCuda``, which allocates CAIArrays and records each ``mm`` launch.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import types

import numpy as np

_addresses = itertools.count(0x7F0000000000, 0x100000)


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for s in reversed(shape):
        strides.append(step)
        step *= s
    return tuple(reversed(strides))


class CAIArray:
    """A device array known only through ``__cuda_array_interface__`` (built per access)."""

    def __init__(self, shape, dtype=np.float16, *, ptr=None, strides=None, stream=None):
        self._shape = tuple(int(s) for s in shape)
        self._dtype = np.dtype(dtype)
        self.ptr = next(_addresses) if ptr is None else ptr
        self._strides = strides
        self._stream = stream

    @property
    def __cuda_array_interface__(self):
        return {"shape": self._shape, "typestr": self._dtype.str, "data": (self.ptr, False),
                "version": 3, "strides": self._strides, "stream": self._stream}

    def copy_to_host(self):
        return np.zeros(self._shape, self._dtype)


class DLPackArray:
    """A device array that offers only DLPack (``__dlpack_device__`` says CUDA)."""

    def __init__(self, shape, dtype=np.float16, device_type=2):
        self.shape = tuple(shape)
        self.dtype = str(np.dtype(dtype))
        self.device_type = device_type
        self.ptr = next(_addresses)

    def __dlpack_device__(self):
        return (self.device_type, 0)

    def __dlpack__(self, stream=None, **kwargs):
        return ("capsule", self)


# --- torch -----------------------------------------------------------------------------------

class _TorchDtype:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"torch.{self.name}"


def fake_torch() -> types.ModuleType:
    """A module named ``torch`` with a ``Tensor`` carrying the attributes ferrum reads."""
    torch = types.ModuleType("torch")
    torch.__ferrum_fake__ = True
    dtypes = {name: _TorchDtype(name) for name in ("float16", "float32", "int32", "bfloat16")}
    for name, dt in dtypes.items():
        setattr(torch, name, dt)

    class Size(tuple):
        pass

    class device:
        def __init__(self, kind):
            self.type = kind

    class Tensor:
        def __init__(self, shape, dtype=None, *, is_cuda=True, contiguous=True, ptr=None):
            self.shape = Size(int(s) for s in shape)
            self.dtype = dtype if dtype is not None else torch.float16
            self.is_cuda = is_cuda
            self.device = device("cuda" if is_cuda else "cpu")
            self._contiguous = contiguous
            self._ptr = next(_addresses) if ptr is None else ptr

        def is_contiguous(self):
            return self._contiguous

        def contiguous(self):
            return self if self._contiguous else Tensor(self.shape, self.dtype, is_cuda=self.is_cuda)

        def data_ptr(self):
            return self._ptr

        def dim(self):
            return len(self.shape)

        @property
        def __cuda_array_interface__(self):
            if not self.is_cuda:
                raise AttributeError("Can't get __cuda_array_interface__ on non-CUDA tensor")
            return {"shape": tuple(self.shape), "typestr": np.dtype(self.dtype.name).str,
                    "data": (self._ptr, False), "version": 2, "strides": None}

        def __dlpack_device__(self):
            return (2 if self.is_cuda else 1, 0)

    for cls in (Size, device, Tensor):
        cls.__module__ = "torch"
    torch.Size, torch.device, torch.Tensor = Size, device, Tensor
    torch.empty = lambda shape, dtype=None, device=None: Tensor(shape, dtype)
    return torch


# --- cupy ------------------------------------------------------------------------------------

def fake_cupy() -> types.ModuleType:
    """A module named ``cupy`` with an ``ndarray`` carrying the attributes ferrum reads."""
    cupy = types.ModuleType("cupy")
    cupy.__ferrum_fake__ = True

    class _Memory:
        def __init__(self, ptr):
            self.ptr = ptr

    class _Flags:
        def __init__(self, c_contiguous):
            self.c_contiguous = c_contiguous

    class ndarray:
        def __init__(self, shape, dtype=np.float16, *, contiguous=True):
            self.shape = tuple(int(s) for s in shape)
            self.dtype = np.dtype(dtype)
            self.data = _Memory(next(_addresses))
            self.flags = _Flags(contiguous)

        @property
        def __cuda_array_interface__(self):
            strides = None if self.flags.c_contiguous else tuple(
                2 * s for s in _c_strides(self.shape, self.dtype.itemsize))
            return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.data.ptr, False),
                    "version": 3, "strides": strides, "stream": 1}

    ndarray.__module__ = "cupy"   # cupy's own is cupy._core.core; the top-level name is what counts
    cupy.ndarray = ndarray
    cupy.empty = lambda shape, dtype=np.float16: ndarray(shape, dtype)
    cupy.ascontiguousarray = lambda x: ndarray(x.shape, x.dtype)
    return cupy


# --- the CUDA layer ----------------------------------------------------------------------------

class StubCuda:
    """Stands in for ``ferrum._cuda``: allocations are CAIArrays, ``mm`` launches are recorded
    in ``launches`` (or only counted, with ``record=False``, for timing)."""

    DeviceArray = None

    def __init__(self, record=True):
        self.launches = []
        self.calls = 0
        if not record:
            def mm(*args):
                return None
            self.mm = mm

    def mm(self, *args):
        self.launches.append(args)

    def empty(self, shape, dtype):
        return CAIArray(shape, dtype)

    def from_host(self, array, stream=0):
        array = np.asarray(array)
        return CAIArray(array.shape, array.dtype)

    def stream_wait(self, consumer, producer):
        pass

    def synchronize(self, stream=0):
        pass

    def to_host(self, ptr, shape, dtype, stream=0):
        return np.zeros(shape, dtype)

    def dlpack_view(self, obj, stream=0):
        return obj.ptr, obj.shape, np.dtype(obj.dtype), True, obj


@contextlib.contextmanager
def stub_cuda(record=True):
    """The cuda backend made available with its CUDA layer replaced by a StubCuda (yielded)."""
    import ferrum.cuda
    from ferrum import _registry
    stub = StubCuda(record)
    saved = ferrum.cuda._cuda, _registry._ready.get("cuda")
    ferrum.cuda._cuda = stub
    _registry._ready["cuda"] = ferrum.cuda.BACKEND
    try:
        yield stub
    finally:
        ferrum.cuda._cuda = saved[0]
        if saved[1] is None:
            _registry._ready.pop("cuda", None)
        else:
            _registry._ready["cuda"] = saved[1]


@contextlib.contextmanager
def fake_modules():
    """Install fake ``torch`` and ``cupy`` where the real ones are absent; yields
    {"torch": module or None, "cupy": module or None} (None where the real one is installed)."""
    import importlib.util
    made = {}
    for name, factory in (("torch", fake_torch), ("cupy", fake_cupy)):
        real = name in sys.modules or importlib.util.find_spec(name) is not None
        made[name] = None if real else factory()
        if made[name] is not None:
            sys.modules[name] = made[name]
    try:
        yield made
    finally:
        for name, module in made.items():
            if module is not None and sys.modules.get(name) is module:
                del sys.modules[name]
