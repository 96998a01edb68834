"""Summarize ncu's per-SASS-instruction source page: instruction mix, stall reasons, hot lines.

    ncu --set full --import-source yes --kernel-name regex:marlin_mm --launch-skip 3 \
        --launch-count 1 -o rep python3 tools/ncu_target.py K,N,M
    ncu -i rep.ncu-rep --page source --csv --print-source sass > rep_sass.csv
    python3 tools/sass_profile.py rep_sass.csv [--top 30] [--per WORDS]

--per WORDS divides the instruction counts by WORDS / 32 (warp-instruction slots of 32 packed
words: K * N / 8 / 32 for one call), so kernels with different shapes compare per weight.
tools/device_run.sh's `ncusrc` step runs all three.
"""
import argparse
import collections
import csv
import re


def load(path):
    rows = list(csv.reader(open(path)))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header = rows[start]
    return header, [r for r in rows[start + 1:] if len(r) == len(header)]


def number(row, col):
    try:
        return float(row[col].replace(",", ""))
    except (ValueError, IndexError):
        return 0.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--per", type=float, default=0.0)
    args = parser.parse_args()
    header, data = load(args.csv)
    col = {h: i for i, h in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    executed, samples = col["Instructions Executed"], col["# Samples"]

    mix, mix_samples, stall_total = collections.Counter(), collections.Counter(), collections.Counter()
    for r in data:
        op = re.sub(r"^@!?U?P\w+\s+", "", r[col["Source"]].strip()).split(" ")[0].split(".")[0]
        mix[op] += number(r, executed)
        mix_samples[op] += number(r, samples)
        for s in stalls:
            stall_total[s] += number(r, col[s])
    total = sum(mix.values())
    total_samples = sum(number(r, samples) for r in data)
    slots = args.per / 32 if args.per else 0
    print(f"{len(data)} SASS instructions, {total:.0f} warp instructions executed"
          + (f", {total / slots:.1f} per 32 words" if slots else "") + f", {total_samples:.0f} samples")
    for op, n in mix.most_common(20):
        per = f" {n / slots:6.2f}/32w" if slots else ""
        print(f"  {op:10s} {n:11.0f} {100 * n / total:5.1f}%{per}  samples {mix_samples[op]:.0f}")
    print("stall reasons (share of samples):")
    for s, n in stall_total.most_common(10):
        print(f"  {s[6:]:20s} {100 * n / max(total_samples, 1):5.1f}%")
    print(f"hottest {args.top} instructions (index, samples, executions, source, top stalls):")
    hot = sorted(range(len(data)), key=lambda i: -number(data[i], samples))[:args.top]
    for i in sorted(hot):
        r = data[i]
        top = sorted(((number(r, col[s]), s[6:]) for s in stalls), reverse=True)[:3]
        print(f"  {i:5d} {number(r, samples):6.0f} {number(r, executed):9.0f}  "
              f"{r[col['Source']].strip()[:56]:56s} " + " ".join(f"{n}:{v:.0f}" for v, n in top if v))


if __name__ == "__main__":
    main()
