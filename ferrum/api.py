"""The public API. Every argument is checked here, once, before any backend does any work."""

from __future__ import annotations

import operator
import sys
from typing import Any, Sequence

import numpy as np

from . import _registry
from . import format as F

# ------------------------------------------------------------------------------------------------
# Argument checks: each names the argument, the value and the rule.


def _fail(argument: str, value: Any, rule: str, kind=ValueError):
    raise kind(f"{argument}={_short(value)}: {rule}")


def _short(value: Any) -> str:
    """The value as an error message shows it: arrays by type, shape and dtype; scalars (numpy's
    too: expert=np.int64(5) must show the 5) and anything else by
    its repr, cut to 60 characters (a tuple or list of arrays would otherwise fill a screen).
    Never raises: an object whose repr or shape misbehaves is shown by its type."""
    try:
        shape = getattr(value, "shape", None)
        dtype = getattr(value, "dtype", None)
        if shape is not None and shape != () and not isinstance(value, (int, float, str, bool,
                                                                          tuple)):
            return f"<{type(value).__name__} shape={tuple(shape)} dtype={dtype}>"
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__} object>"
    return text if len(text) <= 60 else text[:57] + "..."


def _int(argument: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)):
        _fail(argument, value, "must be an integer, not a bool", TypeError)
    try:
        return operator.index(value)
    except TypeError:
        _fail(argument, value, "must be an integer", TypeError)


def _framework(x: Any) -> str:
    """"torch" or "cupy" for those libraries' arrays (read through fast attributes), else ""."""
    module = type(x).__module__
    if module.startswith("torch") and hasattr(x, "is_cuda"):
        return "torch"
    if module.startswith("cupy") and hasattr(x, "data") and hasattr(x, "dtype"):
        return "cupy"
    return ""


_TORCH_DTYPES: dict[Any, np.dtype] = {}


def _torch_dtype(x: Any) -> np.dtype:
    dt = _TORCH_DTYPES.get(x.dtype)
    if dt is None:
        name = str(x.dtype).rsplit(".", 1)[-1]
        try:
            dt = np.dtype(name)
        except TypeError:
            _fail("array", x, f"has dtype {x.dtype}, which ferrum does not support", TypeError)
        _TORCH_DTYPES[x.dtype] = dt
    return dt


def _is_device_array(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return False
    lib = _framework(x)
    if lib == "torch":
        return bool(x.is_cuda)
    if lib == "cupy":
        return True
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None:
        try:
            return dev()[0] not in (1, 3)   # kDLCPU, kDLCUDAHost
        except Exception:
            return False
    return False


def _is_metal_array(x: Any) -> bool:
    """x is the metal backend's resident array (a MetalArray: a wgpu buffer with its shape and
    dtype beside it). Looked up in sys.modules, so that asking never imports wgpu. The module
    may be there half-imported (another thread's first use of the metal backend): until it
    defines MetalArray, no MetalArray exists, and x is not one."""
    metal = sys.modules.get("ferrum.metal.backend")
    cls = getattr(metal, "MetalArray", None)
    return cls is not None and type(x) is cls


def _on_gpu(x: Any) -> bool:
    """x lives on a GPU: a CUDA device array or a MetalArray."""
    return _is_device_array(x) or _is_metal_array(x)


def _resident_kind(x: Any) -> str:
    """What error messages call an array that lives on a GPU: "GPU", or "metal" for a
    MetalArray."""
    return "metal" if _is_metal_array(x) else "GPU"


def _meta(argument: str, x: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a numpy array, a MetalArray, a __cuda_array_interface__ array or a
    DLPack array."""
    if isinstance(x, np.ndarray):
        return x.shape, x.dtype
    if _is_metal_array(x):
        return x.shape, x.dtype
    lib = _framework(x)
    if lib == "torch" and x.is_cuda:
        return tuple(x.shape), _torch_dtype(x)
    if lib == "cupy":
        return x.shape, x.dtype
    cai = getattr(x, "__cuda_array_interface__", None) if not isinstance(x, (list, tuple)) else None
    if cai is not None:
        # A malformed interface (not a dict, no shape or typestr, a shape that is not a tuple
        # of integers, data that is not a (pointer, read-only) pair) is the argument's fault:
        # refused by name here, not a KeyError or AttributeError from a later look-up.
        shape = cai.get("shape") if isinstance(cai, dict) else None
        data = cai.get("data") if isinstance(cai, dict) else None
        if (not isinstance(shape, (tuple, list)) or
                not all(isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_))
                        and s >= 0 for s in shape) or
                not isinstance(cai.get("typestr"), str) or
                not (isinstance(data, (tuple, list)) and len(data) == 2)):
            _fail(argument, x, "has a malformed __cuda_array_interface__ (it must be a dict with "
                  "'shape', a tuple of non-negative integers, 'typestr', a string, and 'data', "
                  "a (pointer, read-only) pair)", TypeError)
        if cai.get("mask") is not None:
            _fail(argument, x, "has a __cuda_array_interface__ mask; masked arrays are not "
                  "supported")
        try:
            dtype = np.dtype(cai["typestr"])
        except TypeError:
            _fail(argument, x, f"has __cuda_array_interface__ typestr {cai['typestr']!r}, which "
                  "is not a numpy type string", TypeError)
        return tuple(int(s) for s in cai["shape"]), dtype
    if _is_device_array(x) and hasattr(x, "shape") and hasattr(x, "dtype"):
        name = str(x.dtype).rsplit(".", 1)[-1]
        try:
            return tuple(int(s) for s in x.shape), np.dtype(name)
        except TypeError:
            _fail(argument, x, f"has dtype {x.dtype}, which ferrum does not support", TypeError)
    if x is None or isinstance(x, (str, bytes, dict)):
        _fail(argument, x, "must be an array", TypeError)
    arr = _asarray(argument, x)
    return arr.shape, arr.dtype


def _asarray(argument: str, x: Any) -> np.ndarray:
    """x as a plain numpy array in the machine's byte order: backends test ``type(x) is
    np.ndarray`` and treat anything else as a device array. A byte-swapped array ('>i4', '>f2') holds
    the same values as its native twin, so it is converted, not refused (the kernels and the
    .view() calls below read raw native words). What numpy cannot read as an array (a ragged
    nested list, an object whose __array__ fails) is an error naming the argument."""
    if type(x) is np.ndarray:
        arr = x
    else:       # a subclass (memmap, matrix) becomes a plain ndarray view of the same memory
        try:
            arr = np.asarray(x)
        except ValueError as exc:
            _fail(argument, x, f"must be a rectangular array of numbers ({exc})")
        except Exception as exc:
            _fail(argument, x, f"cannot be read as an array ({type(exc).__name__}: {exc})",
                  TypeError)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _once(argument: str, x: Any) -> Any:
    """x, or for an array-like that is neither a numpy array nor a GPU array (a list, an object
    with __array__), that array-like read into numpy once: its checks and its use then see the
    same array, however often its __array__ would answer, and whatever it would answer next.
    Errors after that show the array read (its shape and dtype); what reads as objects, which
    no argument takes, is refused here, shown as given."""
    if isinstance(x, (np.ndarray, str, bytes, dict)) or x is None or _on_gpu(x):
        return x
    arr = _asarray(argument, x)
    if arr.dtype == object:
        _fail(argument, x, "must be an array of numbers, got dtype object", TypeError)
    return arr


def _host(argument: str, x: Any) -> np.ndarray:
    if _on_gpu(x):
        _fail(argument, x, f"is a {_resident_kind(x)} array; this operation takes host (numpy) "
              "arrays here", TypeError)
    return _asarray(argument, x)


def _check_array(argument: str, x: Any, dtypes: Sequence[Any], shape: tuple | None = None,
                 ndim: int | None = None) -> tuple[tuple[int, ...], np.dtype]:
    shp, dt = _meta(argument, x)
    if not dt.isnative and not _is_device_array(x):    # host arrays are converted (_asarray)
        dt = dt.newbyteorder("=")
    if dt not in dtypes:
        allowed = [np.dtype(d) for d in dtypes]
        _fail(argument, x, f"dtype must be {' or '.join(str(d) for d in allowed)}, got {dt}",
              TypeError)
    want_ndim = len(shape) if shape is not None else ndim
    if want_ndim is not None and len(shp) != want_ndim:
        _fail(argument, x, f"must be {want_ndim}-D{' ' + _shape_text(shape) if shape else ''}, "
              f"got {len(shp)}-D shape {shp}")
    if shape is not None and any(w is not None and w != s for w, s in zip(shape, shp)):
        _fail(argument, x, f"shape must be {_shape_text(shape)}, got {shp}")
    return shp, dt


def _shape_text(shape: tuple) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def _check_num_bits(argument: str, num_bits: Any) -> int:
    bits = _int(argument, num_bits)
    if bits == 8:
        _fail(argument, num_bits, "8-bit weights are not supported yet; ferrum runs num_bits=4")
    if bits != F.NUM_BITS:
        _fail(argument, num_bits, "must be 4 (uint4b8 GPTQ weights)")
    return bits


def _check_sizes(size_k: Any, size_n: Any, k_name="size_k", n_name="size_n") -> tuple[int, int]:
    k = _int(k_name, size_k)
    n = _int(n_name, size_n)
    if k <= 0 or k % F.MIN_K_MULTIPLE:
        _fail(k_name, size_k, f"must be a positive multiple of {F.MIN_K_MULTIPLE}")
    if n <= 0 or n % F.MIN_N_MULTIPLE:
        _fail(n_name, size_n, f"must be a positive multiple of {F.MIN_N_MULTIPLE}")
    return k, n


def _check_group_size(group_size: Any, size_k: int) -> int:
    g = _int("group_size", group_size)
    if g not in F.GROUP_SIZES and g != size_k:
        _fail("group_size", group_size,
              f"must be one of {', '.join(map(str, F.GROUP_SIZES))} or size_k ({size_k})")
    if g > 0 and size_k % g:
        _fail("group_size", group_size, f"must divide size_k ({size_k})")
    return g


def _check_perm(argument: str, perm: Any, size_k: int) -> np.ndarray:
    p = _host(argument, perm)
    # An empty list reads as float64: its fault is its length, not a dtype the caller chose.
    if p.size and p.dtype.kind not in "iu":
        _fail(argument, perm, f"must be an integer array, got dtype {p.dtype}", TypeError)
    if p.shape != (size_k,):
        _fail(argument, perm, f"must have shape [{size_k}] (size_k), got {p.shape}")
    if size_k and (p.min() < 0 or p.max() >= size_k or
                   np.bincount(p.astype(np.int64), minlength=size_k).max() != 1):
        _fail(argument, perm, f"must be a permutation of 0..{size_k - 1}")
    return p.astype(np.int32)


def _check_expert_perms(argument: str, perm: Any, size_k: int, experts: int) -> np.ndarray:
    """A stack's act-order perms: int [E, K], each expert's row a permutation of 0..K-1."""
    p = _host(argument, perm)
    if p.size and p.dtype.kind not in "iu":
        _fail(argument, perm, f"must be an integer array, got dtype {p.dtype}", TypeError)
    if p.shape != (experts, size_k):
        _fail(argument, perm, f"must have shape [{experts}, {size_k}] (num_experts, size_k): one "
              f"act-order row order per expert, got {p.shape}")
    for e in range(experts):
        _check_perm(f"{argument}[{e}]", p[e], size_k)
    return p.astype(np.int32)


def _check_backend_name(backend: Any) -> str:
    return _registry.check_name(backend)


def _default_backend(backend: Any, *arrays: Any) -> str:
    if backend is not None:
        return _check_backend_name(backend)
    if any(_is_metal_array(x) for x in arrays):
        return "metal"
    return "cuda" if any(_is_device_array(x) for x in arrays) else "cpu"


# ------------------------------------------------------------------------------------------------
# Format-level operations


def repack(qweight, size_k, size_n, *, num_bits=4, perm=None, backend=None):
    """GPTQ int32 [K/8, N] -> Marlin int32 [K/16, 2N] (vLLM's gptq_marlin_repack).

    With ``perm`` (int [K]) Marlin row k is GPTQ row perm[k], as for act-order checkpoints.
    Runs on ``backend`` (default: cpu for host arrays, cuda for GPU arrays); host input gives a
    numpy result, GPU input a GPU result.
    """
    _check_num_bits("num_bits", num_bits)
    k, n = _check_sizes(size_k, size_n)
    name = _default_backend(backend, qweight)
    qweight = _once("qweight", qweight)
    _check_array("qweight", qweight, [np.int32, np.uint32], shape=(k // F.PACK, n))
    p = None if perm is None else _check_perm("perm", perm, k)
    be = _registry.get(name)
    on_device = _on_gpu(qweight)
    if on_device and not be.owns(qweight):
        _fail("qweight", qweight, f"is a {_resident_kind(qweight)} array; backend={name!r} takes "
              "host arrays", TypeError)
    if not on_device:
        qweight = np.ascontiguousarray(_asarray("qweight", qweight)).view(np.int32)
    result = be.repack(qweight, p, k, n)
    return result if on_device else np.asarray(be.to_host(result)).view(np.int32)


def permute_scales(scales, size_k, size_n, group_size):
    """GPTQ scales [groups, N] -> Marlin-permuted float16 [groups, N] (vLLM's marlin_permute_scales)."""
    k, n = _check_sizes(size_k, size_n)
    g = _check_group_size(group_size, k)
    groups = F.num_groups(k, g)
    scales = _once("scales", scales)
    _check_array("scales", scales, [np.float16, np.float32], shape=(groups, n))
    s = _host("scales", scales)
    _check_scales("scales", s)
    return F.permute_scales_reference(s, k, n, g)


def _check_finite(argument: str, x: np.ndarray):
    if not np.isfinite(x).all():
        _fail(argument, x, "must be finite (contains NaN or inf)")


_F16_MAX = float(np.finfo(np.float16).max)


def _check_scales(argument: str, s: np.ndarray):
    """Scales are stored as float16 (the Marlin format's), so they must be finite and fit it."""
    _check_finite(argument, s)
    if s.dtype != np.float16 and s.size:
        # Values of 65520 and above round to inf in float16.
        top = float(np.abs(s).max())
        if top >= 65520.0:
            _fail(argument, s, f"must fit float16, the format's scale type (|scale| < 65520, "
                  f"which rounds to its largest value {_F16_MAX:g}); the largest is {top:g}")


# ------------------------------------------------------------------------------------------------
# Weights


class MarlinWeight:
    """A repacked layer, or a stack of experts of one shape, resident on one backend.

    qweight   int32 [K/16, 2n], or [E, K/16, 2n] when ``stacked``
    scales    float16 [groups, n], or [E, groups, n]; permuted as marlin_permute_scales does
    perm      int32 [K] act-order row order (Marlin row k = GPTQ row perm[k]), [E, K] one per
              expert of a stack (load_stacked with g_idx), or None
    size_k, size_n (per expert), group_size, num_bits, num_experts, stacked, backend
    """

    def __init__(self, qweight, scales, *, size_k, size_n, group_size, perm=None,
                 num_bits=4, backend=None, stacked=None):
        self.num_bits = _check_num_bits("num_bits", num_bits)
        k, n = _check_sizes(size_k, size_n)
        g = _check_group_size(group_size, k)
        name = _default_backend(backend, qweight, scales)
        qweight = _once("qweight", qweight)
        q_shape, _ = _meta("qweight", qweight)
        if stacked is None:
            stacked = len(q_shape) == 3
        elif not isinstance(stacked, (bool, np.bool_)):
            _fail("stacked", stacked, "must be True, False or None (None: 3-D qweight is a stack)",
                  TypeError)
        groups = F.num_groups(k, g)
        if stacked:
            _check_array("qweight", qweight, [np.int32, np.uint32], ndim=3)
            experts = q_shape[0]
            if experts < 1:
                _fail("qweight", qweight, "a stack needs at least one expert")
            _check_array("qweight", qweight, [np.int32, np.uint32],
                         shape=(experts, k // F.TILE, 2 * n))
            scales = _once("scales", scales)
            _check_array("scales", scales, [np.float16], shape=(experts, groups, n))
        else:
            experts = 1
            _check_array("qweight", qweight, [np.int32, np.uint32], shape=(k // F.TILE, 2 * n))
            scales = _once("scales", scales)
            _check_array("scales", scales, [np.float16], shape=(groups, n))
        if not _on_gpu(scales):   # host scales of any kind
            _check_finite("scales", _asarray("scales", scales))
        if perm is None:
            self.perm = None
        elif stacked:
            self.perm = _check_expert_perms("perm", perm, k, experts)
        else:
            self.perm = _check_perm("perm", perm, k)
        if self.perm is not None and (self.perm == np.arange(k, dtype=np.int32)).all():
            self.perm = None            # the identity order needs no activation permute
        if self.perm is not None:       # the weight's own copy, checked once: the kernels index
            self.perm.setflags(write=False)   # A with it, so it stays a permutation
        self.size_k, self.size_n, self.group_size = k, n, g
        self.num_experts, self.stacked = experts, bool(stacked)
        self.backend = name
        be = _registry.get(name)
        self.qweight = self._resident(be, "qweight", qweight, np.int32)
        self.scales = self._resident(be, "scales", scales, np.float16)
        self._aux: dict[str, Any] = {}

    @staticmethod
    def _resident(be, argument, x, dtype):
        """x on backend ``be``: a device array the backend owns is used as it is (no copy, as
        for a slice of a larger allocation); a host array is copied, so that the weight never
        shares memory with its caller's arrays."""
        if not isinstance(x, np.ndarray) and be.owns(x):
            return x
        if _on_gpu(x):
            _fail(argument, x, f"is a {_resident_kind(x)} array; backend={be.name!r} takes host "
                  "arrays", TypeError)
        return _from_host(be, argument, x, np.ascontiguousarray(_asarray(argument, x)).view(dtype))

    @property
    def num_groups(self) -> int:
        return F.num_groups(self.size_k, self.group_size)

    @classmethod
    def from_gptq(cls, qweight, scales, *, group_size, g_idx=None, backend=None, num_bits=4):
        """From GPTQ on-disk tensors: qweight int32 [K/8, N], scales [groups, N], optional g_idx."""
        _check_num_bits("num_bits", num_bits)
        qweight = _once("qweight", qweight)
        q_shape, _ = _check_array("qweight", qweight, [np.int32, np.uint32], ndim=2)
        k, n = _check_sizes(q_shape[0] * F.PACK, q_shape[1], "qweight.shape[0]*8", "qweight.shape[1]")
        g = _check_group_size(group_size, k)
        groups = F.num_groups(k, g)
        scales = _once("scales", scales)
        _check_array("scales", scales, [np.float16, np.float32], shape=(groups, n))
        name = _default_backend(backend, qweight)
        perm = None if g_idx is None else _perm_from_g_idx(g_idx, k, g)
        scales_host = _host("scales", scales)
        _check_scales("scales", scales_host)
        marlin = repack(qweight, k, n, perm=perm, backend=name)
        return cls(marlin, F.permute_scales_reference(scales_host, k, n, g), size_k=k, size_n=n,
                   group_size=g, perm=perm, backend=name, stacked=False)

    def to(self, backend) -> "MarlinWeight":
        """This weight on another backend (a copy); itself when already there."""
        name = _check_backend_name(backend)
        if name == self.backend:
            return self
        src, dst = _registry.get(self.backend), _registry.get(name)
        moved = object.__new__(MarlinWeight)
        moved.__dict__.update(self.__dict__)
        moved.backend = name
        moved.qweight = _from_host(dst, "weight", self, src.to_host(self.qweight), "its qweight")
        moved.scales = _from_host(dst, "weight", self, src.to_host(self.scales), "its scales")
        moved._aux = {}
        return moved

    def __reduce__(self):
        """Pickle (and deepcopy) through host arrays: the copy is made anew on the same backend
        when unpickled, without the backends' caches."""
        host = self if self.backend == "cpu" else self.to("cpu")
        return (_restore_weight, (np.asarray(host.qweight), np.asarray(host.scales), self.size_k,
                                  self.size_n, self.group_size, self.perm, self.num_bits,
                                  self.stacked, self.backend))

    def __copy__(self) -> "MarlinWeight":
        """A shallow copy shares the resident arrays (as a copy of any object shares its
        attributes' values); copy.deepcopy copies them."""
        twin = object.__new__(MarlinWeight)
        twin.__dict__.update(self.__dict__)
        return twin

    def __repr__(self) -> str:
        stack = f", num_experts={self.num_experts}" if self.stacked else ""
        order = ", act_order" if self.perm is not None else ""
        return (f"MarlinWeight(size_k={self.size_k}, size_n={self.size_n}, group_size="
                f"{self.group_size}, num_bits={self.num_bits}{stack}{order}, backend={self.backend!r})")


def _from_host(be, argument: str, shown: Any, host: np.ndarray, what: str = ""):
    """host copied onto backend be; a backend's refusal (an array larger than its largest
    buffer: metal's maxBufferSize) names the argument it came from."""
    try:
        return be.from_host(host)
    except ValueError as exc:
        _fail(argument, shown, f"{what}: {exc}" if what else str(exc))


def _restore_weight(qweight, scales, size_k, size_n, group_size, perm, num_bits, stacked,
                    backend) -> MarlinWeight:
    return MarlinWeight(qweight, scales, size_k=size_k, size_n=size_n, group_size=group_size,
                        perm=perm, num_bits=num_bits, backend=backend, stacked=stacked)


def _perm_from_g_idx(g_idx, size_k: int, group_size: int, argument: str = "g_idx") -> np.ndarray:
    g = _host(argument, g_idx)
    if g.size and g.dtype.kind not in "iu":     # [] is a length error, as for perm
        _fail(argument, g_idx, f"must be an integer array, got dtype {g.dtype}", TypeError)
    if g.shape != (size_k,):
        _fail(argument, g_idx, f"must have shape [{size_k}] (size_k), got {g.shape}")
    groups = F.num_groups(size_k, group_size)
    rows = F.effective_group_size(size_k, group_size)
    if g.min() < 0 or g.max() >= groups:
        _fail(argument, g_idx, f"values must lie in 0..{groups - 1} (the scale groups)")
    counts = np.bincount(g.astype(np.int64), minlength=groups)
    if (counts != rows).any():
        bad = int(np.flatnonzero(counts != rows)[0])
        _fail(argument, g_idx, f"must assign exactly group_size={rows} rows to every group; "
              f"group {bad} has {int(counts[bad])}")
    return F.act_order_perm(g)


def load_stacked(qweights, scales, *, group_size, g_idx=None, bits=4,
                 backend=None) -> MarlinWeight:
    """E experts of one shape -> a stacked MarlinWeight (expert-major Marlin tiles and scales).

    qweights: a list of E GPTQ int32 [K/8, n] arrays or one [E, K/8, n] array; scales likewise,
    [E, groups, n] float16 or float32. g_idx (act-order experts, as vLLM's MoE Marlin takes
    them): a list of E int [K] arrays (None for an expert without act-order) or one [E, K]
    array; each expert's rows are repacked in its own group order, and mm permutes the
    activations per expert to match (``weight.perm`` is then [E, K]).
    """
    _check_num_bits("bits", bits)
    q_list = _expert_list("qweights", qweights)
    s_list = _expert_list("scales", scales)
    if len(q_list) != len(s_list):
        _fail("scales", scales, f"must hold one entry per expert: {len(q_list)} qweights, "
              f"{len(s_list)} scales")
    name = _default_backend(backend)
    q_list = [_once(f"qweights[{e}]", q) for e, q in enumerate(q_list)]
    s_list = [_once(f"scales[{e}]", s) for e, s in enumerate(s_list)]
    q0_shape, _ = _check_array("qweights[0]", q_list[0], [np.int32, np.uint32], ndim=2)
    k, n = _check_sizes(q0_shape[0] * F.PACK, q0_shape[1], "qweights[0].shape[0]*8",
                        "qweights[0].shape[1]")
    g = _check_group_size(group_size, k)
    groups = F.num_groups(k, g)
    for e, (q, s) in enumerate(zip(q_list, s_list)):
        _check_array(f"qweights[{e}]", q, [np.int32, np.uint32], shape=(k // F.PACK, n))
        _check_array(f"scales[{e}]", s, [np.float16, np.float32], shape=(groups, n))
    # Every rule, the target backend's availability included, before the first expert is repacked.
    q_hosts = [_host(f"qweights[{e}]", q) for e, q in enumerate(q_list)]
    s_hosts = [_host(f"scales[{e}]", s) for e, s in enumerate(s_list)]
    for e, s_host in enumerate(s_hosts):
        _check_scales(f"scales[{e}]", s_host)
    perms = _expert_perms_from_g_idx(g_idx, len(q_list), k, g)
    _registry.get(name)
    cpu = _registry.get("cpu")
    marlin = np.stack([cpu.repack(np.ascontiguousarray(q).view(np.int32),
                                  None if perms is None else perms[e], k, n)
                       for e, q in enumerate(q_hosts)])
    permuted = np.stack([F.permute_scales_reference(s, k, n, g) for s in s_hosts])
    return MarlinWeight(marlin, permuted, size_k=k, size_n=n, group_size=g, perm=perms,
                        backend=name, stacked=True)


def _expert_perms_from_g_idx(g_idx, experts: int, size_k: int, group_size: int):
    """load_stacked's g_idx -> the experts' act-order perms int32 [E, K] (the identity for an
    expert given None), or None where no expert has any."""
    if g_idx is None:
        return None
    if isinstance(g_idx, (list, tuple)):
        entries = list(g_idx)
    else:
        g = _host("g_idx", g_idx)
        if g.ndim != 2:
            _fail("g_idx", g_idx, f"must be a list of {experts} [K] arrays (None for an expert "
                  f"without act-order) or one [E, K] = [{experts}, {size_k}] array, got shape "
                  f"{g.shape}")
        entries = [g[e] for e in range(g.shape[0])]
    if len(entries) != experts:
        _fail("g_idx", g_idx, f"must hold one entry per expert: {experts} qweights, "
              f"{len(entries)} g_idx")
    identity = np.arange(size_k, dtype=np.int32)
    perms = np.stack([identity if x is None else
                      _perm_from_g_idx(x, size_k, group_size, f"g_idx[{e}]")
                      for e, x in enumerate(entries)]).astype(np.int32)
    return None if (perms == identity).all() else perms


def _expert_list(argument: str, x: Any) -> list:
    if isinstance(x, (list, tuple)):
        if not x:
            _fail(argument, x, "must hold at least one expert")
        return list(x)
    x = _once(argument, x)
    shape, _ = _meta(argument, x)
    if len(shape) != 3:
        _fail(argument, x, f"must be a list of 2-D arrays or one 3-D [E, ...] array, got shape {shape}")
    if shape[0] < 1:
        _fail(argument, x, "must hold at least one expert")
    if _is_metal_array(x):      # not indexable: refused as the experts of a list would be
        _host(argument, x)
    return [x[e] for e in range(shape[0])]


# ------------------------------------------------------------------------------------------------
# Compute


def mm(a, weight, *, expert=None, out=None, backend=None, stream=None):
    """C = A @ W: float16 a [M, K] times a MarlinWeight -> float16 [M, n].

    On stacked weights, ``expert=e`` multiplies by expert e and ``expert=None`` by all experts
    side by side ([M, E*n]). ``out`` receives the result in place. ``stream`` (cuda only) is a
    stream handle or an object carrying one.
    """
    if out is not None and backend is None:
        direct = _registry.DIRECT_MM.get(type(a))
        if direct is not None:
            result = direct(a, weight, expert, out, stream)
            if result is not None:
                return result
    try:
        fast = _mm_fast_accept(a, weight, expert, out, backend)
    except Exception:       # an array that misbehaves when read: the general path says what
        fast = None
    if fast is None:
        return _mm_checked(a, weight, expert, out, backend, stream)
    be, expert = fast
    if stream is None:
        return be.mm(a, weight, expert, out)
    return be.mm(a, weight, expert, out, stream=stream)


def _mm_checked(a, weight, expert, out, backend, stream):
    """mm's general path: every argument rule of mm, each failure a ValueError or TypeError
    naming the argument, the value and the rule."""
    if not isinstance(weight, MarlinWeight):
        _fail("weight", weight, "must be a ferrum.MarlinWeight (see MarlinWeight.from_gptq)",
              TypeError)
    if backend is not None:
        name = _check_backend_name(backend)
        if name != weight.backend:
            _fail("backend", backend, f"the weight lives on {weight.backend!r}; move it first "
                  f"with weight.to({name!r}) and call mm with the moved weight")
    be = _registry.get(weight.backend)
    a = _once("a", a)
    a_shape, _ = _check_array("a", a, [np.float16], ndim=2)
    if a_shape[1] != weight.size_k:
        _fail("a", a, f"must have size_k={weight.size_k} columns, got {a_shape[1]}")
    if a_shape[0] < 1:
        _fail("a", a, "must have at least one row (M >= 1)")
    a_given = a
    if isinstance(a, np.ndarray) or not be.owns(a):
        if _on_gpu(a):
            _fail("a", a, f"is a {_resident_kind(a)} array but the weight lives on "
                  f"{weight.backend!r}", TypeError)
        a = _asarray("a", a)
    if expert is not None:
        e = _int("expert", expert)
        if not 0 <= e < weight.num_experts:
            _fail("expert", expert, f"must be in 0..{weight.num_experts - 1} "
                  f"(the weight has {weight.num_experts} expert(s))")
        expert = e
    elif not weight.stacked:
        expert = 0
    cols = weight.size_n * (weight.num_experts if expert is None else 1)
    if out is not None:
        o_shape, _ = _check_array("out", out, [np.float16], shape=(a_shape[0], cols))
        if _is_device_array(out):
            if not be.owns(out):
                _fail("out", out, f"is a GPU array but the weight lives on {weight.backend!r}",
                      TypeError)
        elif _is_metal_array(out):
            if weight.backend == "metal":
                _fail("out", out, "must be a numpy array: the metal backend's mm returns its "
                      "result to the host (a MetalArray is not written in place)", TypeError)
            _fail("out", out, f"is a metal array but the weight lives on {weight.backend!r}; "
                  "out must be a numpy array" + (" or a GPU array of the cuda backend"
                                                 if weight.backend == "cuda" else ""), TypeError)
        elif not isinstance(out, np.ndarray):
            _fail("out", out, "must be a numpy array (or a GPU array of the weight's backend), "
                  "since the result is written into it", TypeError)
        if isinstance(out, np.ndarray) and not out.flags.writeable:
            _fail("out", out, "must be writable")
        if _framework(out) == "" and not isinstance(out, np.ndarray):
            cai = getattr(out, "__cuda_array_interface__", None)
            if cai is not None and cai["data"][1]:
                _fail("out", out, "must be writable (its __cuda_array_interface__ marks it "
                      "read-only)")
        if (isinstance(out, np.ndarray) and isinstance(a_given, np.ndarray)     # as given, not
                and np.may_share_memory(out, a_given) and np.shares_memory(out, a_given)):  # a copy
            _fail("out", out, "must not overlap a")
        # A host-resident weight's arrays (cpu), and the act-order perm (a host array on every
        # backend: written over, its row indices would send the next call out of bounds).
        if isinstance(out, np.ndarray) and any(
                isinstance(x, np.ndarray) and np.may_share_memory(out, x) and
                np.shares_memory(out, x) for x in (weight.qweight, weight.scales, weight.perm)):
            _fail("out", out, "must not overlap the weight's qweight, scales or perm")
    options = {}
    if stream is not None:
        if weight.backend != "cuda":
            _fail("stream", stream, f"streams apply to the cuda backend, not {weight.backend!r}")
        options["stream"] = stream
    if isinstance(out, np.ndarray) and (type(out) is not np.ndarray or not out.dtype.isnative):
        # A memmap or other subclass is written through a plain view of its memory, a
        # byte-swapped array by assignment (backends write native float16 words).
        view = np.asarray(out) if out.dtype.isnative else None
        result = be.mm(a, weight, expert, view, **options)
        if view is None:        # (a device a gives a device result: fetched to the host)
            out[...] = result if isinstance(result, np.ndarray) else be.to_host(result)
        return out
    return be.mm(a, weight, expert, out, **options)


# ------------------------------------------------------------------------------------------------
# mm's fast path: the common call on CUDA device arrays, accepted in a few attribute reads.
# (Before it, a backend may offer a compiled shortcut for one exact type of `a`:
# _registry.DIRECT_MM, the cuda backend's _cuda.mm_direct for torch tensors with out= given and
# stream None or an int. It too only ever accepts, returning None for anything but its plain
# case.)
#
# Kinds: torch.Tensor, cupy.ndarray, ferrum's DeviceArray (exact types), other classes with a
# __cuda_array_interface__, and DLPack-only classes with .shape and .dtype (as JAX's).
# It only ever accepts. An input of a kind it does not know, or one that breaks any rule, goes
# to _mm_checked, which applies every rule and raises the error; so the rules and their
# messages live once, there. What follows restates, for a few exact array types, when
# _mm_checked would pass a call through unchanged (tests/test_fastpath.py checks that it accepts
# nothing _mm_checked rejects, and that it hands the backend the same call).

_F16 = np.dtype(np.float16)
_CAI = "__cuda_array_interface__"

#: exact type -> reader(x) returning x's shape when x is a float16 array of the cuda backend
#: (None when it is not, or when the general path should look); False: no fast reader
_FAST_READERS: dict[type, Any] = {}


def _fast_reader(t: type):
    reader = _FAST_READERS.get(t)
    if reader is None:
        reader = _FAST_READERS[t] = _make_fast_reader(t)
    return reader


def _make_fast_reader(t: type):
    torch, cupy = sys.modules.get("torch"), sys.modules.get("cupy")
    if torch is not None and t is getattr(torch, "Tensor", None):
        f16 = torch.float16

        def read_torch(x):   # _meta: torch & is_cuda -> shape, str(dtype) "torch.float16"
            return x.shape if x.is_cuda and x.dtype is f16 else None
        return read_torch
    if (cupy is not None and t is getattr(cupy, "ndarray", None)) or (
            t.__module__ == "ferrum._cuda" and t.__name__ == "DeviceArray"):
        def read_dtype_attr(x):   # _meta: cupy -> x.shape, x.dtype; DeviceArray: its CAI says the same
            return x.shape if x.dtype is _F16 else None
        return read_dtype_attr
    module = t.__module__ or ""
    if (module.startswith(("torch", "cupy")) or issubclass(t, (np.ndarray, list, tuple)) or
            hasattr(t, "__getattr__")):
        return False
    if not hasattr(t, _CAI):
        return _read_dlpack if hasattr(t, "__dlpack_device__") else False
    f16 = _F16.str

    def read_cai(x):   # _meta: any other object with a __cuda_array_interface__ (unmasked;
        # writable, since out= is read here too)
        cai = getattr(x, _CAI, None)
        if cai is None or cai["typestr"] != f16 or cai.get("mask") is not None or cai["data"][1]:
            return None
        shape = cai["shape"]
        return shape if type(shape) is tuple else None
    return read_cai


def _read_dlpack(x):
    """_meta and owns() for a DLPack-only array: no CAI, on a CUDA device, dtype named float16
    (without .shape or .dtype it raises AttributeError, and the general path decides)."""
    if getattr(x, _CAI, None) is not None or x.__dlpack_device__()[0] != 2:   # kDLCUDA
        return None
    if str(x.dtype).rsplit(".", 1)[-1] != "float16":
        return None
    shape = x.shape
    return shape if type(shape) is tuple else None


def _mm_fast_accept(a, weight, expert, out, backend):
    """(backend object, expert as _mm_checked passes it) when _mm_checked would accept this call
    and pass it through unchanged, for device arrays of the kinds above; None to let it decide."""
    read = _FAST_READERS.get(type(a)) or _fast_reader(type(a))
    if not read or type(weight) is not MarlinWeight or weight.backend != "cuda":
        return None
    if backend is not None and not (type(backend) is str and backend == "cuda"):
        return None
    be = _registry._ready.get("cuda")
    shape = read(a)
    if be is None or shape is None or len(shape) != 2 or shape[1] != weight.size_k or \
            not shape[0] >= 1:
        return None
    if expert is None:
        cols = weight.size_n * weight.num_experts if weight.stacked else weight.size_n
        if not weight.stacked:
            expert = 0
    elif type(expert) is int and 0 <= expert < weight.num_experts:
        cols = weight.size_n
    else:
        return None
    if out is not None:
        read = _FAST_READERS.get(type(out)) or _fast_reader(type(out))
        out_shape = read(out) if read else None
        if out_shape is None or len(out_shape) != 2 or out_shape[0] != shape[0] or \
                out_shape[1] != cols:
            return None
    return be, expert


def dequantize(weight, *, expert=None) -> np.ndarray:
    """The dense float32 [K, N] matrix mm multiplies by, rows in the original (GPTQ) order.

    On stacked weights ``expert=e`` gives expert e; ``expert=None`` all experts side by side.
    """
    if not isinstance(weight, MarlinWeight):
        _fail("weight", weight, "must be a ferrum.MarlinWeight", TypeError)
    if expert is not None:
        e = _int("expert", expert)
        if not 0 <= e < weight.num_experts:
            _fail("expert", expert, f"must be in 0..{weight.num_experts - 1}")
        experts = [e]
    else:
        experts = list(range(weight.num_experts))
    host = weight if weight.backend == "cpu" else weight.to("cpu")
    cpu = _registry.get("cpu")
    parts = [cpu.dequantize(host, e) for e in experts]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def quantize(w, *, group_size=128):
    """Symmetric round-to-nearest uint4b8: float [K, N] -> GPTQ (qweight int32 [K/8, N], scales float16).

    scale = max|w| / 7.5 per group and column (GPTQ's symmetric grid; rounded up to float16),
    q = clip(round(w/s) + 8, 0, 15): every weight within half a step of its value.

    Where this differs from GPTQ's Quantizer (sym=True, 4 bits: scale = (xmax - xmin) / 15,
    zero = 8), so that scales need not match a GPTQ/GPTQModel checkpoint bit for bit:
    GPTQ rounds the scale to the nearest float16 (here: up); in a group with no negative
    weight GPTQ keeps xmin = 0, so its scale is max / 15 and weights above 7/15 of the max are
    clipped (here: max / 7.5, nothing clipped); an all-zero group gets scale 2/15 there and 0
    here (q = 8, so the weight is 0 either way).
    """
    w = _once("w", w)
    _check_array("w", w, [np.float16, np.float32, np.float64], ndim=2)
    arr = _host("w", w)
    k, n = _check_sizes(arr.shape[0], arr.shape[1], "w.shape[0]", "w.shape[1]")
    g = _check_group_size(group_size, k)
    _check_finite("w", arr)
    rows = F.effective_group_size(k, g)
    blocks = arr.astype(np.float64).reshape(k // rows, rows, n)
    absmax = np.abs(blocks).max(axis=1)
    if (absmax / 7.5 > np.finfo(np.float16).max).any():
        _fail("w", w, "has values too large for float16 scales (max |w| / 7.5 > 65504)")
    exact = absmax / 7.5
    scales = exact.astype(np.float16)
    # Rounded up to float16, never down, so that |w| / scale <= 7.5 and no weight is clipped
    # past half a step (matters where scales are float16 subnormals: tiny weights).
    low = scales.astype(np.float64) < exact
    scales[low] = np.nextafter(scales[low], np.float16(np.inf))
    safe = np.where(scales == 0, 1.0, scales.astype(np.float64))
    q = np.clip(np.rint(blocks / safe[:, None, :]) + 8, 0, 15).astype(np.uint32)
    return F.pack_gptq(q.reshape(k, n)), scales
