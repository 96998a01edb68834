"""Cross-backend validation: the same fresh random problems on every available backend.

Repack (of every expert of a stack) is compared bit for bit with the format's own reference,
format.repack_reference, so cpu's repack is checked too; mm with a float64 reference (relative
Frobenius error) and with cpu. Outputs are poisoned with NaN before each run so an unwritten element fails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import _registry
from . import format as F

MM_TOLERANCE = 1e-3


@dataclass
class Problem:
    """A random GPTQ layer (or stack of experts) and its float64 dense weight."""
    name: str
    size_k: int
    size_n: int
    group_size: int
    qweights: list                       # E GPTQ int32 [K/8, N]
    scales: list                         # E float16 [groups, N]
    g_idx: np.ndarray | list | None = None    # act-order: int [K]; a stack's, E of them (a list)
    dense: list = field(default_factory=list)   # E float64 [K, N], GPTQ row order

    def expert_g_idx(self, e: int) -> np.ndarray | None:
        return self.g_idx[e] if isinstance(self.g_idx, list) else self.g_idx

    @property
    def num_experts(self) -> int:
        return len(self.qweights)


def random_problem(rng: np.random.Generator, size_k: int, size_n: int, group_size: int, *,
                   act_order: bool = False, experts: int = 1, name: str = "") -> Problem:
    groups = F.num_groups(size_k, group_size)
    rows = F.effective_group_size(size_k, group_size)
    # act-order: a g_idx per expert, a stack's each in its own order (vLLM's MoE act-order)
    orders = ([(rng.permutation(size_k) // rows).astype(np.int32) for _ in range(experts)]
              if act_order else [None] * experts)
    g_idx = orders if experts > 1 and act_order else orders[0]
    qweights, scales, dense = [], [], []
    for e in range(experts):
        q = rng.integers(0, 16, size=(size_k, size_n), dtype=np.uint32)
        # Scales of both signs and a spread of magnitudes, sized so outputs are O(1).
        s = (rng.uniform(0.5, 1.5, (groups, size_n)) * rng.choice([-1, 1], (groups, size_n))
             / (4.0 * np.sqrt(size_k))).astype(np.float16)
        qweights.append(F.pack_gptq(q))
        scales.append(s)
        dense.append(F.dequantize_reference(q, s, size_k, group_size, orders[e]))
    label = name or (f"K{size_k} N{size_n} G{group_size}" + (" act" if act_order else "")
                     + (f" E{experts}" if experts > 1 else ""))
    return Problem(label, size_k, size_n, group_size, qweights, scales, g_idx, dense)


def problems(rng: np.random.Generator, quick: bool = False) -> list[Problem]:
    shapes = [(128, 64), (256, 192), (512, 320), (1024, 256)]
    out = []
    for i, (k, n) in enumerate(shapes):
        for g in dict.fromkeys((-1, 32, 64, 128, k)):
            if quick and g not in (-1, 128):
                continue
            out.append(random_problem(rng, k, n, g))
    out.append(random_problem(rng, 512, 256, 128, act_order=True))
    out.append(random_problem(rng, 1024, 128, 64, act_order=True))
    out.append(random_problem(rng, 384, 192, 32, act_order=True))
    out.append(random_problem(rng, 256, 128, 128, experts=3))
    out.append(random_problem(rng, 512, 64, -1, experts=2))
    out.append(random_problem(rng, 256, 192, 64, act_order=True, experts=3))
    return out


# Rows that reach every cuda kernel the planner picks: the swapped kernel (1 and 5: up to 8
# rows with groups of 32 rows on sm_90a and on other GPUs); the wgmma kernel's 16-row blocks on
# sm_90a (1-16 rows; FP32 scales with groups of 64 or 128 rows), mma.sync's fp16 path at 9-16
# for groups of 32 rows and on other GPUs; the wgmma kernel's 32-row blocks (17-32) and
# 64/128-row blocks (33+); on metal gemv and the tiled kernel.
M_VALUES = (1, 5, 16, 24, 64, 300)


@dataclass
class Result:
    backend: str
    problem: str
    op: str              # "repack" or "mm M=.." (".. eN" for one expert)
    error: float         # mm: relative Frobenius error vs float64; repack: words that differ
                         # from format.repack_reference (all experts)
    vs_cpu: float        # mm: relative error vs the cpu backend; repack: same as error
    passed: bool
    note: str = ""


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def _poisoned(shape) -> np.ndarray:
    return np.full(shape, np.nan, dtype=np.float16)


def crosscheck(backends=None, *, seed=None, quick=False, m_values=None, log=None) -> list[Result]:
    """Run the validation problems on each available backend (default: all of them), or on the
    backends named (a name or a list of names; each must be available: ValueError otherwise).
    cpu, the reference the others are compared with, always runs, and its results are listed too.

    seed: None (fresh) or a non-negative integer; quick: fewer, smaller problems; m_values: the
    row counts M of each mm (default ``M_VALUES``); log: None or a callable given a line per
    backend and problem. Returns a list of Result; ``all(r.passed for r in results)`` is the
    verdict.
    """
    from . import api
    # Every argument before any work, each error naming it (as the rest of the API does).
    if not isinstance(quick, (bool, np.bool_)):
        raise TypeError(f"quick={quick!r}: must be True or False")
    if log is not None and not callable(log):
        raise TypeError(f"log={log!r}: must be a callable taking one string, or None")
    if m_values is not None:
        try:        # (a 0-d array has __iter__ but raises when iterated)
            if isinstance(m_values, (str, bytes)):
                raise TypeError
            m_values = tuple(m_values)
        except TypeError:
            raise TypeError(f"m_values={m_values!r}: must be a sequence of row counts M >= 1"
                            ) from None
        if not m_values:
            raise ValueError("m_values=(): must hold at least one row count M >= 1")
        for m in m_values:
            if api._int("m_values", m) < 1:
                raise ValueError(f"m_values={m_values!r}: every M must be >= 1, got {m!r}")
        # The row counts as plain ints (as seed and expert are used): a 0-d integer array would
        # otherwise reach the dicts keyed by M (unhashable) and the labels of the results.
        m_values = tuple(api._int("m_values", m) for m in m_values)
    if seed is not None:    # as every integer argument (not a bool, which numpy takes as 1)
        value = api._int("seed", seed)
        if value < 0:
            raise ValueError(f"seed={seed!r}: must be None or a non-negative integer")
        seed = value
    rng = np.random.default_rng(seed)
    if backends is None:
        names = [n for n in _registry.BACKEND_MODULES if _registry.info(n).available]
    else:
        try:
            listed = [backends] if isinstance(backends, str) else list(backends)
        except TypeError:
            raise TypeError(f"backends={backends!r}: must be a backend name, a list of names, "
                            f"or None (every available backend)") from None
        names = [_registry.check_name(b, "backends") for b in listed]
        names = list(dict.fromkeys(names))     # each backend once
        for n in names:
            info = _registry.info(n)
            if not info.available:
                raise ValueError(f"backends={backends!r}: {n!r} is not available here "
                                 f"({info.reason})")
    # cpu first, named or not: it is the reference every backend is compared with, so its
    # results must exist before another backend's are compared ("metal", "cpu" was a KeyError).
    names = ["cpu"] + [n for n in names if n != "cpu"]
    m_values = M_VALUES if m_values is None else m_values
    results: list[Result] = []
    for prob in problems(rng, quick):
        activations = {m: rng.standard_normal((m, prob.size_k)).astype(np.float16)
                       for m in m_values}
        refs = {m: activations[m].astype(np.float64) @ np.concatenate(prob.dense, axis=1)
                for m in m_values}
        cpu_out: dict = {}
        # One expert per M for the single-expert runs, the same on every backend.
        experts = {m: int(rng.integers(prob.num_experts)) for m in m_values}
        perms = [None if prob.expert_g_idx(e) is None else F.act_order_perm(prob.expert_g_idx(e))
                 for e in range(prob.num_experts)]
        expected = [F.repack_reference(q, prob.size_k, prob.size_n, perm)
                    for q, perm in zip(prob.qweights, perms)]
        for name in names:
            t0 = time.perf_counter()
            mismatches = sum(int((np.asarray(api.repack(q, prob.size_k, prob.size_n, perm=perm,
                                                        backend=name)) != words).sum())
                             for q, perm, words in zip(prob.qweights, perms, expected))
            results.append(Result(name, prob.name, "repack", mismatches, mismatches,
                                  mismatches == 0))
            if prob.num_experts > 1:
                weight = api.load_stacked(prob.qweights, prob.scales, group_size=prob.group_size,
                                          g_idx=prob.g_idx, backend=name)
            else:
                weight = api.MarlinWeight.from_gptq(prob.qweights[0], prob.scales[0],
                                                    group_size=prob.group_size, g_idx=prob.g_idx,
                                                    backend=name)
            for m in m_values:
                runs = [(None, refs[m])]
                if prob.num_experts > 1:
                    e = experts[m]
                    runs.append((e, refs[m][:, e * prob.size_n:(e + 1) * prob.size_n]))
                for expert, ref in runs:
                    out = _poisoned(ref.shape)
                    api.mm(activations[m], weight, expert=expert, out=out)
                    key = (m, expert)
                    if name == "cpu":
                        cpu_out[key] = out.astype(np.float64)
                    err = rel_error(out, ref)
                    vs_cpu = rel_error(out, cpu_out[key])
                    op = f"mm M={m}" + ("" if expert is None else f" e{expert}")
                    results.append(Result(name, prob.name, op, err, vs_cpu,
                                          err <= MM_TOLERANCE and vs_cpu <= MM_TOLERANCE))
            if log is not None:
                log(f"  {name:6s} {prob.name:28s} {time.perf_counter() - t0:7.2f} s")
    return results


def format_table(results: list[Result]) -> str:
    """One row per (backend, problem): repack verdict and the worst mm errors over all M."""
    rows: dict[tuple[str, str], dict] = {}
    for r in results:
        row = rows.setdefault((r.backend, r.problem), {"repack": "-", "mm": 0, "err": 0.0,
                                                       "cpu": 0.0, "ok": True, "failed": []})
        row["ok"] &= r.passed
        if r.op == "repack":
            row["repack"] = "exact" if r.passed else f"{int(r.error)} words differ"
        else:
            row["mm"] += 1
            row["err"] = max(row["err"], r.error)
            row["cpu"] = max(row["cpu"], r.vs_cpu)
            if not r.passed:
                row["failed"].append(r.op)
    lines = [f"{'backend':7s} {'problem':26s} {'repack':>15s} {'mm runs':>7s} "
             f"{'max err vs f64':>14s} {'max err vs cpu':>14s}  verdict"]
    for (backend, problem), row in rows.items():
        verdict = "ok" if row["ok"] else "FAIL " + ", ".join(row["failed"])
        lines.append(f"{backend:7s} {problem:26s} {row['repack']:>15s} {row['mm']:7d} "
                     f"{row['err']:14.2e} {row['cpu']:14.2e}  {verdict}")
    return "\n".join(lines)
