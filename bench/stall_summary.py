#!/usr/bin/env python3
"""Prints what bench/strided_stalls.sh collected, per kernel:

    python3 bench/stall_summary.py details.txt [source.csv]

- from ncu's details page, the stall reasons (warps stalled per issued
  instruction, smsp__average_warps_issue_stalled_<reason>_per_issue_active),
  largest first, with the occupancy and duration lines;
- from its source page (CSV, SASS), the 25 instructions with the most warp
  samples, where the page has a column of them.

Both pages come from ncu --import; their layout is read from their own
headers, and lines that do not fit are skipped rather than guessed at."""
import csv
import re
import sys

KERNEL = re.compile(r"^\s{0,4}(\S+) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)")
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio\s+\S+\s+([\d.,]+)")
KEEP = ("Duration", "Achieved Occupancy", "Registers Per Thread",
        "Warp Cycles Per Issued Instruction", "No Eligible", "Issued Warp Per Scheduler")


def details(path):
    kernel, stalls = None, {}

    def flush():
        if kernel and stalls:
            total = sum(stalls.values())
            print(f"  stall reasons (warps per issued instruction, total {total:.2f}):")
            for reason, value in sorted(stalls.items(), key=lambda kv: -kv[1])[:10]:
                print(f"    {reason:28s} {value:7.2f}")

    with open(path) as f:
        for line in f:
            m = KERNEL.match(line)
            if m:
                flush()
                kernel, stalls = m.group(1), {}
                print(f"\n== {line.strip()}")
                continue
            m = STALL.search(line)
            if m:
                stalls[m.group(1)] = float(m.group(2).replace(",", ""))
            elif any(k in line for k in KEEP):
                print("  " + " ".join(line.split()))
    flush()


def source(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, block, label = None, [], ""

    def flush():
        if header and block:
            samples = next((i for i, h in enumerate(header)
                            if "Sampling (All" in h or h == "Warp Stall Sampling"), None)
            text = next((i for i, h in enumerate(header) if h in ("Source", "SASS")), None)
            if samples is None or text is None:
                print(f"\n(source page: no sample column in {header[:8]})")
                return
            def value(row):
                try:
                    return float(row[samples].replace(",", ""))
                except (ValueError, IndexError):
                    return 0.0
            total = sum(value(r) for r in block) or 1.0
            print(f"\n== {label or 'kernel'}: top instructions by warp samples ({total:.0f} in all)")
            for row in sorted(block, key=value, reverse=True)[:25]:
                print(f"  {100 * value(row) / total:5.1f}%  {row[text][:100]}")

    for row in rows:
        if any("Sampling" in c for c in row) and any(c in ("Source", "SASS") for c in row):
            flush()
            header, block = row, []
        elif header and len(row) == len(header):
            block.append(row)
        elif row:
            flush()
            header, block, label = None, [], " ".join(row)[:120]
    flush()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    details(sys.argv[1])
    if len(sys.argv) > 2:
        try:
            source(sys.argv[2])
        except OSError as e:
            print(f"(no source page: {e})")
