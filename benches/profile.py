#!/usr/bin/env python3
"""Where a medallion run's time goes: the run under `perf`, as a flamegraph and flat reports.

    ~/.cache/medallion/bench-venv/bin/python benches/profile.py --scale 10
    ~/.cache/medallion/bench-venv/bin/python benches/profile.py --scale 10 --incremental

Without --incremental it profiles one run of the whole commerce pipeline over run.py's cached
landing (one batch). With it, it builds a lake from batches 1-99 of incremental.py's cached
batches (not profiled), lands batch 100 and profiles the run over it. It writes, under
benches/results/profiles/, `<tag>.svg` (a flamegraph: every sampled stack, width by CPU time),
`<tag>.txt` (self time by function for the whole run, then for each layer and table in the
windows the run's log gives them) and `<tag>-summary.json` (the run's own summary).

Needs `perf` (Debian: linux-perf) and inferno (`cargo install inferno`) on the PATH or in
~/.cache/medallion/tools/bin. Sampling at 49 Hz with DWARF stacks slows the run by a few
per cent; times in the report are its own, not the benchmark's.
"""

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import incremental  # noqa: E402  (land, pipeline_command, BATCHES)
import run as suite  # noqa: E402  (CACHE, generate_cached, medallion_binary)

TOOLS = os.path.join(suite.CACHE, "tools", "bin")
TOP = 12


def tool(name):
    found = shutil.which(name) or shutil.which(name, path=TOOLS)
    if not found:
        raise SystemExit(f"{name} not found: cargo install inferno --root {os.path.dirname(TOOLS)}")
    return found


def windows(log_path):
    """(label, start, end) in epoch seconds for each layer and table, from the run's JSON log."""
    marks = []
    for line in open(log_path):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if "timestamp" not in event:
            continue
        at = dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        message = event.get("message")
        if message == "layer started":
            marks.append((at, f"{event['layer']} (layer start)", True))
        elif message in ("silver merged", "gold written"):
            layer = event.get("target", "").rsplit("::", 1)[-1]
            marks.append((at, f"{layer}.{event['table']}", False))
    out = []
    for i, (at, label, is_start) in enumerate(marks):
        if is_start and label.startswith("bronze"):
            # Bronze tables run concurrently: one window, up to the next layer's start.
            end = next((m[0] for m in marks[i + 1:] if m[2]), None)
            if end:
                out.append(("bronze (all tables)", at, end))
        elif not is_start and i > 0:
            out.append((label, marks[i - 1][0], at))
    return out


def flat(data, time_window=None):
    cmd = ["perf", "report", "--no-inline", "-i", data, "--no-children", "--sort", "sym", "--stdio", "-g", "none", "--percent-limit", "0.5"]
    if time_window:
        cmd += ["--time", f"{time_window[0]:.6f},{time_window[1]:.6f}"]
    text = subprocess.run(cmd, capture_output=True, text=True).stdout
    rows = [line.rstrip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return rows[:TOP]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--incremental", action="store_true", help=f"profile the run over batch {incremental.BATCHES} of a lake of the others")
    ap.add_argument("--medallion", default=suite.medallion_binary())
    ap.add_argument("--medallion-arg", action="append", default=[])
    ap.add_argument("--frequency", type=int, default=49, help="samples per second per core")
    ap.add_argument("--work", default=os.path.join(suite.CACHE, "bench"))
    ap.add_argument("--results", default=os.path.join(HERE, "results", "profiles"))
    args = ap.parse_args()
    collapse, flamegraph = tool("inferno-collapse-perf"), tool("inferno-flamegraph")

    tag = f"{'incremental-' if args.incremental else ''}sf{args.scale:g}"
    work = os.path.join(args.work, f"profile-{tag}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    lake, summary, log, data = (os.path.join(work, n) for n in ("lake", "summary.json", "run.log", "perf.data"))
    if args.incremental:
        batches = os.path.join(args.work, f"incremental-sf{args.scale:g}", "batches")
        suite.generate_cached(args.medallion, args.scale, incremental.BATCHES, batches)
        landing = os.path.join(work, "landing")
        incremental.land(batches, landing, incremental.BATCHES - 1)
        print(f"building the lake of batches 1-{incremental.BATCHES - 1} (not profiled)", flush=True)
        subprocess.run(incremental.pipeline_command(args, landing, lake, os.path.join(work, "full-summary.json")),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        incremental.land(batches, landing, incremental.BATCHES)
    else:
        landing = os.path.join(args.work, f"sf{args.scale:g}", "landing")
        suite.generate_cached(args.medallion, args.scale, 1, landing)

    print(f"profiling {tag} at {args.frequency} Hz", flush=True)
    # Sample times on the wall clock, so the log's timestamps cut the profile into tables.
    perf = ["perf", "record", "-k", "CLOCK_REALTIME", "-F", str(args.frequency), "--call-graph", "dwarf,16384", "-o", data, "--"]
    with open(log, "w") as out:
        subprocess.run(perf + incremental.pipeline_command(args, landing, lake, summary), check=True, stdout=out, stderr=subprocess.STDOUT)

    os.makedirs(args.results, exist_ok=True)
    svg = os.path.join(args.results, f"{tag}.svg")
    script = subprocess.Popen(["perf", "script", "--no-inline", "-i", data], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    folded = subprocess.run([collapse], stdin=script.stdout, capture_output=True, check=True).stdout
    script.wait()
    with open(svg, "wb") as f:
        f.write(subprocess.run([flamegraph, "--title", f"medallion run commerce, {tag}", "--width", "1600"],
                               input=folded, capture_output=True, check=True).stdout)

    run_summary = json.load(open(summary))
    lines = [f"# medallion run commerce, {tag}: {run_summary['duration_ms'] / 1000:.1f} s",
             f"# perf record -F {args.frequency} --call-graph dwarf; self time by function (perf report --no-children --sort sym)",
             "", "## whole run", *flat(data)]
    for label, start, end in windows(log):
        lines += ["", f"## {label}: {end - start:.1f} s", *flat(data, (start, end))]
    report = os.path.join(args.results, f"{tag}.txt")
    with open(report, "w") as f:
        f.write("\n".join(lines) + "\n")
    shutil.copy(summary, os.path.join(args.results, f"{tag}-summary.json"))
    print("\n".join(lines))
    print(f"\nwrote {svg}, {report}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
