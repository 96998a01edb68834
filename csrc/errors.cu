// errors.cu -- the thread-local last-error message and the cached device properties.
#include <stdarg.h>
#include <stdio.h>

#include <mutex>

#include <cstdlib>

#include "common.cuh"

namespace ferrum {

namespace {
thread_local char g_message[512] = "";
thread_local int g_cuda_status = 0;

constexpr int kMaxDevices = 64;
std::mutex g_props_mutex;
DeviceProps g_props[kMaxDevices];
bool g_props_valid[kMaxDevices] = {};
}  // namespace

int set_error(int status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(g_message, sizeof(g_message), fmt, args);
    va_end(args);
    g_cuda_status = 0;
    return status;
}

int set_cuda_error(cudaError_t err, const char *what) {
    snprintf(g_message, sizeof(g_message), "%s: %s (%s, in %s)", cudaGetErrorName(err),
             cudaGetErrorString(err), "CUDA", what);
    g_cuda_status = static_cast<int>(err);
    return FERRUM_ERR_CUDA;
}

void clear_error() {
    g_message[0] = '\0';
    g_cuda_status = 0;
}

int current_device_props(DeviceProps *props) {
    int device = 0;
    FERRUM_CUDA_CHECK(cudaGetDevice(&device));
    if (device >= 0 && device < kMaxDevices) {
        std::lock_guard<std::mutex> guard(g_props_mutex);
        if (g_props_valid[device]) {
            *props = g_props[device];
            return FERRUM_OK;
        }
    }
    DeviceProps p;
    p.device = device;
    FERRUM_CUDA_CHECK(cudaDeviceGetAttribute(&p.sm_count, cudaDevAttrMultiProcessorCount, device));
    FERRUM_CUDA_CHECK(cudaDeviceGetAttribute(&p.major, cudaDevAttrComputeCapabilityMajor, device));
    FERRUM_CUDA_CHECK(cudaDeviceGetAttribute(&p.minor, cudaDevAttrComputeCapabilityMinor, device));
    FERRUM_CUDA_CHECK(cudaDeviceGetAttribute(&p.max_smem_optin,
                                             cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    // FERRUM_MAX_SMEM=bytes caps the shared memory the planner may give a block: a test of
    // the plans for GPUs that hold less (sm_80: 166912, sm_86/sm_89: 101376) on one that holds more.
    if (const char *cap = getenv("FERRUM_MAX_SMEM")) {
        const long v = strtol(cap, nullptr, 10);
        if (v > 0 && v < p.max_smem_optin) p.max_smem_optin = static_cast<int>(v);
    }
    if (device >= 0 && device < kMaxDevices) {
        std::lock_guard<std::mutex> guard(g_props_mutex);
        g_props[device] = p;
        g_props_valid[device] = true;
    }
    *props = p;
    return FERRUM_OK;
}

}  // namespace ferrum

extern "C" const char *ferrum_get_last_error(void) { return ferrum::g_message; }
extern "C" int ferrum_get_last_cuda_status(void) { return ferrum::g_cuda_status; }
extern "C" const char *ferrum_version(void) { return "ferrum-marlin 0.1.0"; }
