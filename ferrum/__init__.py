"""ferrum: W4A16 kernels — FP16 activations times 4-bit GPTQ weights in the Marlin tile format.

Three backends behind one API: "cuda" (our Marlin library, csrc/), "cpu" (Numba, the reference)
and "metal" (WGSL through wgpu: Metal on Apple GPUs, Vulkan elsewhere).
"""

from __future__ import annotations

import os as _os
import pkgutil as _pkgutil
from types import MappingProxyType

# cpu/ and metal/ sit beside ferrum/ in the repository and install as ferrum.cpu and ferrum.metal;
# the CUDA extension is compiled into the installed package. When this file is imported from a
# source checkout (e.g. `python -m ferrum` run in the repository root after `pip install .`),
# submodules come from the checkout first -- its cpu/ and metal/, as edited -- and what it lacks
# (the compiled extension) from an installed copy.
__path__ = _pkgutil.extend_path(__path__, __name__)
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "cpu", "kernels.py")) and _root not in __path__:
    __path__.insert(1, _root)

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
