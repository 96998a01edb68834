"""One registry of backends. Each backend is a module exposing ``BACKEND``, a ``Backend``.

The front API (ferrum/api.py) checks every argument once and hands a backend only well-formed
work: right dtypes, ranks, shapes and ranges. A backend never re-validates; it runs kernels.
Importing a backend module must not fail for lack of a GPU, a driver, wgpu or a compiled
extension: ``info()`` reports the reason instead.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

BACKEND_MODULES = {
    "cpu": "ferrum.cpu",
    "cuda": "ferrum.cuda",
    "metal": "ferrum.metal",
}


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str = ""        # why not available ("" when available)
    device: str = ""        # what runs the kernels, e.g. "NVIDIA H100 80GB HBM3 (sm_90)"
    version: str = ""       # the backend's own version string (driver, wgpu, numba ...)

    def __repr__(self) -> str:
        state = f"device={self.device!r}" if self.available else f"reason={self.reason!r}"
        return f"BackendInfo({self.name!r}, available={self.available}, {state})"


class Backend:
    """What a backend provides. Arrays a backend keeps ("resident") are of its own kind.

    Arguments reaching these methods are validated by the front API:
      qweight  GPTQ int32 [K/8, N] (numpy, or the backend's native array kind)
      perm     numpy int32 [K], a permutation, or None
      a        float16 [M, K] (numpy, or the backend's native array kind)
      weight   a MarlinWeight resident on this backend
      expert   None (all experts side by side) or 0 <= expert < num_experts
      out      None, or a float16 array of the result's shape of an acceptable kind
    """

    name = "?"

    def info(self) -> BackendInfo:
        raise NotImplementedError

    # --- memory -------------------------------------------------------------------------------
    def from_host(self, array: np.ndarray) -> Any:
        """Copy a contiguous host array into resident storage."""
        raise NotImplementedError

    def to_host(self, resident: Any) -> np.ndarray:
        """Copy resident storage back to a new numpy array."""
        raise NotImplementedError

    def owns(self, array: Any) -> bool:
        """True when ``array`` is already of this backend's native kind."""
        return isinstance(array, np.ndarray)

    # --- kernels ------------------------------------------------------------------------------
    def repack(self, qweight: Any, perm: np.ndarray | None, size_k: int, size_n: int) -> Any:
        """GPTQ -> resident Marlin int32 [K/16, 2N], rows in ``perm`` order when given."""
        raise NotImplementedError

    def mm(self, a: Any, weight: Any, expert: int | None, out: Any, **options: Any) -> Any:
        """float16 [M, K] x weight -> float16 [M, n] (one expert) or [M, E*n] (all)."""
        raise NotImplementedError


_lock = threading.Lock()
_loaded: dict[str, Backend | BackendInfo] = {}


def _load(name: str) -> Backend | BackendInfo:
    with _lock:
        if name not in _loaded:
            try:
                module = importlib.import_module(BACKEND_MODULES[name])
                _loaded[name] = module.BACKEND
            except Exception as exc:  # a backend that cannot even load says why
                _loaded[name] = BackendInfo(name, False, f"{type(exc).__name__}: {exc}")
        return _loaded[name]


def info(name: str) -> BackendInfo:
    backend = _load(name)
    if isinstance(backend, BackendInfo):
        return backend
    try:
        return backend.info()
    except Exception as exc:
        return BackendInfo(name, False, f"{type(exc).__name__}: {exc}")


def check_name(name: Any, argument: str = "backend") -> str:
    if not isinstance(name, str):   # a wrong kind of value, as elsewhere in the API
        raise TypeError(f"{argument}={name!r}: must be a backend name (a string), one of "
                        f"{', '.join(repr(n) for n in BACKEND_MODULES)}")
    if name not in BACKEND_MODULES:
        raise ValueError(f"{argument}={name!r}: unknown backend; choose one of "
                         f"{', '.join(repr(n) for n in BACKEND_MODULES)}")
    return str(name)    # the plain name, also for a str subclass (np.str_ from a numpy array)


_ready: dict[str, Backend] = {}     # backends found available once: the hot path's lookup
# ferrum.mm's shortcut per exact type of `a` (the cuda backend's compiled torch path): called
# as direct(a, weight, expert, out, stream) for calls with out= and no backend given, it
# returns out or, where the call is not its plain case, None (the general path then runs).
DIRECT_MM: dict[type, Any] = {}


def get(name: str) -> Backend:
    """The backend object, or ValueError saying why it is not available."""
    backend = _ready.get(name)
    if backend is not None:
        return backend
    check_name(name)
    status = info(name)
    if not status.available:
        raise ValueError(f"backend={name!r} is not available: {status.reason}")
    backend = _load(name)
    assert isinstance(backend, Backend)
    _ready[name] = backend
    return backend
