// common.cuh -- error plumbing shared by the library's translation units.
// Every CUDA status goes through FERRUM_CUDA_CHECK, which records CUDA's own message and
// returns FERRUM_ERR_CUDA from the calling C API function; nothing aborts.
#pragma once

#include <cuda_runtime.h>

#include "ferrum_marlin.h"

namespace ferrum {

int set_error(int status, const char *fmt, ...);
int set_cuda_error(cudaError_t err, const char *what);
void clear_error();

// Properties of the current device that the heuristic and the launches need, cached.
struct DeviceProps {
    int device;
    int sm_count;
    int major, minor;     // compute capability
    int max_smem_optin;   // bytes a block may get after cudaFuncSetAttribute
};
int current_device_props(DeviceProps *props);

}  // namespace ferrum

#define FERRUM_CUDA_CHECK(expr)                                          \
    do {                                                                 \
        cudaError_t ferrum_err_ = (expr);                                \
        if (ferrum_err_ != cudaSuccess) return ferrum::set_cuda_error(ferrum_err_, #expr); \
    } while (0)

#define FERRUM_REQUIRE(cond, ...)                                        \
    do {                                                                 \
        if (!(cond)) return ferrum::set_error(FERRUM_ERR_INVALID, __VA_ARGS__); \
    } while (0)
