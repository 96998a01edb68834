"""python -m ferrum info | check | bench"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time

import numpy as np


def _info(args) -> int:
    import ferrum
    print(f"ferrum {ferrum.__version__}  python {platform.python_version()}  numpy {np.__version__}"
          f"  {platform.platform()}")
    for name, info in ferrum.backends().items():
        if info.available:
            extra = f"  [{info.version}]" if info.version else ""
            print(f"  {name:6s} available      {info.device}{extra}")
        else:
            print(f"  {name:6s} not available  {info.reason}")
    return 0


def _check(args) -> int:
    import ferrum
    from ferrum.check import format_table
    names = args.backend or None
    infos = ferrum.backends()
    missing = [n for n in names or () if not infos[n].available]
    if missing:
        for n in missing:
            print(f"backend {n!r} is not available: {infos[n].reason}")
        return 2
    available = [n for n, i in infos.items() if i.available]
    print(f"ferrum check: backends available: {', '.join(available) or 'none'}"
          + (f"; checking {', '.join(names)}" if names else ""))
    for n, i in infos.items():
        if not i.available and not names:
            print(f"  (skipping {n}: {i.reason})")
    t0 = time.perf_counter()
    results = ferrum.crosscheck(names, seed=args.seed, quick=args.quick,
                                log=print if args.verbose else None)
    print(format_table(results))
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed "
          f"({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


def _bench(args) -> int:
    import ferrum
    from ferrum import _registry
    if args.backend and len(args.backend) > 1:
        print(f"bench runs one backend at a time; got --backend {' --backend '.join(args.backend)}")
        return 2
    options = {"quick": args.quick, "seed": args.seed}
    try:
        options.update(_bench_problems(args))
    except ValueError as exc:
        print(f"python -m ferrum bench: {exc}")
        return 2
    name = args.backend[0] if args.backend else "cpu"
    info = ferrum.backends()[name]
    if not info.available:
        print(f"backend {name!r} is not available: {info.reason}")
        return 2
    module = importlib.import_module(_registry.BACKEND_MODULES[name])
    print(f"ferrum bench --backend {name}: {info.device}")
    try:
        module.run_bench(options)
    except MemoryError as exc:      # problems asked for that this machine cannot hold
        print(f"python -m ferrum bench: not enough memory for the problems asked for "
              f"(MemoryError: {exc})")
        return 1
    except ValueError as exc:       # a backend's refusal, with its rule (metal: a problem
        print(f"python -m ferrum bench: {exc}")     # past the adapter's largest buffer)
        return 1
    return 0


#: Largest K, N or M bench takes: every backend's kernels take sizes as 32-bit integers (and
#: numpy refuses a dimension past its own index range with a bare "maximum allowed dimension").
_MAX_SIZE = 2 ** 31 - 1


def _bench_problems(args) -> dict:
    """The problems asked for with --shapes, --m and --group-size, checked as MarlinWeight and
    mm would check them (ValueError naming the option), before any backend work."""
    from ferrum import api
    out = {}
    if args.shapes is not None:
        shapes = []
        for item in args.shapes.split(","):
            k, _, n = item.strip().lower().partition("x")
            try:   # no "x": n is "", not a number
                size_k, size_n = int(k), int(n)
            except ValueError:
                raise ValueError(f"--shapes: {item.strip()!r} is not KxN (e.g. 4096x6144)") from None
            api._check_sizes(size_k, size_n, "--shapes K", "--shapes N")
            for name, size in (("K", size_k), ("N", size_n)):
                if size > _MAX_SIZE:
                    raise ValueError(f"--shapes {name}={size}: must be at most {_MAX_SIZE} "
                                     "(the kernels' sizes are 32-bit integers)")
            shapes.append((size_k, size_n))
        out["shapes"] = shapes
    if args.m is not None:
        rows = []
        for item in args.m.split(","):
            try:
                m = int(item)
            except ValueError:
                raise ValueError(f"--m: {item.strip()!r} is not a row count") from None
            if m < 1:
                raise ValueError(f"--m: {m}: row counts must be at least 1")
            if m > _MAX_SIZE:
                raise ValueError(f"--m: {m}: row counts must be at most {_MAX_SIZE} (the "
                                 "kernels' sizes are 32-bit integers)")
            rows.append(m)
        out["m_values"] = rows
    if args.group_size is not None:
        from ferrum import format as F
        g = args.group_size
        if "shapes" not in out and g not in F.GROUP_SIZES:   # the backend's own shapes: any K
            raise ValueError(f"--group-size {g}: must be one of {', '.join(map(str, F.GROUP_SIZES))}")
        for size_k, _ in out.get("shapes", ()):
            try:
                api._check_group_size(g, size_k)
            except ValueError as exc:
                raise ValueError(f"--group-size {g} with K={size_k}: {exc}") from None
        out["group_size"] = g
    return out


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferrum", description=__doc__)
    parser.add_argument("command", choices=["info", "check", "bench"])
    parser.add_argument("--backend", action="append", choices=["cpu", "cuda", "metal"],
                        help="backend(s) to check, or the one to bench (default: all / cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller problems")
    parser.add_argument("--seed", type=_seed, default=None,
                        help="random seed, a non-negative integer (default: fresh)")
    parser.add_argument("-v", "--verbose", action="store_true")
    bench = parser.add_argument_group("bench problems (default: the backend's own set)")
    bench.add_argument("--shapes", metavar="KxN[,KxN...]",
                       help="weight shapes to time, e.g. 4096x6144,8192x8192")
    bench.add_argument("--m", metavar="M[,M...]", help="rows of A to time, e.g. 1,16,64")
    bench.add_argument("--group-size", type=int, metavar="G",
                       help="scale group rows: 32, 64, 128, -1 for channelwise, or K (with --shapes "
                            "whose K all equal it: one group) (default 128)")
    args = parser.parse_args(argv)
    if args.command != "bench" and (args.shapes, args.m, args.group_size) != (None, None, None):
        parser.error("--shapes, --m and --group-size apply to bench")
    return {"info": _info, "check": _check, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
