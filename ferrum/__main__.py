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
    name = args.backend[0] if args.backend else "cpu"
    info = ferrum.backends()[name]
    if not info.available:
        print(f"backend {name!r} is not available: {info.reason}")
        return 2
    module = importlib.import_module(_registry.BACKEND_MODULES[name])
    print(f"ferrum bench --backend {name}: {info.device}")
    module.bench({"quick": args.quick, "seed": args.seed})
    return 0


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
    args = parser.parse_args(argv)
    return {"info": _info, "check": _check, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
