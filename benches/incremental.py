"""Incremental cost: a run over one new 1% batch on a lake built from the other 99%.

Generates commerce at a scale factor in 100 batches (cached, seed 42), lands batches 1-99 and
runs the pipeline (the full run), lands batch 100 and runs again (the incremental run), then
builds a second lake from all 100 batches in one run (the full recompute) and checks that its
gold equals the incremental lake's. Prints wall, CPU and peak RSS of each run, the
incremental run's share of the full run, per-table times of the incremental run, and how much
of each gold table batch 100 changed. Writes benches/results/incremental-sf<N>.json.
`--entities events` lands only the events of batch 100 (and the full recompute likewise):
a Kafka micro-batch, which leaves every gold model that reads no events as it was.

    ~/.cache/medallion/bench-venv/bin/python benches/incremental.py --scale 10
    ~/.cache/medallion/bench-venv/bin/python benches/incremental.py --scale 10 --entities events
"""

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as suite  # noqa: E402  (the harness beside this file: measure, gold_rows, compare)

BATCHES = 100


def land(all_batches, landing, n, entities=None):
    """Symlinks the first n batch folders of every entity (or of `entities` only) into landing."""
    for entity in sorted(os.listdir(all_batches)):
        src = os.path.join(all_batches, entity)
        if not os.path.isdir(src) or (entities and entity not in entities):
            continue
        dst = os.path.join(landing, entity)
        os.makedirs(dst, exist_ok=True)
        for batch in sorted(os.listdir(src))[:n]:
            link = os.path.join(dst, batch)
            if not os.path.exists(link):
                os.symlink(os.path.join(src, batch), link)


def pipeline_command(args, landing, lake, summary):
    """`medallion run commerce` from landing into lake, writing its summary, with --medallion-arg."""
    return [args.medallion, "run", "commerce", "--var", f"landing={landing}", "--var", f"lake={lake}",
            "--summary", summary, *args.medallion_arg]


def run_pipeline(args, landing, lake, log, summary):
    result = suite.measure(pipeline_command(args, landing, lake, summary), log=log)
    with open(summary) as f:
        result["tables"] = [
            {k: t.get(k) for k in ("layer", "table", "duration_ms", "rows_read", "rows_written", "rows_updated", "skipped")}
            for t in json.load(f)["tables"]
            if not t["table"].endswith("_quarantine")
        ]
    return result


def changed_share(before, after):
    """Per gold table: rows that differ between two gold snapshots, and of the grouping key's values."""
    keys = {"daily_sales": 0, "daily_engagement": 0, "customer_360": 0}
    out = {}
    for t, i in keys.items():
        a, b = set(before[t][1]), set(after[t][1])
        diff = a ^ b
        affected = {k[i] for k, _ in diff}
        values = {k[i] for k, _ in a | b}
        out[t] = {"rows_changed": len(diff), "rows": len(b), "key": before[t][0][i], "key_values_affected": len(affected), "key_values": len(values)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--medallion", default=suite.medallion_binary())
    ap.add_argument("--medallion-arg", action="append", default=[])
    ap.add_argument("--work", default=os.path.join(suite.CACHE, "bench"))
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--entities", default="", help=f"land only these entities of batch {BATCHES} (comma-separated; default all), "
                    "e.g. events: a Kafka micro-batch that changes no order, customer, product or rate")
    args = ap.parse_args()
    entities = [e for e in args.entities.split(",") if e]

    tag = f"incremental-sf{args.scale:g}" + "".join(f"-{e}" for e in entities)
    work = os.path.join(args.work, f"incremental-sf{args.scale:g}")
    all_batches = os.path.join(work, "batches")
    suite.generate_cached(args.medallion, args.scale, BATCHES, all_batches)
    for d in ("landing", "lake", "landing-all", "lake-all"):
        shutil.rmtree(os.path.join(work, d), ignore_errors=True)
    landing, lake = os.path.join(work, "landing"), os.path.join(work, "lake")

    land(all_batches, landing, BATCHES - 1)
    full = run_pipeline(args, landing, lake, os.path.join(work, "full.log"), os.path.join(work, "full.json"))
    print(f"full run over batches 1-{BATCHES - 1}: {full['wall_s']} s wall, {full['cpu_s']} s CPU, {full['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    before = suite.gold_rows("medallion", lake, args.medallion)

    land(all_batches, landing, BATCHES, entities)
    inc = run_pipeline(args, landing, lake, os.path.join(work, "incremental.log"), os.path.join(work, "incremental.json"))
    share = inc["wall_s"] / full["wall_s"]
    print(f"incremental run over batch {BATCHES}{' (' + ', '.join(entities) + ' only)' if entities else ''}: {inc['wall_s']} s wall, {inc['cpu_s']} s CPU, {inc['peak_rss_bytes'] / 2**30:.2f} GiB: {share:.1%} of the full run", flush=True)
    for t in inc["tables"]:
        print(f"  {t['layer']:6} {t['table']:18} {t['duration_ms']:>7} ms  read {t['rows_read']:>10,}  written {t['rows_written']:>10,}"
              + (f"  skipped: {t['skipped']}" if t.get("skipped") else ""))
    after = suite.gold_rows("medallion", lake, args.medallion)
    changes = changed_share(before, after)
    for t, c in changes.items():
        print(f"  batch {BATCHES} changed {c['rows_changed']:,} rows of gold.{t}: {c['key_values_affected']:,} of {c['key_values']:,} {c['key']} values")

    land_all, lake_all = os.path.join(work, "landing-all"), os.path.join(work, "lake-all")
    land(all_batches, land_all, BATCHES - 1)
    land(all_batches, land_all, BATCHES, entities)
    recompute = run_pipeline(args, land_all, lake_all, os.path.join(work, "recompute.log"), os.path.join(work, "recompute.json"))
    problems = suite.compare(after, suite.gold_rows("medallion", lake_all, args.medallion))
    print(f"full recompute over batches 1-{BATCHES}: {recompute['wall_s']} s wall; incremental gold equals it: {not problems}", flush=True)
    for p in problems[:10]:
        print("  " + p)

    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, f"{tag}.json"), "w") as f:
        json.dump({"scale": args.scale, "batches": BATCHES, "last_batch_entities": entities or "all", "full": full, "incremental": inc, "incremental_share": round(share, 4),
                   "gold_changed_by_last_batch": changes, "recompute": recompute, "gold_equal": not problems, "problems": problems}, f, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
