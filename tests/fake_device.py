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
import sys
import types

import numpy as np

_next_free = [0x7F0000000000]


def _address(nbytes=0):
    """A fresh stand-in device address: 1 MiB apart, or more for a larger array, so that no
    two stand-ins overlap (the backend refuses an out= that overlaps a or the weight)."""
    ptr = _next_free[0]
    _next_free[0] += max(0x100000, (int(nbytes) + 0xFFFFF) // 0x100000 * 0x100000)
    return ptr


def _nbytes(shape, itemsize):
    n = itemsize
    for s in shape:
        n *= int(s)
    return n


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for s in reversed(shape):
        strides.append(step)
        step *= s
    return tuple(reversed(strides))


class CAIArray:
    """A device array known only through ``__cuda_array_interface__`` (built per access).
    ``extra`` adds (or replaces) entries of the dict: "mask", "version", "typestr" ..."""

    def __init__(self, shape, dtype=np.float16, *, ptr=None, strides=None, stream=None,
                 read_only=False, **extra):
        self._shape = tuple(int(s) for s in shape)
        self._dtype = np.dtype(dtype)
        self.ptr = _address(_nbytes(self._shape, self._dtype.itemsize)) if ptr is None else ptr
        self._strides = strides
        self._stream = stream
        self._read_only = read_only
        self._extra = extra

    @property
    def __cuda_array_interface__(self):
        cai = {"shape": self._shape, "typestr": self._dtype.str, "data": (self.ptr, self._read_only),
               "version": 3, "strides": self._strides, "stream": self._stream}
        cai.update(self._extra)
        return cai

    def copy_to_host(self):
        return np.zeros(self._shape, self._dtype)


class StubDeviceArray(CAIArray):
    """What StubCuda allocates: a CAIArray with the attributes of ferrum's DeviceArray that
    the backend reads (shape, dtype, stream)."""

    stream = None

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._dtype


class DLPackArray:
    """A device array that offers only DLPack (``__dlpack_device__`` says CUDA)."""

    def __init__(self, shape, dtype=np.float16, device_type=2, *, device_id=0, strides=None):
        self.shape = tuple(shape)
        self.dtype = str(np.dtype(dtype))
        self.device_type = device_type
        self.device_id = device_id
        self.strides = strides     # byte strides, None when C-contiguous (as dlpack_view says)
        self.ptr = _address(_nbytes(self.shape, np.dtype(dtype).itemsize))

    def __dlpack_device__(self):
        return (self.device_type, self.device_id)

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
        def __init__(self, kind, index=None):
            self.type = kind
            self.index = index if kind == "cuda" else None

    class Stream:
        def __init__(self, handle=None, device=None):
            self.cuda_stream = _address() if handle is None else handle
            self.device = device

    class ExternalStream(Stream):
        def __init__(self, stream_ptr, device=None):
            super().__init__(stream_ptr, device)

    current = {"stream": Stream(0)}   # the current stream (one device is enough here)

    @contextlib.contextmanager
    def stream_context(s):
        saved = current["stream"]
        current["stream"] = s
        try:
            yield s
        finally:
            current["stream"] = saved

    class Tensor:
        def __init__(self, shape, dtype=None, *, is_cuda=True, contiguous=True, ptr=None,
                     device_index=0, strides=None):
            self.shape = Size(int(s) for s in shape)
            self.dtype = dtype if dtype is not None else torch.float16
            self.is_cuda = is_cuda
            self.device = device("cuda" if is_cuda else "cpu", device_index)
            self._contiguous = contiguous
            itemsize = np.dtype(self.dtype.name).itemsize if self.dtype.name != "bfloat16" else 2
            self._ptr = _address(4 * _nbytes(self.shape, itemsize)) if ptr is None else ptr
            elems = [s // itemsize for s in _c_strides(self.shape, itemsize)]
            # a non-contiguous stand-in: every other column of a twice-as-wide tensor
            self._strides = tuple(strides) if strides is not None else (
                tuple(elems) if contiguous else tuple(2 * s for s in elems))
            self.alloc_stream = current["stream"].cuda_stream   # what the allocator saw

        def is_contiguous(self):
            return self._contiguous

        def contiguous(self):
            return self if self._contiguous else Tensor(self.shape, self.dtype, is_cuda=self.is_cuda)

        def data_ptr(self):
            return self._ptr

        def get_device(self):
            return self.device.index if self.is_cuda else -1

        def stride(self):
            return self._strides

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
    torch.empty = lambda shape, dtype=None, device=None: Tensor(
        shape, dtype, device_index=0 if device is None else device.index)
    cuda = types.ModuleType("torch.cuda")
    cuda.Stream, cuda.ExternalStream = Stream, ExternalStream
    cuda.current_stream = lambda device=None: current["stream"]
    cuda.default_stream = lambda device=None: Stream(0, device)
    cuda.stream = stream_context
    torch.cuda = cuda
    torch._C = types.SimpleNamespace()   # no _cuda_getCurrentRawStream: the portable path
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

    class _Device:
        def __init__(self, index):
            self.id = index

    class Stream:
        def __init__(self, ptr=None):
            self.ptr = _address() if ptr is None else ptr

        def __enter__(self):
            _current.append(self)
            return self

        def __exit__(self, *exc):
            _current.pop()

    class ExternalStream(Stream):
        pass

    Stream.null, Stream.ptds = Stream(0), Stream(2)
    _current = [Stream.null]

    class ndarray:
        def __init__(self, shape, dtype=np.float16, *, contiguous=True, device_index=0):
            self.shape = tuple(int(s) for s in shape)
            self.dtype = np.dtype(dtype)
            self.data = _Memory(_address(4 * _nbytes(self.shape, self.dtype.itemsize)))
            self.flags = _Flags(contiguous)
            self.device = _Device(device_index)
            self.strides = _c_strides(self.shape, self.dtype.itemsize)
            if not contiguous:
                self.strides = tuple(2 * s for s in self.strides)
            self.alloc_stream = _current[-1].ptr   # what the memory pool saw

        @property
        def __cuda_array_interface__(self):
            strides = None if self.flags.c_contiguous else self.strides
            return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.data.ptr, False),
                    "version": 3, "strides": strides, "stream": 1}

    ndarray.__module__ = "cupy"   # cupy's own is cupy._core.core; the top-level name is what counts
    cupy.ndarray = ndarray
    cupy.empty = lambda shape, dtype=np.float16: ndarray(shape, dtype)
    cupy.ascontiguousarray = lambda x: ndarray(x.shape, x.dtype)
    cupy.cuda = types.SimpleNamespace(Stream=Stream, ExternalStream=ExternalStream,
                                      get_current_stream=lambda: _current[-1])
    return cupy


# --- the CUDA layer ----------------------------------------------------------------------------

class StubCuda:
    """Stands in for ``ferrum._cuda``: allocations are CAIArrays, ``mm`` launches are recorded
    in ``launches`` (or only counted, with ``record=False``, for timing), and so are strided
    copies (``copies``), stream waits (``waits``), synchronizations (``syncs``) and device
    switches (``device_log``). ``current`` is the current device; ``pointer_devices`` maps a
    pointer to what cudaPointerGetAttributes would say, (memory type, device), default
    (2, 0): device memory of GPU 0."""

    DeviceArray = None

    def __init__(self, record=True):
        self.launches = []
        self.copies = []
        self.waits = []
        self.syncs = []
        self.device_log = []
        self.current = 0
        self.pointer_devices = {}
        self.calls = 0
        self.gpus = 2       # visible GPUs (probe()["count"]): more than one keeps mm's device checks
        if not record:
            def mm(*args):
                return None
            self.mm = mm

    def mm(self, *args):
        self.launches.append(args)

    def empty(self, shape, dtype):   # on the current device, as cudaMalloc allocates
        arr = StubDeviceArray(shape, dtype)
        if self.current:
            self.pointer_devices[arr.ptr] = (2, self.current)
        return arr

    def from_host(self, array, stream=0):
        array = np.asarray(array)
        return self.empty(array.shape, array.dtype)

    def stream_wait(self, consumer, producer):
        self.waits.append((consumer, producer))

    def synchronize(self, stream=0):
        self.syncs.append(stream)

    def to_host(self, ptr, shape, dtype, stream=0):
        return np.zeros(shape, dtype)

    def copy_strided(self, src, dst, shape, strides, itemsize, stream=0):
        self.copies.append((src, dst, tuple(shape), tuple(strides), itemsize, stream))

    def probe(self):
        return {"count": self.gpus, "device": self.current}

    def get_device(self):
        return self.current

    def set_device(self, device):
        self.device_log.append(device)
        self.current = device

    def pointer_device(self, ptr):
        return self.pointer_devices.get(ptr, (2, 0))

    def dlpack_view(self, obj, stream=0):
        return obj.ptr, obj.shape, np.dtype(obj.dtype), obj.strides, obj.device_id, obj


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
