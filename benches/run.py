#!/usr/bin/env python3
"""The commerce benchmark: medallion against Spark, Sail and DuckDB on the same input.

For a scale factor it generates the landing once (cached), then runs each engine end to end
on it, alternating engines, several times, and reports per engine: wall time, CPU time and
peak RSS of the whole process tree (Spark's JVM and Sail's server included), medallion's
ratio to each peer, the floor (reading the landed bytes once), and an estimated cost per run
on Fargate and EMR Serverless. It checks that every engine's gold equals medallion's (counts
exactly, money to the cent, rates to 1e-9) and writes the results as JSON and an SVG chart.

    ~/.cache/medallion/bench-venv/bin/python benches/run.py --scale 1 --repeat 3

Virtual environments it expects (see benches/README.md): bench-venv (duckdb), spark-venv
(pyspark 4.3), sail-venv (pysail + pyspark-client 4.0.1), all under ~/.cache/medallion.
"""
import argparse
import datetime as dt
import decimal
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.expanduser("~/.cache/medallion")
GOLD = ["daily_sales", "customer_360", "daily_engagement"]
FLOAT_COLUMNS = {"conversion_rate"}
PAGE = os.sysconf("SC_PAGE_SIZE")

# Public list prices, us-east-1, Linux/x86, on-demand (USD). Fargate bills the task's vCPU and
# memory per second (1 minute minimum); EMR Serverless bills workers' vCPU and memory per
# second (1 minute minimum). A run is billed as a 2 vCPU task of the memory the engine peaked
# at, rounded up to a whole GB and at least 4 GB (Fargate's floor for 2 vCPU).
PRICES = {
    "fargate": {"vcpu_hour": 0.04048, "gb_hour": 0.004445},
    "emr_serverless": {"vcpu_hour": 0.052624, "gb_hour": 0.0057785},
}
BILLED_VCPUS = 2
# Sail's memory pool: the 6 GiB heap benches/spark/commerce_job.py gives Spark's driver.
SAIL_MEMORY_POOL_BYTES = 6 << 30


def medallion_binary():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "release", "medallion")


def sample_tree(sessions, cpu_seen):
    """Resident bytes of every process in the given sessions; records each one's CPU seconds."""
    total = 0
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) not in sessions:  # stat field 6: the session id
                continue
            # utime + stime (fields 14, 15) of the process itself: children are sampled too.
            cpu_seen[(pid, fields[19])] = (int(fields[11]) + int(fields[12])) / ticks
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def generate_cached(medallion, scale, batches, out):
    """Generates commerce (seed 42) into out unless a finished generation is already there."""
    if os.path.exists(os.path.join(out, ".complete")):
        return
    shutil.rmtree(out, ignore_errors=True)
    print(f"generating commerce SF {scale:g} in {batches} batch(es) into {out}", flush=True)
    subprocess.run([medallion, "generate", "--scale", str(scale), "--batches", str(batches), "--seed", "42", "--out", out],
                   check=True, stdout=subprocess.DEVNULL)
    open(os.path.join(out, ".complete"), "w").close()


def reap_all():
    while True:
        try:
            pid, _, _ = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def failure_reason(text):
    """The engine's own error line when its output has one (medallion's `error: ...`, after
    a run summary that can be long), else the output's tail."""
    errors = [line for line in text.splitlines() if line.lower().startswith("error")]
    return errors[-1][:600] if errors else text[-400:]


def measure(cmd, env=None, server=None, log=None):
    """Runs cmd (and optionally a server process started first) and returns wall, CPU, peak RSS."""
    reap_all()
    cpu_seen = {}
    started = time.monotonic()
    sessions, procs = set(), []
    server_proc = None
    out = open(log, "w") if log else subprocess.DEVNULL
    if server:
        # The server's start-up is part of the run, as the JVM's is for Spark.
        server_proc = subprocess.Popen(server["cmd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=server.get("env"))
        sessions.add(server_proc.pid)
        wait_port(server["port"], 60)
        sample_tree(sessions, cpu_seen)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    sessions.add(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sample_tree(sessions, cpu_seen))
        time.sleep(0.05)
    # Children of the engine still running (Spark's JVM shutting down) belong to the run.
    deadline = time.monotonic() + 30
    while sample_tree({proc.pid}, cpu_seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    if server_proc:
        sample_tree(sessions, cpu_seen)
        os.killpg(server_proc.pid, signal.SIGTERM)
        try:
            server_proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server_proc.pid, signal.SIGKILL)
            server_proc.wait()
    wall = time.monotonic() - started
    reap_all()
    cpu = sum(cpu_seen.values())
    if out is not subprocess.DEVNULL:
        out.close()
    if proc.returncode != 0:
        output = open(log).read() if log else ""
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}\n{failure_reason(output)}")
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "peak_rss_bytes": peak}


def wait_port(port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"server did not open port {port}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def floor_read(landing):
    """Seconds to read every landed byte once (from the page cache, as every engine does)."""
    started = time.monotonic()
    total = 0
    for root, _, files in os.walk(landing):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while chunk := f.read(16 << 20):
                    total += len(chunk)
    return round(time.monotonic() - started, 3), total


# ---------------------------------------------------------------- engines
def engines(args, landing, work):
    med = args.medallion
    venv = lambda name: os.path.join(CACHE, name, "bin", "python")
    job = os.path.join(HERE, "spark", "commerce_job.py")
    sail_port = free_port()
    return {
        "medallion": {
            "prepare": lambda out: shutil.rmtree(out, ignore_errors=True),
            "cmd": lambda out: [med, "run", "commerce", "--var", f"landing={landing}", "--var", f"lake={out}",
                                "--summary", os.path.join(work, "medallion-summary.json"), *args.medallion_arg],
        },
        "spark": {
            "cmd": lambda out: [venv("spark-venv"), job, landing, out],
            "env": {**os.environ, "PYSPARK_PYTHON": venv("spark-venv")},
        },
        "sail": {
            "cmd": lambda out: [venv("sail-venv"), job, landing, out, "--remote", f"sc://127.0.0.1:{sail_port}"],
            "server": {"cmd": [os.path.join(CACHE, "sail-venv", "bin", "sail"), "spark", "server", "--ip", "127.0.0.1",
                               "--port", str(sail_port)], "port": sail_port,
                       # Sail's memory pool is unbounded by default: at SF 10 the kernel killed it at 24 GB.
                       # It gets a spilling pool of the heap Spark's driver gets, as a data engineer
                       # would size it, spilling to the system's temporary directory.
                       "env": {**os.environ, "SAIL_RUNTIME__MEMORY_POOL__TYPE": "fair",
                               "SAIL_RUNTIME__MEMORY_POOL__FAIR__MAX_SIZE": str(SAIL_MEMORY_POOL_BYTES)}},
        },
        "duckdb": {
            "cmd": lambda out: [venv("bench-venv"), os.path.join(HERE, "duckdb", "commerce.py"), landing, out],
        },
    }


# ---------------------------------------------------------------- gold equality
def normalise(value):
    """Parquet values to the text medallion's CSV export writes (which passes through as is)."""
    if value is None:
        return ""
    if isinstance(value, decimal.Decimal):
        return f"{value:.2f}"
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()[:10]
    return str(value)


LAYERS_BEFORE = {"bronze": [], "silver": ["bronze"], "gold": ["bronze", "silver"]}


def run_layer_alone(medallion, base, work, layer, flags=(), env=None, landing="/nonexistent", pipeline="commerce"):
    """Rebuilds `layer` of the lake at `base` from scratch under `work`: the layers before it
    linked read-only, a fresh state folder; bronze reads `landing`, and `pipeline` names the
    pipeline (a name or a folder). Returns measure()'s figures, the run summary and the lake's
    path."""
    lake = os.path.join(work, "lake")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(lake)
    for before in LAYERS_BEFORE[layer]:
        os.symlink(os.path.join(base, before), os.path.join(lake, before))
    summary = os.path.join(work, "summary.json")
    cmd = [medallion, "run", pipeline, "--layer", layer, "--var", f"lake={lake}", "--var", f"landing={landing}",
           "--state", os.path.join(work, "state"), "--summary", summary, *flags]
    run = measure(cmd, env=env, log=os.path.join(work, "run.log"))
    with open(summary) as f:
        return run, json.load(f), lake


def gold_rows(engine, out, medallion):
    import duckdb

    con = duckdb.connect()
    tables = {}
    for t in GOLD:
        if engine == "medallion":
            csv_text = subprocess.run([medallion, "query", "commerce", "--var", f"lake={out}", f"SELECT * FROM gold.{t}", "--format", "csv"],
                                      capture_output=True, text=True, check=True).stdout
            path = os.path.join(out, f"_{t}.csv")
            with open(path, "w") as f:
                f.write(csv_text)
            rel = con.execute(f"SELECT * FROM read_csv('{path}', header = true, all_varchar = true)")
        else:
            base = os.path.join(out, "gold", t)
            src = base + ".parquet" if os.path.exists(base + ".parquet") else base + "/**/*.parquet"
            rel = con.execute(f"SELECT * FROM read_parquet('{src}')")
        names = [d[0] for d in rel.description]
        rows = []
        for r in rel.fetchall():
            key = tuple(normalise(v) if n not in FLOAT_COLUMNS else "" for n, v in zip(names, r))
            floats = tuple(None if v in (None, "") else float(v) for n, v in zip(names, r) if n in FLOAT_COLUMNS)
            rows.append((key, floats))
        tables[t] = (names, sorted(rows))
    return tables


def compare(ours, theirs):
    problems = []
    for t in GOLD:
        (n1, a), (n2, b) = ours[t], theirs[t]
        if [c.lower() for c in n1] != [c.lower() for c in n2]:
            problems.append(f"{t}: columns differ: {n1} vs {n2}")
            continue
        if len(a) != len(b):
            problems.append(f"{t}: {len(a)} rows vs {len(b)}")
        ka, kb = dict(a), dict(b)
        for k in list(set(ka) ^ set(kb))[:3]:
            problems.append(f"{t}: only in {'medallion' if k in ka else 'peer'}: {k}")
        for k, f in ka.items():
            g = kb.get(k)
            if g is not None and any((x is None) != (y is None) or (x is not None and abs(x - y) > 1e-9) for x, y in zip(f, g)):
                problems.append(f"{t}: {k}: {f} vs {g}")
                break
    return problems


# ---------------------------------------------------------------- report
def cost(run):
    billed_s = max(run["wall_s"], 60.0)
    gb = max(4, -(-run["peak_rss_bytes"] // (1 << 30)))
    return {
        name: round(billed_s / 3600 * (BILLED_VCPUS * p["vcpu_hour"] + gb * p["gb_hour"]), 6)
        for name, p in PRICES.items()
    } | {"billed_vcpu_s": round(billed_s * BILLED_VCPUS, 1), "billed_gb_s": round(billed_s * gb, 1)}


def svg_chart(results, path, title):
    names = list(results)
    walls = [results[n]["wall_s"] for n in names]
    rss = [results[n]["peak_rss_bytes"] / (1 << 30) for n in names]
    width, bar_h, gap, left = 760, 22, 10, 110
    height = 60 + 2 * (len(names) * (bar_h + gap)) + 60
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">',
             f'<text x="10" y="22" font-size="15" font-weight="bold">{title}</text>']
    y = 40
    for label, values, unit in (("wall time (s)", walls, "s"), ("peak RSS (GiB)", rss, "GiB")):
        parts.append(f'<text x="10" y="{y + 12}" font-weight="bold">{label}</text>')
        y += 20
        top = max(values) or 1
        for n, v in zip(names, values):
            w = (width - left - 120) * v / top
            color = "#d9480f" if n == "medallion" else "#868e96"
            parts.append(f'<text x="10" y="{y + 15}">{n}</text>')
            parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
            parts.append(f'<text x="{left + w + 6:.1f}" y="{y + 15}">{v:.1f} {unit}</text>')
            y += bar_h + gap
        y += 10
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3, help="runs per engine, alternating engines")
    ap.add_argument("--engines", default="medallion,spark,sail,duckdb")
    ap.add_argument("--medallion", default=medallion_binary())
    ap.add_argument("--medallion-arg", action="append", default=[], help="extra argument for `medallion run` (repeatable)")
    ap.add_argument("--work", default=os.path.join(CACHE, "bench"))
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    # The gold check runs at the end: an interpreter without duckdb (this folder's `duckdb/`
    # then imports as an empty namespace) would fail it after every run had been paid for.
    try:
        import duckdb

        duckdb.connect().close()
    except (ImportError, AttributeError) as missing:
        raise SystemExit(f"run.py needs duckdb for the gold check ({missing}): run it with "
                         f"{os.path.join(CACHE, 'bench-venv', 'bin', 'python')}")

    tag = f"sf{args.scale:g}"
    work = os.path.join(args.work, tag)
    landing = os.path.join(work, "landing")
    generate_cached(args.medallion, args.scale, 1, landing)
    floor_s, landed_bytes = floor_read(landing)
    print(f"landing: {landed_bytes:,} bytes; floor (read once): {floor_s} s", flush=True)

    table = engines(args, landing, work)
    chosen = [e.strip() for e in args.engines.split(",") if e.strip()]
    runs = {e: [] for e in chosen}
    failed = {}
    for r in range(args.repeat):
        order = chosen[r % len(chosen):] + chosen[:r % len(chosen)]
        for e in order:
            out = os.path.join(work, f"out-{e}")
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"])
            spec = table[e]
            try:
                m = measure(spec["cmd"](out), env=spec.get("env"), server=spec.get("server"),
                            log=os.path.join(work, f"{e}.log"))
            except SystemExit as failure:
                # One engine failing (out of memory, say) is a result; the others still run.
                failed[e] = str(failure)[-2000:]
                print(f"  run {r + 1} {e:10s} FAILED: {failure_reason(str(failure))}", flush=True)
                continue
            runs[e].append(m)
            print(f"  run {r + 1} {e:10s} wall {m['wall_s']:7.2f} s  cpu {m['cpu_s']:7.2f} s  peak {m['peak_rss_bytes'] / 2**30:5.2f} GiB", flush=True)

    summary = {}
    for e, ms in runs.items():
        if not ms:
            continue
        best = sorted(ms, key=lambda m: m["wall_s"])[len(ms) // 2]  # the median run
        summary[e] = {**best, "runs": ms, "cost_usd": cost(best)}
    equality = {}
    # Gold is compared with medallion's, so only when medallion's last run succeeded.
    if "medallion" in chosen and "medallion" not in failed:
        ours = gold_rows("medallion", os.path.join(work, "out-medallion"), args.medallion)
        counts = {t: len(ours[t][1]) for t in GOLD}
        for e in chosen:
            if e == "medallion" or e not in summary:
                continue
            problems = compare(ours, gold_rows(e, os.path.join(work, f"out-{e}"), args.medallion))
            equality[e] = {"equal": not problems, "problems": problems[:10]}
        print(f"gold rows (medallion): {counts}")
        for e, q in equality.items():
            print(f"gold {e:10s} equal to medallion: {q['equal']}" + ("" if q["equal"] else "\n    " + "\n    ".join(q["problems"])))
    ratios = {}
    if "medallion" in summary:
        m = summary["medallion"]
        for e in summary:
            if e != "medallion":
                ratios[e] = {"speedup": round(summary[e]["wall_s"] / m["wall_s"], 2),
                             "rss_ratio": round(m["peak_rss_bytes"] / max(summary[e]["peak_rss_bytes"], 1), 3)}
    print(f"\n{'engine':10s} {'wall s':>8s} {'cpu s':>8s} {'peak GiB':>9s} {'vs medallion':>13s} {'Fargate $':>10s} {'EMR-S $':>9s}")
    for e, s in summary.items():
        vs = f"{ratios[e]['speedup']:.2f}x" if e in ratios else "-"
        print(f"{e:10s} {s['wall_s']:8.2f} {s['cpu_s']:8.2f} {s['peak_rss_bytes'] / 2**30:9.2f} {vs:>13s} "
              f"{s['cost_usd']['fargate']:10.5f} {s['cost_usd']['emr_serverless']:9.5f}")
    print(f"floor: read the landed input once: {floor_s} s")

    os.makedirs(args.results, exist_ok=True)
    result = {
        "scale": args.scale, "repeat": args.repeat, "landed_bytes": landed_bytes, "floor_read_s": floor_s,
        "machine": {"cores": os.cpu_count(), "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "engines": summary, "medallion_ratios": ratios, "gold_equal": equality, "prices": PRICES,
        "failed": failed, "medallion_args": args.medallion_arg, "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(args.results, f"{tag}.json"), "w") as f:
        json.dump(result, f, indent=2)
    if summary:
        svg_chart(summary, os.path.join(args.results, f"{tag}.svg"),
                  f"commerce SF {args.scale:g}, {os.cpu_count()} cores: median of {args.repeat} run(s)")
    print(f"results: {os.path.join(args.results, tag + '.json')}" + (" and .svg" if summary else ""))
    if failed or any(not q["equal"] for q in equality.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
