"""Replay the wgmma planner's choice for 16-row blocks (M <= 16: choose_splits with
wgmma_split_model's constants, csrc/mm.cu) over tools/tune.py --raw logs, and score its picks
against the best variant each log timed. No GPU needed.

usage: python tools/replay_splits.py LOG ... [--cells] [--fit] [--set name=value ...]
  --cells   one line per cell: the replayed pick, its time, the best variant's
  --fit     coordinate descent over the constants in FIT_GRIDS, from the current ones
  --set     replay with a constant changed, e.g. --set exchange=0 --set fixed8=2

A cell (K, N, M) takes its fastest time over every log that timed a variant. A pick the logs did
not time (e.g. 17 splits) is scored by the nearest timed split count of that tile. The planner's
own pick in a log (its "auto:" line) must match the replay under the constants that log's build
had; with the current constants, logs of the current main's build should show no mismatch."""
import collections
import math
import re
import sys

SMS = 132                                   # the H200's and H100's
TILE_K = {5: 128, 6: 128, 8: 128, 9: 256}
TILE_N = {5: 256, 6: 256, 8: 128, 9: 64}
OCC = {5: 1, 6: 2, 8: 2, 9: 2}             # 16-row split-K blocks an SM
SK_OCC = {5: 1, 6: 2, 8: 1, 9: 2}          # their stream-K instances'
# csrc/mm.cu at session 27: k-tile cost (per 128 rows of K), fixed cost, per 16-row block
CURRENT = {"kt5": 0.8, "fixed5": 2.0, "kt6": 0.9, "fixed6": 1.0, "kt8": 0.6, "fixed8": 2.5,
           "kt9": 0.36, "fixed9": 2.75, "tail": 0.5, "tail_one_row": 0.75, "exchange": 1.25,
           "lone": 0.9}
FIT_GRIDS = {"exchange": [x / 4 for x in range(0, 17)], "fixed6": [x / 4 for x in range(0, 17)],
             "fixed8": [x / 4 for x in range(0, 17)], "fixed9": [x / 4 for x in range(0, 21)],
             "tail": [x / 20 for x in range(2, 21)], "tail_one_row": [x / 20 for x in range(6, 21)]}


def plan_cost(c, k, n, m, tile):
    """(cost, splits label) of the cheapest split-K or stream-K plan of one tile."""
    tk, tn = TILE_K[tile], TILE_N[tile]
    kt_cost, fixed = c[f"kt{tile}"] * tk / 128, c[f"fixed{tile}"]
    tiles = (n + tn - 1) // tn
    k_tiles = k // tk
    live = min(m, 16)
    tail = c["tail"] * (c["tail_one_row"] + (1 - c["tail_one_row"]) * (live - 1) / 15)
    lone = 1 - (1 - c["lone"]) * live / 16 if OCC[tile] > 1 else 1.0
    partial = 2.0 * live * tn * 4 / (tk * tn / 2 + live * tk * 2)
    slots = SMS * OCC[tile]
    best = (math.inf, "1")
    for s in range(1, (1 if tiles >= slots else min(k_tiles, 32)) + 1):
        waves = (tiles * s + slots - 1) // slots
        share = lone if tiles * s <= SMS else 1.0
        cost = waves * (-(-k_tiles // s) * kt_cost + fixed + (partial if s > 1 else 0)) * share
        cost += tail * s + c["exchange"] if s > 1 else 0
        if cost < best[0]:
            best = (cost, str(s))
    sk_slots = SMS * SK_OCC[tile]
    iters = -(-tiles * k_tiles // sk_slots)
    blocks = -(-tiles * k_tiles // iters)
    shared_by = min(blocks, k_tiles, (k_tiles - 1) // iters + 2)
    segments = -(-iters // k_tiles) + 1
    if shared_by > 1:
        share = lone if blocks <= SMS else 1.0
        cost = (iters * kt_cost + segments * (fixed + partial)) * share + tail * shared_by + c["exchange"]
        if cost < best[0]:
            best = (cost, "K")
    return best


def pick(c, k, n, m):
    tiles = [5, 6, 8] + ([9] if k % 256 == 0 else [])
    (_, splits), tile = min((plan_cost(c, k, n, m, t), t) for t in tiles)
    return tile, splits


def load(paths):
    times, auto = collections.defaultdict(dict), {}
    for path in paths:
        for line in open(path):
            f = line.split()
            if f and f[0] == "RAW" and f[5] == "1" and int(f[3]) <= 16:
                cell, variant = (int(f[1]), int(f[2]), int(f[3])), (int(f[4]), f[6])
                times[cell][variant] = min(float(f[7]), times[cell].get(variant, math.inf))
            hit = re.match(r"K(\d+) N(\d+) M(\d+): auto (\d+)/1/(\w+)", line)
            if hit:
                auto.setdefault(tuple(int(v) for v in hit.groups()[:3]), set()).add((int(hit[4]), hit[5]))
    return times, auto


def timed(variants, tile, splits):
    if (tile, splits) in variants:
        return variants[(tile, splits)]
    near = [(abs(int(s) - int(splits)) if "K" not in (s, splits) else 99, us)
            for (t, s), us in variants.items() if t == tile]
    return min(near)[1] if near else math.inf


def score(c, times, show=False):
    ratios = []
    for cell in sorted(times):
        tile, splits = pick(c, *cell)
        us, best = timed(times[cell], tile, splits), min(times[cell].values())
        ratios.append(us / best)
        if show:
            fastest = min(times[cell], key=times[cell].get)
            print(f"{cell[0]:6d} {cell[1]:6d} {cell[2]:3d}  pick t{tile}/s{splits} {us:7.2f}  "
                  f"best t{fastest[0]}/s{fastest[1]} {best:7.2f}  {us / best:.3f}")
    return math.exp(sum(map(math.log, ratios)) / len(ratios)), max(ratios)


def main(argv):
    c = dict(CURRENT)
    paths = [a for a in argv if not a.startswith("--") and "=" not in a]
    for a in argv:
        if "=" in a and not a.startswith("--"):
            name, value = a.split("=")
            if name not in c:
                sys.exit(f"--set: unknown constant {name!r}; known: {', '.join(c)}")
            c[name] = float(value)
    times, auto = load(paths)
    if not times:
        sys.exit("no RAW lines of 16-row blocks (tools/tune.py --raw --mbs=1) at M <= 16 in " + " ".join(paths))
    off = [cell for cell, picks in auto.items() if cell in times and pick(c, *cell) not in picks]
    print(f"{len(times)} cells; the replay differs from the logged auto pick on {len(off)}")
    geo, worst = score(c, times, "--cells" in argv)
    print(f"picks above the best timed: mean {100 * (geo - 1):.1f}%, worst {100 * (worst - 1):.1f}%")
    if "--fit" in argv:
        objective = lambda g, w: g + 0.05 * (w - 1)   # the mean, then the worst
        current = objective(geo, worst)
        for _ in range(6):
            moved = False
            for name, grid in FIT_GRIDS.items():
                for value in grid:
                    trial = dict(c, **{name: value})
                    o = objective(*score(trial, times))
                    if o < current - 1e-9:
                        c, current, moved = trial, o, True
            if not moved:
                break
        geo, worst = score(c, times)
        print("fitted:", {k: v for k, v in c.items() if v != CURRENT[k]} or "the current constants",
              f"mean {100 * (geo - 1):.1f}%, worst {100 * (worst - 1):.1f}%")


if __name__ == "__main__":
    main([a[len("--set="):] if a.startswith("--set=") else a for a in sys.argv[1:]])
