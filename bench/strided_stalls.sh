#!/bin/bash
# Where the time of strided's blocks goes at L = 32768: ncu's warp-state
# samples (why each warp could not issue) for the residue and band
# kernels of one round, summed per kernel and per SASS instruction.
#
#   NCU=ncu ATTN_BUILD_DIR=$PWD/build PYTHONPATH=$PWD/python:$PWD/bench \
#       bash bench/strided_stalls.sh [PACKAGES]     (default: gpu-pkgs)
#
# Writes $OUT/strided_stalls/ (or /tmp/...): the ncu report, its details
# page (details.txt: stall reasons per kernel, occupancy, launch) and its
# source page (source.csv), and prints the reasons and the 25 instructions
# with the most samples for each kernel (bench/stall_summary.py).
#
# The kernels run one at a time under ncu, with the caches left as the
# previous kernel left them (--cache-control none), so the band kernel
# finds the round's q, k, v in L2 as it does in a normal call.
set -eu
PKGS=${1:-gpu-pkgs}
NCU=${NCU:-ncu}
DIR=${OUT:-/tmp}/strided_stalls
mkdir -p "$DIR"
export L=32768 PAT=strided
# Skip the first call's kernels (32: 16 rounds of two) and profile a round.
"$NCU" --clock-control none --cache-control none \
    --section WarpStateStats --section SchedulerStats --section Occupancy \
    --section LaunchStats --section SourceCounters \
    --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
    -k regex:component --launch-skip 32 --launch-count 2 \
    -f -o "$DIR/report" python3 bench/gpu_profile.py "$PKGS" > "$DIR/ncu.log" 2>&1 \
    || { tail -20 "$DIR/ncu.log"; exit 1; }
"$NCU" --import "$DIR/report.ncu-rep" --print-details all > "$DIR/details.txt"
"$NCU" --import "$DIR/report.ncu-rep" --page source --csv --print-source sass \
    > "$DIR/source.csv" 2> "$DIR/source.err" || echo "(no source page: $(head -c 300 "$DIR/source.err"))"
python3 "$(dirname "$0")/stall_summary.py" "$DIR/details.txt" "$DIR/source.csv"
