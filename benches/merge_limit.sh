#!/usr/bin/env bash
# A MERGE of a large second batch under a memory limit.
#
#   benches/merge_limit.sh BINARY SCALE LIMIT...
#
# Generates commerce at SCALE in two batches (cached under ~/.cache/medallion/bench), loads the
# first batch without a limit (cached), then for each LIMIT lands the second batch on a copy of
# that lake and runs the pipeline under --memory-limit LIMIT, printing the exit code, wall time
# and peak RSS, and whether silver (orders, customers, events) and gold equal those of the same
# run without a limit. Silver's _ingest_ts differs from run to run, so it is left out. The
# summary of the last run is in $work/run/summary.json.
set -u
bin=$1; scale=$2; shift 2
work=$HOME/.cache/medallion/bench/merge-sf$scale
run_batch_two() { # LIMIT -> $work/run
    rm -rf "$work/run"; cp -a "$work/base" "$work/run"
    for e in "$work"/gen/*/; do cp -r "$e/batch-0002" "$work/run/landing/$(basename "$e")/"; done
    /usr/bin/time -f "%e %M" -o "$work/time" "$bin" run commerce --var landing="$work/run/landing" \
        --var lake="$work/run/lake" --state "$work/run/state" --summary "$work/run/summary.json" ${1:+--memory-limit "$1"} \
        >/dev/null 2>"$work/run/stderr"
}
digest() {
    local d=""
    for q in "SELECT * EXCLUDE (_ingest_ts) FROM silver.orders" \
             "SELECT * EXCLUDE (_ingest_ts) FROM silver.customers" "SELECT * FROM silver.events" \
             "SELECT * FROM gold.daily_sales" "SELECT * FROM gold.customer_360" \
             "SELECT * FROM gold.daily_engagement"; do
        d+=$("$bin" query commerce --var lake="$work/run/lake" "$q" --format csv | sort | md5sum | cut -c1-12)
    done
    echo "$d"
}
if [ ! -d "$work/gen" ]; then
    "$bin" generate --scale "$scale" --batches 2 --out "$work/gen.tmp" >/dev/null && mv "$work/gen.tmp" "$work/gen" || exit 1
fi
if [ ! -d "$work/base" ]; then
    # Built where every run reads it ($work/run): bronze knows its files by path.
    rm -rf "$work/run"; mkdir -p "$work/run/landing"
    for e in "$work"/gen/*/; do mkdir -p "$work/run/landing/$(basename "$e")"; cp -r "$e/batch-0001" "$work/run/landing/$(basename "$e")/"; done
    "$bin" run commerce --var landing="$work/run/landing" --var lake="$work/run/lake" \
        --state "$work/run/state" >/dev/null 2>&1 || exit 1
    mv "$work/run" "$work/base"
fi
run_batch_two ""; read -r wall kb < "$work/time"
expected=$(digest)
printf "%-10s exit %s  %7.2f s  peak %6.2f GiB\n" "none" 0 "$wall" "$(echo "$kb/1048576" | bc -l)"
for limit in "$@"; do
    run_batch_two "$limit"; rc=$?; read -r wall kb < <(tail -1 "$work/time")
    line=$(printf "%-10s exit %s  %7.2f s  peak %6.2f GiB" "$limit" "$rc" "$wall" "$(echo "$kb/1048576" | bc -l)")
    if [ "$rc" = 0 ]; then
        [ "$(digest)" = "$expected" ] && line+="  silver and gold equal" || line+="  silver or gold DIFFER"
    else
        line+="  $(grep -m1 '^error:' "$work/run/stderr" | cut -c1-160)"
    fi
    echo "$line"
done
