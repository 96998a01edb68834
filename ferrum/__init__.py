"""ferrum: W4A16 kernels — FP16 activations times 4-bit GPTQ weights in the Marlin tile format.

Three backends behind one API: "cuda" (our Marlin library, csrc/), "cpu" (Numba, the reference)
and "metal" (WGSL through wgpu: Metal on Apple GPUs, Vulkan elsewhere).
"""

from __future__ import annotations

from types import MappingProxyType

from . import _registry
from ._registry import BackendInfo
from .api import MarlinWeight, dequantize, load_stacked, mm, permute_scales, quantize, repack
from .check import crosscheck
from .errors import CudaError

__version__ = "0.1.0"


def backends():
    """Mapping "cpu" | "cuda" | "metal" -> BackendInfo (.available, .reason, .device)."""
    return MappingProxyType({name: _registry.info(name) for name in _registry.BACKEND_MODULES})


__all__ = ["BackendInfo", "CudaError", "MarlinWeight", "backends", "crosscheck", "dequantize",
           "load_stacked", "mm", "permute_scales", "quantize", "repack", "__version__"]
