"""One layer alone, in variants that differ by environment, build or pipeline, alternating: an A/B.

Whole runs at SF 10 move with this VM's hour by more than most changes are worth, and the
layers before the one a change touches add their own spread. This runs only `--layer` over
the lake `run.py` left at a scale factor (run it first): the layers before it are linked
read-only (bronze reads run.py's cached landing), the layer itself is rebuilt from scratch
each time with a fresh state folder. Variants alternate, `--repeat` rounds, each variant given
as `NAME` or `NAME=KEY=VALUE,KEY=VALUE`: environment variables of that variant's runs
(DataFusion reads its settings from `DATAFUSION_*`), except `binary=PATH`, another build of
medallion to run, and `pipeline=PATH`, another version of the commerce pipeline's folder. It
prints every run and, per variant, the median wall and CPU time, the peak RSS and each
table's median time; for gold it checks that every variant's tables equal the first's.
Results go to benches/results/layers-<layer>-sf<N>.json.

    ~/.cache/medallion/bench-venv/bin/python benches/layers.py --scale 10 --layer gold --repeat 4 \\
        --variant 'batch 8 Ki=DATAFUSION_EXECUTION_BATCH_SIZE=8192' --variant default
    ~/.cache/medallion/bench-venv/bin/python benches/layers.py --scale 10 --layer bronze \\
        --variant 'before=binary=/tmp/medallion-before' --variant after
"""

import argparse
import json
import os
import shutil
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as suite  # noqa: E402

def parse_variant(text):
    name, _, env = text.partition("=")
    pairs = {}
    for item in filter(None, env.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {name!r}: {item!r} is not KEY=VALUE")
        pairs[key] = value
    return name, pairs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--layer", choices=sorted(suite.LAYERS_BEFORE), required=True)
    ap.add_argument("--variant", action="append", required=True, help="NAME or NAME=KEY=VALUE,... (repeatable)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--medallion", default=suite.medallion_binary())
    ap.add_argument("--work", default=os.path.join(suite.CACHE, "bench"))
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    variants = dict(parse_variant(v) for v in args.variant)
    if len(variants) != len(args.variant):
        raise SystemExit("variant names must differ")

    base = os.path.join(args.work, f"sf{args.scale:g}", "out-medallion")
    if not all(os.path.exists(os.path.join(base, layer)) for layer in suite.LAYERS_BEFORE[args.layer]):
        raise SystemExit(f"no lake at {base}: run `benches/run.py --scale {args.scale:g} --engines medallion` first")
    landing = os.path.join(args.work, f"sf{args.scale:g}", "landing")
    if args.layer == "bronze" and not os.path.isdir(landing):
        raise SystemExit(f"no landing at {landing}: run `benches/run.py --scale {args.scale:g} --engines medallion` first")
    work = os.path.join(args.work, f"layers-sf{args.scale:g}")
    results = {name: {"env": env, "runs": []} for name, env in variants.items()}
    gold = {}
    for round_ in range(1, args.repeat + 1):
        for name, extra in variants.items():
            extra = dict(extra)
            binary = extra.pop("binary", args.medallion)
            pipeline = extra.pop("pipeline", "commerce")
            run, summary, lake = suite.run_layer_alone(
                binary, base, work, args.layer, env={**os.environ, **extra}, landing=landing,
                pipeline=pipeline)
            run["tables"] = {t["table"]: t["duration_ms"] for t in summary["tables"]}
            results[name]["runs"].append(run)
            print(f"  round {round_} {name:24} wall {run['wall_s']:7.2f} s  cpu {run['cpu_s']:7.2f} s  "
                  f"peak {run['peak_rss_bytes'] / 2**30:5.2f} GiB", flush=True)
            if args.layer == "gold" and round_ == args.repeat:
                gold[name] = suite.gold_rows("medallion", lake, binary)
    shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.layer} alone, SF {args.scale:g}, median of {args.repeat}")
    for name, r in results.items():
        runs = r["runs"]
        for key in ("wall_s", "cpu_s", "peak_rss_bytes"):
            r[key] = statistics.median(x[key] for x in runs)
        tables = {t: statistics.median(x["tables"][t] for x in runs) for t in runs[0]["tables"]}
        slow = ", ".join(f"{t} {ms / 1000:.2f} s" for t, ms in tables.items() if ms >= 500)
        print(f"{name:24} wall {r['wall_s']:7.2f} s  cpu {r['cpu_s']:7.2f} s  "
              f"peak {r['peak_rss_bytes'] / 2**30:5.2f} GiB  ({slow})")
    out = {"scale": args.scale, "layer": args.layer, "variants": results}
    problems = []
    if gold:
        names = list(gold)
        problems = [p for n in names[1:] for p in suite.compare(gold[names[0]], gold[n])]
        print(f"gold equal in all variants: {not problems}")
        out["gold_equal"] = not problems
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"layers-{args.layer}-sf{args.scale:g}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"results: {path}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
