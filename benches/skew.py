"""Skew: gold at 16 target partitions with and without medallion's two skew rules.

The commerce generator gives one customer a quarter of all orders and events. A hash join on
customer_id that shuffles both sides puts that customer's rows on one partition, and so does
a hash aggregation by customer_id whose partial stage gave up. This runs the gold layer of
the lake `run.py` left at a scale factor (run it first), rebuilt from scratch each time, with
`--target-partitions 16`, in three modes, alternating `--repeat` times: both rules off
(`--broadcast-max-rows 0 --combine-hot-groups false`: DataFusion's own plans), joins
broadcast but aggregations not combined (`--combine-hot-groups false`), and the default.
It prints, per gold table, the median wall time and every hash repartition's imbalance (the
largest partition's rows over the mean) from the run summary, checks that every mode's gold
equals the first's, and writes benches/results/skew-sf<N>.json.

    ~/.cache/medallion/bench-venv/bin/python benches/skew.py --scale 1
"""

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as suite  # noqa: E402

MODES = {
    "neither (--broadcast-max-rows 0 --combine-hot-groups false)": ["--broadcast-max-rows", "0", "--combine-hot-groups", "false"],
    "broadcast only (--combine-hot-groups false)": ["--combine-hot-groups", "false"],
    "default (broadcast, combine hot groups)": [],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--medallion", default=suite.medallion_binary())
    ap.add_argument("--work", default=os.path.join(suite.CACHE, "bench"))
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args()

    base = os.path.join(args.work, f"sf{args.scale:g}", "out-medallion")
    if not os.path.exists(os.path.join(base, "silver")):
        raise SystemExit(f"no lake at {base}: run `benches/run.py --scale {args.scale:g} --engines medallion` first")
    work = os.path.join(args.work, f"skew-sf{args.scale:g}")
    results = {m: {"runs": []} for m in MODES}
    gold = {}
    for round_ in range(1, args.repeat + 1):
        for mode, flags in MODES.items():
            run, summary, lake = suite.run_layer_alone(
                args.medallion, base, work, "gold", ["--target-partitions", str(args.partitions), *flags])
            run["tables"] = {t["table"]: {"duration_ms": t["duration_ms"], "repartitions": t.get("repartitions", [])}
                             for t in summary["tables"]}
            results[mode]["runs"].append(run)
            if round_ == args.repeat:
                gold[mode] = suite.gold_rows("medallion", lake, args.medallion)
    print(f"gold at {args.partitions} target partitions, SF {args.scale:g}, median of {args.repeat}")
    for mode, r in results.items():
        runs = r["runs"]
        r["wall_s"] = statistics.median(x["wall_s"] for x in runs)
        r["peak_rss_bytes"] = statistics.median(x["peak_rss_bytes"] for x in runs)
        print(f"\n{mode}: {r['wall_s']:.2f} s wall, {r['peak_rss_bytes'] / 2**30:.2f} GiB peak")
        for table, t in runs[-1]["tables"].items():
            ms = statistics.median(x["tables"][table]["duration_ms"] for x in runs)
            print(f"  {table}: {ms:.0f} ms")
            for p in t["repartitions"]:
                if p["rows"] >= 10_000:
                    print(f"    hash({p['keys']}) {p['rows']:,} rows: largest partition {p['largest_partition_rows']:,}, imbalance {p['imbalance']:.2f}")
    modes = list(MODES)
    problems = [p for m in modes[1:] for p in suite.compare(gold[modes[0]], gold[m])]
    print(f"\ngold equal in all modes: {not problems}")
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, f"skew-sf{args.scale:g}.json"), "w") as f:
        json.dump({"scale": args.scale, "partitions": args.partitions, "modes": results, "gold_equal": not problems}, f, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
