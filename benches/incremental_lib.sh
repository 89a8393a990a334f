# Shared by incremental_ab.sh and incremental_series.sh (sourced, with $work set): the SF 10,
# 100-batch landing of `benches/incremental.py --scale 10`, a fresh landing folder under
# $work, and what both print of a run.
batches=$HOME/.cache/medallion/bench/incremental-sf10/batches
[ -d "$batches" ] || { echo "no landing at $batches: run benches/incremental.py --scale 10 first" >&2; exit 2; }
rm -rf "$work"; mkdir -p "$work/landing"

land() { # FIRST LAST: links batches FIRST..LAST (1-based, inclusive) of every entity
    for e in "$batches"/*/; do
        mkdir -p "$work/landing/$(basename "$e")"
        ls "$e" | sort | sed -n "$1,$2p" | while read -r batch; do
            ln -s "$e$batch" "$work/landing/$(basename "$e")/$batch"
        done
    done
}

summarise() { # SUMMARY_JSON: each table's time, layer.table=ms
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('  ' + ' '.join(f\"{t['layer'][0]}.{t['table']}={t['duration_ms']}\" for t in d['tables'] if not t['table'].endswith('_quarantine')))" "$1"
}
