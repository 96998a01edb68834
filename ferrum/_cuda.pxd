# cython: language_level=3
# Declarations only: the CUDA runtime subset ferrum uses, ferrum's C API (csrc/ferrum_marlin.h)
# and the DLPack structs (csrc/dlpack_abi.h). The logic lives in _cuda.pyx.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint64_t


cdef extern from "cuda_runtime_api.h" nogil:
    ctypedef int cudaError_t
    ctypedef void *cudaStream_t
    ctypedef void *cudaEvent_t
    ctypedef int cudaMemcpyKind

    cdef int cudaSuccess
    cdef int cudaMemcpyHostToDevice
    cdef int cudaMemcpyDeviceToHost
    cdef int cudaMemcpyDeviceToDevice
    cdef int cudaEventDisableTiming
    cdef int cudaDevAttrComputeCapabilityMajor
    cdef int cudaDevAttrComputeCapabilityMinor
    cdef int cudaDevAttrMultiProcessorCount

    const char *cudaGetErrorString(cudaError_t error)
    const char *cudaGetErrorName(cudaError_t error)
    cudaError_t cudaGetLastError()
    cudaError_t cudaGetDeviceCount(int *count)
    cudaError_t cudaGetDevice(int *device)
    cudaError_t cudaSetDevice(int device)
    ctypedef struct cudaPointerAttributes:
        int type
        int device
    cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *attributes, const void *ptr)
    cudaError_t cudaDeviceGetAttribute(int *value, int attr, int device)
    cudaError_t cudaDriverGetVersion(int *version)
    cudaError_t cudaRuntimeGetVersion(int *version)
    cudaError_t cudaMalloc(void **ptr, size_t size)
    cudaError_t cudaFree(void *ptr)
    cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, cudaMemcpyKind kind,
                                cudaStream_t stream)
    cudaError_t cudaMemsetAsync(void *ptr, int value, size_t count, cudaStream_t stream)
    cudaError_t cudaStreamSynchronize(cudaStream_t stream)
    cudaError_t cudaDeviceSynchronize()
    cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags)
    cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream)
    cudaError_t cudaEventDestroy(cudaEvent_t event)
    cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags)


cdef extern from "cuda_runtime.h" nogil:
    ctypedef struct cudaDeviceProp:
        char name[256]
        int major
        int minor
        int multiProcessorCount
        size_t totalGlobalMem
    cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device)


cdef extern from "ferrum_marlin.h" nogil:
    cdef int FERRUM_OK
    cdef int FERRUM_ERR_INVALID
    cdef int FERRUM_ERR_CUDA
    cdef int FERRUM_ERR_WORKSPACE

    ctypedef struct ferrum_mm_config:
        int tile
        int m_blocks
        int splits
        int weights_pending
        int stream_k

    ctypedef struct ferrum_mm_plan_info:
        ferrum_mm_config config
        int m_slices
        int grid
        size_t counter_bytes
        size_t data_bytes
        int cluster_reduce
        int sk_iters

    const char *ferrum_get_last_error()
    int ferrum_get_last_cuda_status()
    const char *ferrum_version()
    int ferrum_repack(const int32_t *gptq, const int32_t *perm, int32_t *marlin,
                      int size_k, int size_n, void *stream)
    int ferrum_permute_cols(const void *a, const int32_t *perm, void *out,
                            int size_m, int size_k, void *stream)
    int ferrum_copy_strided(const void *src, void *dst, int64_t d0, int64_t d1, int64_t d2,
                            int64_t s0, int64_t s1, int64_t s2, int elem_bytes, void *stream)
    int ferrum_stream_probe(const void *src, void *dst, int64_t nbytes, int sm_blocks, void *stream)
    int ferrum_mm_plan(int size_m, int size_k, int size_n, int num_experts, int act_order,
                       const ferrum_mm_config *requested, ferrum_mm_plan_info *plan)
    int ferrum_mm_plan_groups(int size_m, int size_k, int size_n, int num_experts, int act_order,
                              int num_groups, int group_size, const ferrum_mm_config *requested,
                              ferrum_mm_plan_info *plan)
    int ferrum_mm(const void *a, const void *b, const void *scales, void *c, const int32_t *perm,
                  int size_m, int size_k, int size_n, int expert0, int num_experts,
                  int num_groups, int group_size, int ldc,
                  const ferrum_mm_config *requested,
                  void *counters, size_t counter_bytes, void *data, size_t data_bytes,
                  ferrum_mm_plan_info *plan_out, void *stream)


cdef extern from "dlpack_abi.h" nogil:
    ctypedef struct DLDevice:
        int device_type
        int device_id

    ctypedef struct DLDataType:
        uint8_t code
        uint8_t bits
        uint16_t lanes

    ctypedef struct DLTensor:
        void *data
        DLDevice device
        int ndim
        DLDataType dtype
        int64_t *shape
        int64_t *strides
        uint64_t byte_offset

    ctypedef struct DLManagedTensor:
        DLTensor dl_tensor
        void *manager_ctx
        void (*deleter)(DLManagedTensor *)

    cdef int kDLCPU
    cdef int kDLCUDA
    cdef int kDLInt
    cdef int kDLUInt
    cdef int kDLFloat


cdef class DeviceArray:
    cdef readonly size_t ptr
    cdef readonly size_t nbytes
    cdef readonly tuple shape
    cdef readonly object dtype
    cdef readonly int device
    cdef bint _owner
    cdef object _base
    cdef public object stream   # the stream that last wrote it (CAI v3 "stream"), or None
