# cython: language_level=3, boundscheck=False, wraparound=False
"""The CUDA runtime layer of ferrum: device memory, streams, DLPack and the Marlin C API.

Every CUDA status goes through ``check`` and every ferrum status through ``check_ferrum``; both
raise the CudaError class that ferrum.cuda registers (CUDA's own message in it). Nothing here
validates shapes: ferrum.api did, and ferrum.cuda chooses what to call.
"""

from cpython.pycapsule cimport PyCapsule_New, PyCapsule_GetPointer, PyCapsule_IsValid
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.ref cimport Py_INCREF, Py_DECREF, PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset

import numpy as np

_error_class = RuntimeError


def set_error_class(cls):
    """ferrum.cuda registers ferrum.CudaError here (avoids an import cycle)."""
    global _error_class
    _error_class = cls


cdef int check(cudaError_t status, str what) except -1:
    if status != cudaSuccess:
        cudaGetLastError()   # clear a non-sticky error so the next call starts clean
        name = cudaGetErrorName(status).decode()
        text = cudaGetErrorString(status).decode()
        error = _error_class(f"{name}: {text} (in {what})")
        error.status = int(status)
        raise error
    return 0


cdef int check_ferrum(int status) except -1:
    if status == FERRUM_OK:
        return 0
    message = ferrum_get_last_error().decode()
    if status == FERRUM_ERR_CUDA:
        error = _error_class(message)
        error.status = ferrum_get_last_cuda_status()
        raise error
    raise ValueError(message)


def version():
    return ferrum_version().decode()


def probe():
    """dict describing the current device; raises CudaError when there is no usable GPU."""
    cdef int count = 0, device = 0, driver = 0, runtime = 0
    cdef cudaDeviceProp prop
    check(cudaDriverGetVersion(&driver), "cudaDriverGetVersion")
    if driver == 0:
        # The runtime found no driver library (libcuda.so.1); cudaGetDeviceCount would say
        # "CUDA driver version is insufficient", which sends people after the wrong fix.
        error = _error_class("no NVIDIA driver found: the CUDA driver library (libcuda.so.1 / "
                             "nvcuda.dll) could not be loaded (cudaDriverGetVersion reports 0)")
        error.status = 35   # cudaErrorInsufficientDriver, what the runtime reports next
        raise error
    check(cudaGetDeviceCount(&count), "cudaGetDeviceCount")
    check(cudaGetDevice(&device), "cudaGetDevice")
    check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties")
    check(cudaRuntimeGetVersion(&runtime), "cudaRuntimeGetVersion")
    return {"count": count, "device": device, "name": prop.name.decode(errors="replace"),
            "major": prop.major, "minor": prop.minor, "sms": prop.multiProcessorCount,
            "memory": prop.totalGlobalMem, "driver": driver, "runtime": runtime}


cdef int current_device() except -1:
    cdef int device = 0
    check(cudaGetDevice(&device), "cudaGetDevice")
    return device


def get_device():
    """The calling thread's current CUDA device (where ferrum launches and allocates)."""
    return current_device()


def set_device(int device):
    check(cudaSetDevice(device), f"cudaSetDevice({device})")


def pointer_device(size_t ptr):
    """(memory type, device) of a pointer: type 0 unregistered host memory, 1 pinned host,
    2 device, 3 managed; device is the ordinal the memory belongs to (-1 for unregistered)."""
    cdef cudaPointerAttributes attributes
    memset(&attributes, 0, sizeof(attributes))
    check(cudaPointerGetAttributes(&attributes, <const void *>ptr), "cudaPointerGetAttributes")
    if attributes.type == 0:
        return 0, -1
    return int(attributes.type), int(attributes.device)


# ---------------------------------------------------------------------------------------------
# Device arrays

cdef dict _DLPACK_CODES = {"f2": (kDLFloat, 16), "f4": (kDLFloat, 32), "i4": (kDLInt, 32),
                           "u4": (kDLUInt, 32), "i8": (kDLInt, 64), "u1": (kDLUInt, 8),
                           "i1": (kDLInt, 8)}


cdef class DeviceArray:
    """A C-contiguous array in device memory owned by ferrum (freed when dropped).

    Exposes __cuda_array_interface__ (v3) and __dlpack__, so torch.as_tensor, cupy.asarray,
    numba.cuda.as_cuda_array and torch.from_dlpack take it without a copy.
    """

    def __cinit__(self):
        self.ptr = 0
        self.nbytes = 0
        self._owner = False
        self.stream = None

    def __dealloc__(self):
        if self._owner and self.ptr:
            cudaFree(<void *>self.ptr)   # errors at teardown have nowhere to go
            self.ptr = 0

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"ferrum.DeviceArray(shape={self.shape}, dtype={self.dtype}, device={self.device})"

    @property
    def __cuda_array_interface__(self):
        stream = self.stream
        if stream is not None:
            stream = 1 if stream == 0 else stream   # CAI: 1 means the legacy default stream
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False),
                "version": 3, "strides": None, "stream": stream}

    def __dlpack_device__(self):
        return (kDLCUDA, self.device)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        if copy:
            raise BufferError("ferrum.DeviceArray: __dlpack__(copy=True) is not supported")
        if dl_device is not None and tuple(dl_device) != (kDLCUDA, self.device):
            raise BufferError("ferrum.DeviceArray lives on the GPU; no cross-device export")
        if self.stream is not None and stream != -1:
            # The consumer will use `stream`; the data was written on self.stream.
            consumer = 0 if stream in (None, 1) else stream
            if consumer != self.stream:
                check(cudaStreamSynchronize(<cudaStream_t><size_t>self.stream), "cudaStreamSynchronize")
        return _dlpack_capsule(self)

    def copy_to_host(self):
        return to_host(self.ptr, self.shape, self.dtype, self.stream or 0)

    def get(self):
        return self.copy_to_host()


cdef DeviceArray wrap(size_t ptr, size_t nbytes, tuple shape, object dtype, bint owner,
                      object base, int device):
    cdef DeviceArray arr = DeviceArray.__new__(DeviceArray)
    arr.ptr = ptr
    arr.nbytes = nbytes
    arr.shape = shape
    arr.dtype = dtype
    arr._owner = owner
    arr._base = base
    arr.device = device
    return arr


def _nbytes(tuple shape, dtype):
    """The bytes of an array, counted in Python ints (a size_t product would wrap silently)."""
    total = dtype.itemsize
    for s in shape:
        if s < 0:
            raise ValueError(f"shape {shape}: negative extent")
        total *= s
    if total >= 2 ** 63:
        raise MemoryError(f"shape {shape} of {dtype}: {total} bytes is more than any device holds")
    return total


def empty(shape, dtype):
    """A new, uninitialised DeviceArray on the current device."""
    cdef void *ptr = NULL
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    cdef size_t nbytes = _nbytes(shape, dtype)
    if nbytes:
        check(cudaMalloc(&ptr, nbytes), f"cudaMalloc({nbytes} bytes)")
    return wrap(<size_t>ptr, nbytes, shape, dtype, True, None, current_device())


def view(size_t ptr, shape, dtype, base):
    """A DeviceArray over memory someone else owns (kept alive through `base`)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    cdef size_t nbytes = _nbytes(shape, dtype)
    return wrap(ptr, nbytes, shape, dtype, False, base, current_device())


def from_host(array, size_t stream=0):
    """Copy a host array into a new DeviceArray (returns when the copy is done)."""
    host = np.ascontiguousarray(array)
    cdef DeviceArray arr = empty(host.shape, host.dtype)
    copy_from_host(arr.ptr, host, stream)
    return arr


def copy_from_host(size_t dst, host, size_t stream=0):
    host = np.ascontiguousarray(host)
    cdef size_t nbytes = host.nbytes
    cdef size_t src = host.ctypes.data
    if nbytes:
        check(cudaMemcpyAsync(<void *>dst, <const void *>src, nbytes, cudaMemcpyHostToDevice,
                              <cudaStream_t>stream), "cudaMemcpyAsync(host to device)")
        check(cudaStreamSynchronize(<cudaStream_t>stream), "cudaStreamSynchronize")


def to_host(size_t src, shape, dtype, size_t stream=0):
    """Copy device memory into a new numpy array (returns when the copy is done)."""
    host = np.empty(tuple(shape), dtype=dtype)
    cdef size_t nbytes = host.nbytes
    cdef size_t dst = host.ctypes.data
    if nbytes:
        check(cudaMemcpyAsync(<void *>dst, <const void *>src, nbytes, cudaMemcpyDeviceToHost,
                              <cudaStream_t>stream), "cudaMemcpyAsync(device to host)")
        check(cudaStreamSynchronize(<cudaStream_t>stream), "cudaStreamSynchronize")
    return host


def copy_strided(size_t src, size_t dst, shape, strides, int itemsize, size_t stream=0):
    """dst (C-contiguous) = the array at src with byte `strides` (up to 3 dims; any sign and
    alignment), queued on `stream`."""
    shape, strides = tuple(shape), tuple(strides)
    if len(shape) != len(strides) or len(shape) > 3:
        raise ValueError(f"copy_strided: shape {shape} and strides {strides} (up to 3 dims)")
    pad = 3 - len(shape)
    cdef tuple d = (1,) * pad + shape
    cdef tuple st = (0,) * pad + strides
    check_ferrum(ferrum_copy_strided(<const void *>src, <void *>dst, d[0], d[1], d[2], st[0], st[1],
                                     st[2], itemsize, <void *>stream))


def stream_probe(size_t src, size_t dst, long long nbytes, int sm_blocks=4, size_t stream=0):
    """The bench's bandwidth probe, queued on `stream`: copy nbytes from src to dst (16-byte
    vectors), or with dst 0 read src only. Both 16-byte aligned, nbytes a multiple of 16."""
    check_ferrum(ferrum_stream_probe(<const void *>src, <void *>dst, nbytes, sm_blocks, <void *>stream))


def copy_device(size_t dst, size_t src, size_t nbytes, size_t stream=0):
    if nbytes:
        check(cudaMemcpyAsync(<void *>dst, <const void *>src, nbytes, cudaMemcpyDeviceToDevice,
                              <cudaStream_t>stream), "cudaMemcpyAsync(device to device)")


def synchronize(size_t stream=0):
    check(cudaStreamSynchronize(<cudaStream_t>stream), "cudaStreamSynchronize")


def stream_wait(size_t consumer, size_t producer):
    """Make `consumer` wait for the work queued so far on `producer` (CAI v3 semantics)."""
    cdef cudaEvent_t event
    check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags")
    try:
        check(cudaEventRecord(event, <cudaStream_t>producer), "cudaEventRecord")
        check(cudaStreamWaitEvent(<cudaStream_t>consumer, event, 0), "cudaStreamWaitEvent")
    finally:
        cudaEventDestroy(event)


def raise_if_error(what="last launch"):
    """Raise CudaError for a pending asynchronous error (used by the tests)."""
    check(cudaGetLastError(), what)


# ---------------------------------------------------------------------------------------------
# DLPack: export and import

cdef void _dl_deleter(DLManagedTensor *tensor) noexcept with gil:
    if tensor == NULL:
        return
    if tensor.manager_ctx != NULL:
        Py_DECREF(<object>tensor.manager_ctx)
    free(tensor.dl_tensor.shape)
    free(tensor)


cdef void _capsule_destructor(object capsule) noexcept:
    cdef DLManagedTensor *tensor
    if PyCapsule_IsValid(capsule, b"dltensor"):   # never consumed: we still own it
        tensor = <DLManagedTensor *>PyCapsule_GetPointer(capsule, b"dltensor")
        if tensor != NULL and tensor.deleter != NULL:
            tensor.deleter(tensor)


cdef object _dlpack_capsule(DeviceArray arr):
    code = _DLPACK_CODES.get(arr.dtype.str[1:])
    if code is None:
        raise BufferError(f"ferrum.DeviceArray: no DLPack code for dtype {arr.dtype}")
    cdef DLManagedTensor *tensor = <DLManagedTensor *>malloc(sizeof(DLManagedTensor))
    if tensor == NULL:
        raise MemoryError()
    cdef int ndim = len(arr.shape)
    tensor.dl_tensor.shape = <int64_t *>malloc(sizeof(int64_t) * (ndim if ndim else 1))
    if tensor.dl_tensor.shape == NULL:
        free(tensor)
        raise MemoryError()
    for i in range(ndim):
        tensor.dl_tensor.shape[i] = arr.shape[i]
    tensor.dl_tensor.data = <void *>arr.ptr
    tensor.dl_tensor.device.device_type = kDLCUDA
    tensor.dl_tensor.device.device_id = arr.device
    tensor.dl_tensor.ndim = ndim
    tensor.dl_tensor.dtype.code = <uint8_t>code[0]
    tensor.dl_tensor.dtype.bits = <uint8_t>code[1]
    tensor.dl_tensor.dtype.lanes = 1
    tensor.dl_tensor.strides = NULL   # C-contiguous
    tensor.dl_tensor.byte_offset = 0
    Py_INCREF(arr)
    tensor.manager_ctx = <void *>arr
    tensor.deleter = _dl_deleter
    return PyCapsule_New(tensor, b"dltensor", _capsule_destructor)


cdef dict _DLPACK_DTYPES = {(kDLFloat, 16): "float16", (kDLFloat, 32): "float32",
                            (kDLInt, 32): "int32", (kDLUInt, 32): "uint32",
                            (kDLInt, 64): "int64"}


def dlpack_view(obj, size_t stream=0):
    """(ptr, shape, dtype, byte strides or None when C-contiguous, device ordinal, keepalive)
    of a CUDA DLPack producer's array."""
    consumer = 1 if stream == 0 else stream
    try:
        capsule = obj.__dlpack__(stream=consumer)
    except TypeError:
        capsule = obj.__dlpack__()
    cdef DLManagedTensor *tensor = <DLManagedTensor *>PyCapsule_GetPointer(capsule, b"dltensor")
    cdef DLTensor *t = &tensor.dl_tensor
    if t.device.device_type != kDLCUDA:
        raise TypeError(f"DLPack array on device type {t.device.device_type}, not CUDA")
    dtype = _DLPACK_DTYPES.get((t.dtype.code, t.dtype.bits))
    if dtype is None or t.dtype.lanes != 1:
        raise TypeError(f"DLPack dtype code={t.dtype.code} bits={t.dtype.bits} is not supported")
    shape = tuple(t.shape[i] for i in range(t.ndim))
    dt = np.dtype(dtype)
    strides = None
    if t.strides != NULL:
        expected = 1
        for i in reversed(range(t.ndim)):
            if shape[i] != 1 and t.strides[i] != expected:
                strides = tuple(t.strides[j] * dt.itemsize for j in range(t.ndim))
                break
            expected *= shape[i]
    ptr = <size_t>t.data + t.byte_offset
    # Unconsumed, the capsule's own destructor releases the tensor when `capsule` dies.
    return ptr, shape, dt, strides, int(t.device.device_id), capsule


# ---------------------------------------------------------------------------------------------
# Kernels

def repack(size_t gptq, size_t perm, size_t marlin, int size_k, int size_n, size_t stream=0):
    check_ferrum(ferrum_repack(<const int32_t *>gptq, <const int32_t *>perm, <int32_t *>marlin,
                               size_k, size_n, <void *>stream))


def permute_cols(size_t a, size_t perm, size_t out, int size_m, int size_k, size_t stream=0):
    check_ferrum(ferrum_permute_cols(<const void *>a, <const int32_t *>perm, <void *>out,
                                     size_m, size_k, <void *>stream))


def mm_plan(int size_m, int size_k, int size_n, int num_experts=1, bint act_order=False,
            int tile=0, int m_blocks=0, int splits=0, int stream_k=0, int group_size=128):
    """The config and workspace the heuristic picks (or completes from the given fields) for
    scales in groups of group_size rows (32, 64 or 128; -1 or size_k: channelwise), as mm
    plans for a weight with those scales."""
    cdef ferrum_mm_config cfg
    cdef ferrum_mm_plan_info plan
    cdef int num_groups
    if group_size == -1 or group_size == size_k:
        num_groups, group_size = 1, size_k
    elif group_size > 0:
        num_groups = size_k // group_size
    else:
        raise ValueError(f"group_size={group_size}: use 32, 64, 128, or -1 for channelwise scales")
    cfg.tile, cfg.m_blocks, cfg.splits, cfg.stream_k = tile, m_blocks, splits, stream_k
    cfg.weights_pending = 0
    check_ferrum(ferrum_mm_plan_groups(size_m, size_k, size_n, num_experts, act_order,
                                       num_groups, group_size, &cfg, &plan))
    return {"tile": plan.config.tile, "m_blocks": plan.config.m_blocks,
            "splits": plan.config.splits, "m_slices": plan.m_slices, "grid": plan.grid,
            "stream_k": plan.sk_iters > 0, "sk_iters": plan.sk_iters,
            "counter_bytes": plan.counter_bytes, "data_bytes": plan.data_bytes,
            "cluster": bool(plan.cluster_reduce)}


# Workspaces, one per (device, stream): a zeroed counter buffer (the kernels leave it zero) and
# a data buffer (split-K partials, act-order copy of A). Calls on one stream are ordered by the
# stream, calls on different streams use different workspaces, and all of this runs under the
# GIL, so growing a workspace cannot race a launch that uses it. cudaFree waits for the device,
# so a replaced buffer is never freed under a running kernel.
# Handle 2 (cudaStreamPerThread) names a different stream in every thread, so its workspaces
# are per thread too; handles 0 and 1 both name the legacy default stream and share one.
cdef dict _workspaces = {}


cdef object _workspace_key(int device, size_t stream):
    if stream == 2:
        return (device, 2, PyThread_get_thread_ident())
    return (device, 0 if stream == 1 else stream)


cdef list _workspace(int device, size_t stream, size_t counter_bytes, size_t data_bytes):
    key = _workspace_key(device, stream)
    ws = _workspaces.get(key)
    cdef DeviceArray counters, data
    if ws is None:
        ws = [None, None]
        _workspaces[key] = ws
    counters, data = ws
    if counter_bytes and (counters is None or counters.nbytes < counter_bytes):
        counters = empty((counter_bytes + counter_bytes // 4,), np.uint8)
        check(cudaMemsetAsync(<void *>counters.ptr, 0, counters.nbytes, <cudaStream_t>stream),
              "cudaMemsetAsync(workspace)")
        ws[0] = counters
    if data_bytes and (data is None or data.nbytes < data_bytes):
        ws[1] = empty((data_bytes + data_bytes // 4,), np.uint8)
    return ws


def release_workspaces():
    _workspaces.clear()


def mm(size_t a, size_t b, size_t scales, size_t c, size_t perm, int size_m, int size_k,
       int size_n, int expert0, int num_experts, int num_groups, int group_size, int ldc,
       size_t stream=0, int tile=0, int m_blocks=0, int splits=0, int weights_pending=0,
       int stream_k=0, int device=-1):
    """Launch C = A @ W for experts expert0 .. expert0+num_experts-1 (all pointers on device).
    weights_pending=1: the kernel just before on the stream may have written b or scales.
    device: the current device when the caller knows it (-1: asked here)."""
    cdef ferrum_mm_config cfg
    cfg.tile, cfg.m_blocks, cfg.splits, cfg.stream_k = tile, m_blocks, splits, stream_k
    cfg.weights_pending = weights_pending
    if device < 0:
        device = current_device()
    _launch(a, b, scales, c, perm, size_m, size_k, size_n, expert0, num_experts, num_groups,
            group_size, ldc, stream, &cfg, device)


cdef int _launch(size_t a, size_t b, size_t scales, size_t c, size_t perm, int size_m, int size_k,
                 int size_n, int expert0, int num_experts, int num_groups, int group_size, int ldc,
                 size_t stream, ferrum_mm_config *cfg, int device) except -1:
    cdef ferrum_mm_plan_info plan
    cdef int status
    cdef size_t cptr = 0, cbytes = 0, dptr = 0, dbytes = 0
    cdef DeviceArray arr
    ws = _workspaces.get(_workspace_key(device, stream))
    for attempt in range(2):
        if ws is not None:
            if ws[0] is not None:
                arr = ws[0]
                cptr, cbytes = arr.ptr, arr.nbytes
            if ws[1] is not None:
                arr = ws[1]
                dptr, dbytes = arr.ptr, arr.nbytes
        status = ferrum_mm(<const void *>a, <const void *>b, <const void *>scales, <void *>c,
                           <const int32_t *>perm, size_m, size_k, size_n, expert0, num_experts,
                           num_groups, group_size, ldc, cfg, <void *>cptr, cbytes,
                           <void *>dptr, dbytes, &plan, <void *>stream)
        if status != FERRUM_ERR_WORKSPACE or attempt:
            break
        ws = _workspace(device, stream, plan.counter_bytes, plan.data_bytes)
    check_ferrum(status)
    return 0


cdef class Resident:
    """Device pointers and sizes of one MarlinWeight on cuda, kept in weight._aux["cuda"] by
    ferrum.cuda (which fills the fields); typed, so that mm_direct reads them as C values."""
    cdef public size_t b, s, perm, b_end, s_end
    cdef public object perm_array, keep
    cdef public int size_k, size_n, groups, group_size, num_experts, pending, device
    cdef public bint only_gpu


cdef object _direct_weight = None    # ferrum.MarlinWeight
cdef object _direct_tensor = None    # torch.Tensor
cdef object _direct_f16 = None       # torch.float16
cdef object _direct_cupy = None      # cupy.ndarray
cdef object _np_f16 = np.dtype(np.float16)


def enable_direct(weight_type, tensor_type=None, f16=None, cupy_type=None):
    """ferrum.cuda names the types mm_direct takes (avoids importing ferrum.api, torch or cupy
    here)."""
    global _direct_weight, _direct_tensor, _direct_f16, _direct_cupy
    _direct_weight = weight_type
    if tensor_type is not None:
        _direct_tensor, _direct_f16 = tensor_type, f16
    if cupy_type is not None:
        _direct_cupy = cupy_type


cdef object _plain_shape(x, bint torch):
    """x's shape where x (a torch tensor or a cupy array) is float16, on the GPU and
    C-contiguous; else None."""
    if torch:
        if not x.is_cuda or x.dtype is not _direct_f16 or not x.is_contiguous():
            return None
    elif x.dtype is not _np_f16 or not x.flags.c_contiguous:
        return None
    return x.shape


def mm_direct(a, weight, expert, out, stream):
    """ferrum.mm(a, weight, expert=expert, out=out, stream=stream) for the plain call, in C:
    a and out both torch tensors or both cupy arrays, float16, 2-D, C-contiguous, 16-byte
    aligned and on the GPU, a weight already resident on the only GPU there is, the right
    shapes, no overlap, and stream None (the legacy default stream, as the general path takes
    it) or a handle given as an int. Returns out; None where any of that does not hold, and
    ferrum.mm then takes its general path (which also raises the errors). This is the call a
    decoding loop makes; the general path costs ~2 µs more of Python per call."""
    cdef Resident r
    cdef ferrum_mm_config cfg
    cdef size_t a_ptr, c_ptr, a_end, c_end, handle = 0
    cdef long long m, k, cols
    cdef int expert0, experts
    cdef bint torch
    kind = type(a)
    if kind is _direct_tensor:
        torch = True
    elif kind is _direct_cupy:
        torch = False
    else:
        return None
    if type(out) is not kind or type(weight) is not _direct_weight:
        return None
    if stream is not None:
        if type(stream) is not int or not 0 <= stream <= 0xFFFFFFFFFFFFFFFF:
            return None
        handle = stream
    res = weight._aux.get("cuda")
    if type(res) is not Resident or weight.backend != "cuda":
        return None
    r = <Resident>res
    if not r.only_gpu:
        return None
    if expert is None:
        expert0, experts = 0, r.num_experts
    elif type(expert) is int and 0 <= expert < r.num_experts:
        expert0, experts = expert, 1
    else:
        return None
    shape = _plain_shape(a, torch)
    if shape is None or len(shape) != 2:
        return None
    m, k = shape[0], shape[1]
    cols = <long long>r.size_n * experts
    if k != r.size_k or m < 1 or m > 2147483647:
        return None
    shape = _plain_shape(out, torch)
    if shape is None or len(shape) != 2 or shape[0] != m or shape[1] != cols:
        return None
    if torch:
        a_ptr, c_ptr = a.data_ptr(), out.data_ptr()
    else:
        a_ptr, c_ptr = a.data.ptr, out.data.ptr
    if not a_ptr or not c_ptr or (a_ptr | c_ptr) & 15:
        return None
    a_end, c_end = a_ptr + <size_t>(m * k * 2), c_ptr + <size_t>(m * cols * 2)
    if (c_ptr < a_end and a_ptr < c_end) or (c_ptr < r.b_end and r.b < c_end) or \
            (c_ptr < r.s_end and r.s < c_end):
        return None
    cfg.tile = cfg.m_blocks = cfg.splits = cfg.stream_k = 0
    cfg.weights_pending = r.pending
    _launch(a_ptr, r.b, r.s, c_ptr, r.perm, <int>m, <int>k, r.size_n, expert0, experts, r.groups,
            r.group_size, <int>cols, handle, &cfg, r.device)
    r.pending = 0
    return out
