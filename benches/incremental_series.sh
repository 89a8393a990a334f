#!/usr/bin/env bash
# Batches one at a time: the runs over batches FIRST..100 on a lake of the batches before.
#
#   benches/incremental_series.sh BINARY [FIRST]
#
# Uses the SF 10, 100-batch landing of `benches/incremental.py --scale 10` (run it once to
# generate it). Lands batches 1..FIRST-1 (default FIRST = 91) and runs BINARY over them, then
# lands and runs each later batch in turn, as a scheduler would, printing each run's wall,
# CPU and peak RSS, its tables' times (layer.table=ms) and the files of silver orders, so that
# a run that compacts shows up among the ones that do not. Ends with the total of the batch
# runs, and whether gold equals incremental.py's recompute of all 100 batches.
set -eu
bin=$1; first=${2:-91}
work=$HOME/.cache/medallion/bench/incremental-series
. "$(dirname "$0")/incremental_lib.sh"
run() { # LABEL
    /usr/bin/time -f "$1: wall %e s, cpu %U+%S s, peak %M KB" -o "$work/time" "$bin" run commerce \
        --var landing="$work/landing" --var lake="$work/lake" --summary "$work/summary.json" >"$work/run.log" 2>&1
    cat "$work/time"
    summarise "$work/summary.json"
    echo "  silver orders: $(find "$work/lake/silver/orders" -name '*.parquet' | wc -l) parquet files on disk (removed ones stay until a vacuum)"
}
land 1 $((first - 1))
run "batches 1-$((first - 1))"
total=0
for b in $(seq "$first" 100); do
    land "$b" "$b"
    run "batch $b"
    total=$(python3 -c "import sys; print(round($total + float(open(sys.argv[1]).read().split('wall ')[1].split(' s')[0]), 2))" "$work/time")
done
echo "batches $first-100: $total s in all"
# Gold against incremental.py's recompute of all 100 batches in one run, when it is there.
lake_all=$HOME/.cache/medallion/bench/incremental-sf10/lake-all
python=$HOME/.cache/medallion/bench-venv/bin/python
if [ "$(ls "$batches"/orders | wc -l)" = 100 ] && [ -d "$lake_all/gold" ] && [ -x "$python" ]; then
    "$python" - "$bin" "$work/lake" "$lake_all" "$(dirname "$0")" <<'P'
import sys
sys.path.insert(0, sys.argv[4])
import run as suite
binary, lake, lake_all = sys.argv[1:4]
problems = suite.compare(suite.gold_rows("medallion", lake, binary), suite.gold_rows("medallion", lake_all, binary))
print("gold equals the one-run recompute of batches 1-100:", not problems, *problems[:5])
P
fi
