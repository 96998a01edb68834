"""Replay the wgmma planner's choice of tile, block height and split (choose_splits with
wgmma_split_model's constants and the candidate tiles of plan_one, csrc/mm.cu) over
tools/tune.py --raw logs, and score its picks against the best variant the logs timed.
No GPU needed.

usage: python tools/replay_splits.py LOG ... [--no-cluster LOG ...] [--cells] [--fit] [name=value ...]
  (logs of one scale-group size; group=64, group=-1 (channelwise) or group=32 for logs swept with
  tools/tune.py --group=..., the default 128 otherwise)
  --no-cluster  the logs after it were swept with FERRUM_NO_CLUSTER=1 (32 rows and more: the
                splits through the workspace); those before, as tune.py asks: splits as clusters
                where they fit in no more waves than the plain grid. In a log, a line "# Round ..."
                naming FERRUM_NO_CLUSTER=1 starts such a part (csrc/tune_h200.txt, session 27)
  --cells       one line per cell: the replayed pick, its time, the best variant's
  --fit         coordinate descent over the constants in FIT_GRIDS, from the current ones
  name=value    replay with a constant changed, e.g. exchange16=0 fixed8_1=2

H200 facts the planner measures at run time, taken as constants here (session 27): the split-K
instances' blocks an SM at G = 128 (OCC), the stream-K instances' (SK_OCC), and how many
clusters of each size fit at one and two blocks an SM (CLUSTERS, cudaOccupancyMaxActiveClusters).
Tile 9's 32-row blocks (9, 2) take the two blocks an SM their kernel is built for.
A cell (K, N, M) takes its fastest time over every log that timed a variant. A pick the logs did
not time (e.g. 17 splits) is scored by the nearest timed split count of that tile and height,
and a clustered pick by the clustered runs only (and the reverse). The planner's own pick in a
log (its "auto:" line) must match the replay under the constants of that log's build."""
import collections
import math
import re
import sys

SMS = 132
TILE_K = {5: 128, 6: 128, 8: 128, 9: 256}
TILE_N = {5: 256, 6: 256, 8: 128, 9: 64}
OCC = {(5, 1): 1, (6, 1): 2, (8, 1): 2, (9, 1): 2, (5, 2): 1, (6, 2): 2, (8, 2): 1, (9, 2): 2,
       (5, 4): 1, (5, 8): 1, (6, 4): 2, (8, 4): 1}
SK_OCC = {(5, 1): 1, (6, 1): 2, (8, 1): 1, (9, 1): 2, (5, 2): 1, (6, 2): 2, (8, 2): 1, (9, 2): 2,
          (5, 4): 1, (5, 8): 1, (6, 4): 2, (8, 4): 1}
CLUSTERS = {1: {2: 66, 3: 39, 4: 30, 5: 22, 6: 17, 7: 15, 8: 15},
            2: {2: 132, 3: 79, 4: 62, 5: 47, 6: 39, 7: 32, 8: 30}}
MAX_CLUSTER = 8
MAX_PARTIAL_BYTES = 256 << 20
# csrc/mm.cu at session 30: per (tile, m_blocks) a k-tile's cost (per 128 rows of K) and a
# block's fixed cost; the tail per split; the 16-row tail's share at one live row; the 16-row
# exchange cost; the partial traffic's share for unclustered 32/64-row and for cluster splits;
# a lone block's share; a cluster member's cost a wave (kClusterSplitCost); tile 9's 32-row blocks'
# least k-tiles a split block costs and how much cheaper a k-tile is on an emptier GPU (session 29);
# tile9_32=0 leaves those blocks out of the candidates at 17-32 rows, as the planner did to session 28;
# up to tile9_slices rows they are candidates in row slices too, whose k-tiles after the first slice's
# cost slice9_2 of it (tile9_slices=0: not beyond 32 rows, as before session 29's second fit; 64 to
# session 29, 128 since session 30); with 32-row groups the 16- and 32-row blocks' k-tiles cost
# 1 + fp16_scales_2 as much (fp16 scales per word instead of F32S, kFp16ScalesKtile, session 30).
# Tried in session 30 and not in the planner (0: off): no_scales_4, how much cheaper channelwise
# scales make a k-tile of 64- and 128-row blocks; cluster9_2, an extra cost per member of a cluster
# of tile 9's 32-row blocks; fill_sms=1, fill9_2 by the share of SMs rather than block slots idle.
# Tried in session 31 and not in the planner (csrc/tune_h200_large.txt, M = 512-2048): full_splits,
# the splits blocks of full_mb or more rows may take on a grid that already fills the GPU (1: none);
# partial8, the share of the partial traffic unclustered 128-row splits pay; sk_partial8, how much
# more stream-K's partials of 128-row blocks cost on a full grid.
CURRENT = {"kt5_1": 0.8, "fixed5_1": 2.0, "kt6_1": 0.9, "fixed6_1": 1.0, "kt8_1": 0.6, "fixed8_1": 2.5,
           "kt9_1": 0.36, "fixed9_1": 2.75, "kt9_2": 0.375, "fixed9_2": 0.25, "tile9_32": 1,
           "kt5_2": 0.8, "fixed5_2": 2.0, "kt6_2": 1.1, "fixed6_2": 4.0, "kt8_2": 0.35, "fixed8_2": 1.0,
           "kt5_4": 0.65, "fixed5_4": 1.0, "kt5_8": 0.9, "fixed5_8": 1.0, "kt6_4": 1.0, "fixed6_4": 6.0,
           "kt8_4": 0.33, "fixed8_4": 1.0,
           "tail": 0.5, "tail_one_row": 0.75, "exchange16": 1.25, "unclustered_share": 0.25,
           "cluster_share": 0.25, "lone": 0.9, "cluster_split": 0.25,
           "min_kt9_2": 4, "fill9_2": 0.4, "tile9_slices": 128, "slice9_2": 0.6,
           "group": 128, "fp16_scales_2": 0.2, "no_scales_4": 0.0, "cluster9_2": 0.0, "fill_sms": 0,
           "full_splits": 1, "full_mb": 8, "partial8": 1.0, "sk_partial8": 1.0}
FIT_GRIDS = {"exchange16": [x / 4 for x in range(0, 17)], "fixed6_1": [x / 4 for x in range(0, 17)],
             "fixed8_1": [x / 4 for x in range(0, 17)], "fixed9_1": [x / 4 for x in range(0, 21)],
             "tail": [x / 20 for x in range(2, 21)], "tail_one_row": [x / 20 for x in range(6, 21)],
             "unclustered_share": [x / 20 for x in range(0, 21)], "cluster_share": [x / 20 for x in range(0, 21)],
             "cluster_split": [x / 20 for x in range(0, 13)],
             "kt9_2": [x / 40 for x in range(6, 25)], "fixed9_2": [x / 4 for x in range(0, 17)],
             "min_kt9_2": [0, 1, 2, 3, 4, 5, 6, 8], "fill9_2": [x / 10 for x in range(0, 10)],
             "slice9_2": [x / 10 for x in range(2, 11)], "fp16_scales_2": [x / 20 for x in range(0, 9)],
             "no_scales_4": [x / 20 for x in range(0, 6)], "cluster9_2": [x / 8 for x in range(0, 13)],
             "fill_sms": [0, 1], "full_splits": [1, 2, 3, 4], "full_mb": [4, 8],
             "partial8": [x / 20 for x in range(0, 21)], "sk_partial8": [x / 4 for x in range(4, 17)]}


def candidates(m, k, tile9_32=True, tile9_slices=0):
    if m <= 16:
        return [(5, 1), (6, 1), (8, 1)] + ([(9, 1)] if k % 256 == 0 else [])
    if m <= 32:
        return [(5, 2), (6, 2), (8, 2)] + ([(9, 2)] if tile9_32 and k % 256 == 0 else [])
    return [(5, 4), (5, 8), (6, 4), (8, 4)] + ([(9, 2)] if tile9_slices and m <= tile9_slices and k % 256 == 0 else [])


def plan_cost(c, k, n, m, tile, mb):
    """(cost, (splits label, clustered)) of the cheapest plan of one (tile, m_blocks)."""
    tk, tn = TILE_K[tile], TILE_N[tile]
    kt_cost, fixed = c[f"kt{tile}_{mb}"] * tk / 128, c[f"fixed{tile}_{mb}"]
    if mb <= 2 and c["group"] == 32:   # fp16 scales per word where 64/128-row groups take F32S
        kt_cost *= 1 + c["fp16_scales_2"]
    if mb >= 4 and c["group"] <= 0:    # channelwise: none of the fp16 scales of the fit's G = 128
        kt_cost /= 1 + c["no_scales_4"]
    slices = (m + 16 * mb - 1) // (16 * mb)
    if (tile, mb) == (9, 2) and slices > 1:   # the slices after the first find the weights in L2
        kt_cost *= (1 + c["slice9_2"] * (slices - 1)) / slices
    tiles = slices * ((n + tn - 1) // tn)
    k_tiles = k // tk
    live = min(m, 16 * mb)
    tile_bytes = 16 * mb * tn * 4
    tail = c["tail"] * (c["tail_one_row"] + (1 - c["tail_one_row"]) * (live - 1) / 15) if mb == 1 else c["tail"]
    exchange = c["exchange16"] if mb == 1 else 0.0
    occ = OCC[(tile, mb)]
    lone = 1 - (1 - c["lone"]) * live / (16 * mb) if occ > 1 else 1.0
    partial = 2.0 * live * tn * 4 / (tk * tn / 2 + live * tk * 2)
    slots = SMS * occ
    best = (math.inf, ("1", False))
    min_kt, fill_w = (c["min_kt9_2"], c["fill9_2"]) if (tile, mb) == (9, 2) else (0, 0.0)

    def per_block(s):   # a split block's k-tiles: at least min_kt, cheaper on an emptier GPU
        basis = SMS if c["fill_sms"] else slots
        return max(-(-k_tiles // s), min(k_tiles, min_kt)) * (1 - fill_w * (1 - min(1.0, tiles * s / basis)))

    full = int(c["full_splits"]) if mb >= c["full_mb"] else 1   # splits on a grid that fills the GPU
    for s in range(1, (full if tiles >= slots else min(k_tiles, 32)) + 1):
        if s > 1 and tiles * s * tile_bytes > MAX_PARTIAL_BYTES:
            break
        waves = -(-tiles * s // slots)
        share = lone if tiles * s <= SMS else 1.0
        through = (c["unclustered_share"] * partial if mb in (2, 4)
                   else c["partial8"] * partial if mb == 8 else partial)
        cost = waves * (per_block(s) * kt_cost + fixed + (through if s > 1 else 0)) * share
        cost += tail * s + exchange if s > 1 else 0
        if cost < best[0]:
            best = (cost, (str(s), False))
        if mb > 1 and 1 < s <= MAX_CLUSTER:
            cslots = CLUSTERS[occ][s] * s
            member = c["cluster_split"] + (c["cluster9_2"] if (tile, mb) == (9, 2) else 0.0)
            cost = -(-tiles * s // cslots) * (per_block(s) * kt_cost + fixed + c["cluster_share"] * partial +
                                              member * s)
            if cost < best[0]:
                best = (cost, (str(s), True))
    sk_slots = SMS * SK_OCC[(tile, mb)]
    iters = -(-tiles * k_tiles // sk_slots)
    blocks = -(-tiles * k_tiles // iters)
    shared_by = min(blocks, k_tiles, (k_tiles - 1) // iters + 2)
    segments = -(-iters // k_tiles) + 1
    if shared_by > 1 and tiles * shared_by * tile_bytes <= MAX_PARTIAL_BYTES:
        share = lone if blocks <= SMS else 1.0
        sk_partial = partial * (c["sk_partial8"] if mb == 8 and tiles >= slots else 1.0)
        cost = (iters * kt_cost + segments * (fixed + sk_partial)) * share + tail * shared_by + exchange
        if cost < best[0]:
            best = (cost, ("K", False))
    return best


def pick(c, k, n, m):
    (_, (splits, clustered)), (tile, mb) = min((plan_cost(c, k, n, m, t, mb), (t, mb))
                                               for t, mb in candidates(m, k, c["tile9_32"] > 0, c["tile9_slices"]))
    return tile, mb, splits, clustered


def asked_runs_clustered(tile, mb, splits, k, n, m):
    """Whether tune.py's splits asked for ran as clusters (plan_one's rule for asked splits)."""
    s = min(int(splits), k // TILE_K[tile])
    if mb == 1 or not 1 < s <= MAX_CLUSTER:
        return False
    tiles = (m + 16 * mb - 1) // (16 * mb) * ((n + TILE_N[tile] - 1) // TILE_N[tile])
    cslots = CLUSTERS[OCC[(tile, mb)]][s] * s
    return -(-tiles * s // cslots) <= -(-tiles * s // (SMS * OCC[(tile, mb)]))


def load(argv, group=128):
    """times[cell][(tile, mb, splits, clustered)] = µs; auto[cell] = {(tile, mb, splits)}, of the
    log sections swept with scale groups of `group` rows (a "# Round ... G=n" line names them;
    128 where none does)"""
    times, auto = collections.defaultdict(dict), {}
    asked_no_cluster = False
    for arg in argv:
        if arg == "--no-cluster":
            asked_no_cluster = True
            continue
        in_file = no_cluster = asked_no_cluster
        section_group = 128
        for line in open(arg):
            if line.startswith("# Round"):   # csrc/tune_h200*.txt's sections
                no_cluster = in_file or "FERRUM_NO_CLUSTER=1" in line
                named = re.search(r"\bG=(-?\d+)", line)
                section_group = int(named[1]) if named else 128
            if section_group != group:
                continue
            f = line.split()
            if f and f[0] == "RAW":
                k, n, m, tile, mb = (int(v) for v in f[1:6])
                cell = (k, n, m)
                if (tile, mb) not in candidates(m, k, True, 1 << 30):
                    continue
                clustered = f[6] != "K" and not no_cluster and asked_runs_clustered(tile, mb, f[6], k, n, m)
                variant = (tile, mb, f[6], clustered)
                times[cell][variant] = min(float(f[7]), times[cell].get(variant, math.inf))
            hit = re.match(r"K(\d+) N(\d+) M(\d+): auto (\d+)/(\d+)/(\w+)", line)
            if hit and not no_cluster:
                cell = tuple(int(v) for v in hit.groups()[:3])
                auto.setdefault(cell, set()).add((int(hit[4]), int(hit[5]), hit[6]))
    return times, auto


def timed(variants, tile, mb, splits, clustered):
    if (tile, mb, splits, clustered) in variants:
        return variants[(tile, mb, splits, clustered)]
    near = [(abs(int(s) - int(splits)) if "K" not in (s, splits) else 99, us)
            for (t, b, s, cl), us in variants.items() if (t, b, cl) == (tile, mb, clustered)]
    return min(near)[1] if near else math.nan


def score(c, times, show=False):
    ratios = []
    for cell in sorted(times):
        tile, mb, splits, clustered = pick(c, *cell)
        us, best = timed(times[cell], tile, mb, splits, clustered), min(times[cell].values())
        if math.isnan(us):
            continue
        ratios.append(us / best)
        if show:
            fastest = min(times[cell], key=times[cell].get)
            print(f"{cell[0]:6d} {cell[1]:6d} {cell[2]:3d}  pick t{tile}/mb{mb}/s{splits}{'c' if clustered else ''} "
                  f"{us:7.2f}  best t{fastest[0]}/mb{fastest[1]}/s{fastest[2]}{'c' if fastest[3] else ''} "
                  f"{best:7.2f}  {us / best:.3f}")
    return math.exp(sum(map(math.log, ratios)) / len(ratios)), max(ratios), len(ratios)


def main(argv):
    c = dict(CURRENT)
    for a in argv:
        if "=" in a and not a.startswith("--"):
            name, value = a.split("=")
            if name not in c:
                sys.exit(f"unknown constant {name!r}; known: {', '.join(c)}")
            c[name] = float(value)
    times, auto = load([a for a in argv if "=" not in a and a not in ("--cells", "--fit")], int(c["group"]))
    if not times:
        sys.exit("no RAW lines (tools/tune.py --raw) of the planner's candidate tiles")
    off = [cell for cell, picks in auto.items() if cell in times and pick(c, *cell)[:3] not in picks]
    print(f"{len(times)} cells; the replay differs from the logged auto pick on {len(off)}")
    geo, worst, scored = score(c, times, "--cells" in argv)
    print(f"picks above the best timed ({scored} cells scored): mean {100 * (geo - 1):.1f}%, "
          f"worst {100 * (worst - 1):.1f}%")
    if "--fit" in argv:
        def objective(constants):   # the mean, then the worst
            g, w, _ = score(constants, times)
            return g + 0.05 * (w - 1)
        current = objective(c)
        for _ in range(6):
            moved = False
            for name, grid in FIT_GRIDS.items():
                for value in grid:
                    trial = dict(c, **{name: value})
                    o = objective(trial)
                    if o < current - 1e-9:
                        c, current, moved = trial, o, True
            if not moved:
                break
        geo, worst, _ = score(c, times)
        print("fitted:", {k: v for k, v in c.items() if v != CURRENT[k]} or "the current constants",
              f"mean {100 * (geo - 1):.1f}%, worst {100 * (worst - 1):.1f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
