"""Time mm variants (tile, m_blocks, splits) on chosen shapes: graph-replayed bursts over
weight copies that together exceed 4x L2. usage: python tune.py "K,N,M" ... [--tiles=..] [--mbs=..] [--splits=..]
[--group=G] [--raw]   (--group: rows per scale group, 32, 64 or 128 (the default), or -1 for channelwise scales)
Splits "sK": stream-K with one wave of blocks (tried for every mma.sync tile at M <= 16, and for
the wgmma tiles 5, 6, 8 and 9 at the block heights swept)."""
import itertools
import math
import sys

import torch

import ferrum
import ferrum.cuda
from ferrum import _cuda_bench as B

backend = ferrum.cuda.BACKEND


def time_variant(weights, a, out, **opt):
    copies = len(weights)
    return B._time_graph(torch, lambda i: backend.mm(a, weights[i % copies], 0, out,
                         stream=torch.cuda.current_stream().cuda_stream, **opt),
                         max(copies, 8), 5)


GROUP = next((int(a.partition("=")[2]) for a in sys.argv[1:] if a.startswith("--group=")), 128)
if GROUP not in (32, 64, 128, -1):
    sys.exit(f"--group={GROUP}: use 32, 64, 128 or -1 (channelwise)")

for spec in [s for s in sys.argv[1:] if not s.startswith("--")]:
    k, n, m = (int(v) for v in spec.split(","))
    wbytes = k * n // 2
    copies = max(2, math.ceil(B.L2_FACTOR_BYTES / wbytes))
    weights = B._weights(torch, ferrum, k, n, copies, group=GROUP)
    a = torch.randn(m, k, device="cuda", dtype=torch.float16)
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    auto = ferrum._cuda.mm_plan(m, k, n, group_size=GROUP)
    t = time_variant(weights, a, out)
    print(f"K{k} N{n} M{m}: auto {auto['tile']}/{auto['m_blocks']}/"
          f"{'K' if auto.get('stream_k') else auto['splits']} -> {t:.1f} us "
          f"(floor {wbytes / 3.0e12 * 1e6:.1f} us at 3.0 TB/s)", flush=True)
    wgmma_tiles = (4, 5, 6, 8, 9)   # the wgmma kernel, where the GPU and build have it
    mbs = [min(4, (m + 15) // 16)] if m <= 64 else [2, 3, 4]
    splits_list = (1, 2, 4, 8) if m > 64 else (1, 2, 4, 6, 8, 12)
    tiles = (1, 2, 3, 4, 5, 6, 7, 8, 9)
    for opt in sys.argv[1:]:       # --mbs=1,2,4 --splits=1,2 --tiles=2 override the sweep
        name, _, values = opt.partition("=")
        if name in ("--mbs", "--splits", "--tiles"):
            parsed = [int(v) for v in values.split(",")]
            mbs, splits_list, tiles = {"--mbs": (parsed, splits_list, tiles),
                                       "--splits": (mbs, parsed, tiles),
                                       "--tiles": (mbs, splits_list, parsed)}[name]
    # wgmma blocks: 64 or 128 rows (m_blocks 4, 8; tile 4 only these, tiles 6 and 8 not 128),
    # and 16 or 32 rows (m_blocks 1, 2) where --mbs asks; the mma.sync tiles 16..64 rows (1..4)
    wgmma_mbs = {4: {4, 8}, 5: {1, 2, 4, 8}, 6: {1, 2, 4}, 8: {1, 2, 4}, 9: {1, 2}}
    results = []
    for tile, mb, splits in itertools.product(tiles, sorted(set(mbs) | {4, 8}), splits_list):
        if not ((tile in wgmma_tiles and mb in wgmma_mbs[tile] and (mb in mbs or (mb >= 4 and m > 32)))
                or (tile not in wgmma_tiles and mb in mbs)):
            continue
        try:
            tt = time_variant(weights, a, out, tile=tile, m_blocks=mb, splits=splits)
        except ValueError:   # wgmma tiles where the GPU or build has no wgmma kernel
            continue
        results.append((tt, tile, mb, splits))
    for tile in tiles:   # stream-K, one wave of blocks (mma.sync tiles, one 16-row slice)
        if tile in (1, 2, 3, 7) and 1 in mbs and m <= 16 and k % (256 if tile == 7 else 128) == 0:
            results.append((time_variant(weights, a, out, tile=tile, m_blocks=1, stream_k=1), tile, 1, "K"))
    # stream-K on the wgmma tiles 5, 6, 8, 9 (one wave of blocks), at the block heights swept above
    for tile, mb in itertools.product([t for t in tiles if t in (5, 6, 8, 9)], sorted(set(mbs) | {4, 8})):
        if mb in wgmma_mbs[tile] and (mb in mbs or (mb >= 4 and m > 32)):
            try:
                results.append((time_variant(weights, a, out, tile=tile, m_blocks=mb, stream_k=1), tile, mb, "K"))
            except ValueError:
                pass
    results.sort(key=lambda r: r[0])
    if "--raw" in sys.argv:   # every variant, one line each: K N M tile m_blocks splits us
        for tt, ti, mb, sp in results:
            print(f"RAW {k} {n} {m} {ti} {mb} {sp} {tt:.2f}")
    print("   best: " + ", ".join(f"t{ti}/mb{mb}/s{s}={tt:.1f}" for tt, ti, mb, s in results[:6]), flush=True)
    del weights
    torch.cuda.empty_cache()
