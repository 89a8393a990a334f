#!/usr/bin/env bash
# The run over one new batch, two builds side by side on copies of one lake.
#
#   benches/incremental_ab.sh BINARY_A BINARY_B [ROUNDS]
#
# Uses the SF 10, 100-batch landing of `benches/incremental.py --scale 10` (run it once to
# generate it). Lands batches 1-99 and runs BINARY_A over them (the lake both builds start
# from), lands batch 100, then for each round copies that lake and runs each binary over
# batch 100 on its own copy, alternating which goes first. Prints wall, CPU and peak RSS of
# each run and its tables' times (layer.table=ms). Needs twice the lake's 3.5 GB free.
set -eu
a=$1; b=$2; rounds=${3:-2}
work=$HOME/.cache/medallion/bench/incremental-ab
. "$(dirname "$0")/incremental_lib.sh"
land 1 99
/usr/bin/time -f "batches 1-99 (A): wall %e s" "$a" run commerce --var landing="$work/landing" --var lake="$work/base" >"$work/base.log" 2>&1
tail -1 "$work/base.log"
land 100 100
for round in $(seq "$rounds"); do
    if [ $((round % 2)) = 1 ]; then order="A B"; else order="B A"; fi
    for which in $order; do
        if [ "$which" = A ]; then bin=$a; else bin=$b; fi
        rm -rf "$work/lake"; cp -a "$work/base" "$work/lake"; sync
        /usr/bin/time -f "$which round $round, batch 100: wall %e s, cpu %U+%S s, peak %M KB" "$bin" run commerce \
            --var landing="$work/landing" --var lake="$work/lake" --summary "$work/$which-$round.json" >"$work/$which-$round.log" 2>&1
        tail -1 "$work/$which-$round.log"
        summarise "$work/$which-$round.json"
    done
done
rm -rf "$work/lake"
