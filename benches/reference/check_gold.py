#!/usr/bin/env python3
"""Checks invariant 5 of the reference spec: medallion's gold equals an independent engine's.

Generates a landing with B batches (or takes one), lands the batches one at a time with a
medallion run after each (invariant 1's incremental path), computes the gold tables from
the full landing with commerce_reference.py (Python parsing + DuckDB), and compares: counts
exactly, money to the cent, rates to 1e-9.

    python3 check_gold.py --medallion target/release/medallion --scale 0.05 --batches 3 --work /tmp/check
    python3 check_gold.py --medallion ... --landing /some/landing --work /tmp/check   # any generator's files
"""
import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TABLES = ["daily_sales", "customer_360", "daily_engagement"]
FLOAT_COLUMNS = {"conversion_rate"}


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-4000:]}")
    return p.stdout


def rows(text):
    reader = csv.DictReader(io.StringIO(text))
    return reader.fieldnames, list(reader)


def normalise(header, row):
    key = tuple(row[c] for c in header if c not in FLOAT_COLUMNS)
    floats = tuple(float(row[c]) if row[c] != "" else None for c in header if c in FLOAT_COLUMNS)
    return key, floats


def compare(name, ours, theirs):
    h1, r1 = rows(ours)
    h2, r2 = rows(theirs)
    if h1 != h2:
        return [f"{name}: columns differ: {h1} vs {h2}"]
    a = sorted(normalise(h1, r) for r in r1)
    b = sorted(normalise(h2, r) for r in r2)
    problems = []
    if len(a) != len(b):
        problems.append(f"{name}: {len(a)} rows in medallion, {len(b)} in the reference")
    ka, kb = {k for k, _ in a}, {k for k, _ in b}
    for k in sorted(ka - kb)[:5]:
        problems.append(f"{name}: only in medallion: {k}")
    for k in sorted(kb - ka)[:5]:
        problems.append(f"{name}: only in the reference: {k}")
    fb = dict(b)
    for k, f in a:
        g = fb.get(k)
        if g is None:
            continue
        for x, y in zip(f, g):
            if (x is None) != (y is None) or (x is not None and abs(x - y) > 1e-9):
                problems.append(f"{name}: {k}: {x} vs {y}")
                break
    return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--medallion", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--landing", help="an existing landing folder (any generator's)")
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--python", default=sys.executable, help="a Python with duckdb")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    source = args.landing or os.path.join(args.work, "generated")
    if not args.landing:
        run([args.medallion, "generate", "--scale", str(args.scale), "--batches", str(args.batches), "--seed", str(args.seed), "--out", source])
    landing, lake = os.path.join(args.work, "landing"), os.path.join(args.work, "lake")
    batches = sorted({b for e in os.listdir(source) if os.path.isdir(os.path.join(source, e)) for b in os.listdir(os.path.join(source, e)) if b.startswith("batch-")})
    pipeline = os.path.join(ROOT, "pipelines", "commerce")
    vars_ = ["--var", f"landing={landing}", "--var", f"lake={lake}"]
    for batch in batches:
        for entity in os.listdir(source):
            src = os.path.join(source, entity, batch)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(landing, entity, batch))
        summary = json.loads(run([args.medallion, "run", pipeline, *vars_]).strip().splitlines()[-1])
        print(f"medallion run after {batch}: {summary['status']} in {summary['duration_ms']} ms", file=sys.stderr)
    reference = os.path.join(args.work, "reference")
    print(run([args.python, os.path.join(HERE, "commerce_reference.py"), landing, reference]).strip(), file=sys.stderr)
    problems = []
    counts = {}
    for t in TABLES:
        ours = run([args.medallion, "query", pipeline, *vars_, "--format", "csv", f"SELECT * FROM gold.{t}"])
        theirs = open(os.path.join(reference, f"{t}.csv")).read()
        counts[t] = len(rows(ours)[1])
        problems += compare(t, ours, theirs)
    print(json.dumps({"batches": len(batches), "gold_rows": counts, "equal": not problems}))
    for p in problems[:30]:
        print(p, file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
