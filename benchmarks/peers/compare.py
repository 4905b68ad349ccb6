#!/usr/bin/env python3
"""Runs W1 in Flower and in Cohort alternately and prints one table.

Called by run.sh (which makes the virtual environment and builds
cohort-sim); can be run again alone with the venv's python:

    benchmarks/peers/.venv/bin/python benchmarks/peers/compare.py --runs 2

Each repetition runs, in this order (`--systems`, default
flower,auto,dfdx): Flower (flower_w1.py), Cohort with `--backend auto` (the
default: the gemm executor for mlp28), Cohort with `--backend dfdx`.
`flower-dataloader` adds Flower with its clients batching through
torch.utils.data.DataLoader, as Flower's tutorials do. Before each run the output of `uptime` is recorded. Every
process runs under `/usr/bin/time -v`.

Seconds per round, both sides: wall time from the end of one central
evaluation to the end of the next (Cohort: `wall_ms` of metrics.csv, which
spans sampling, training, encode/seal/open/aggregate and evaluation; Flower:
see flower_w1.py). The headline is the mean over rounds 2-30: round 0 (Ray
start-up / Cohort's data loading and partition) is never counted, and round 1
is left out of the headline because Flower's Ray actors import torch and load
the data set during their first task (the mean over rounds 1-30 is shown
too). Peak memory: Cohort is one process, its maximum RSS from `time -v`;
Flower is a tree of processes (driver, Ray's gcs_server and raylet, the
client actors, ...), the peak of the sum of their RSS sampled every 0.25 s
(and of PSS, which counts shared pages once).

CPU seconds a round (user + system, rounds 2-30): Flower, the whole process
tree sampled by flower_w1.py; Cohort, the process's CPU time read (psutil)
when metrics.jsonl gets its line for round 1 and for the last round. On a
machine shared with other work the wall time of a CPU-bound run stretches
with the load; its CPU time much less, so the CPU ratio is the steadier one.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SIM = os.path.join(ROOT, "target", "release", "cohort-sim")
CONFIG = os.path.join(ROOT, "simulator", "experiments", "w1-fashion.toml")
TIME = "/usr/bin/time"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def load_of(up: str) -> str:
    m = re.search(r"load average:\s*(.*)$", up)
    return m.group(1).replace(" ", "") if m else up


def time_v(stderr_path: str) -> dict:
    out = {}
    with open(stderr_path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith("Maximum resident set size (kbytes):"):
                out["max_rss_mb"] = int(line.split(":")[1]) / 1024
            elif line.startswith("Elapsed (wall clock) time"):
                v = line.rsplit(" ", 1)[1]
                parts = [float(p) for p in v.split(":")]
                s = 0.0
                for p in parts:
                    s = s * 60 + p
                out["elapsed_s"] = s
            elif line.startswith("User time (seconds):"):
                out["user_s"] = float(line.split(":")[1])
            elif line.startswith("System time (seconds):"):
                out["sys_s"] = float(line.split(":")[1])
            elif line.startswith("Exit status:"):
                out["exit"] = int(line.split(":")[1])
    return out


def run_flower(run_dir: str, rounds: int, py: str, loader: str) -> dict:
    so, se = os.path.join(run_dir, "stdout.txt"), os.path.join(run_dir, "stderr.txt")
    cmd = [TIME, "-v", py, os.path.join(HERE, "flower_w1.py"), "--rounds", str(rounds), "--loader", loader]
    with open(so, "w") as o, open(se, "w") as e:
        rc = subprocess.run(cmd, stdout=o, stderr=e, cwd=HERE).returncode
    tv = time_v(se)
    res = None
    with open(so, errors="replace") as f:
        for line in f:
            if line.startswith("RESULT "):
                res = json.loads(line[len("RESULT "):])
    if rc != 0 or res is None:
        raise RuntimeError(f"Flower run failed (exit {rc}); see {so} and {se}")
    r = {
        "system": "Flower" if loader == "tensor" else f"Flower {loader}",
        "cmd": " ".join(cmd[2:]),
        "round_s": res["round_s"],
        "acc": res["acc"],
        "eval_s": res["eval_s"],
        "train_s_sum": res["train_s_sum"],
        "cpu_s_2": res["cpu_s_2"],
        "cpu_total_s": res["cpu_total_s"],
        "peak_mb": res["peak_rss_tree_mb"],
        "peak_note": f"tree RSS sum; PSS sum {res['peak_pss_tree_mb']:.0f} MB; "
        f"largest process {tv.get('max_rss_mb', float('nan')):.0f} MB",
        "pss_mb": res["peak_pss_tree_mb"],
        "largest_process_mb": tv.get("max_rss_mb"),
        "elapsed_s": tv.get("elapsed_s", res["total_s"]),
        "setup_s": res["setup_s"],
        "versions": res["versions"],
    }
    return r


def run_cohort(run_dir: str, rounds: int, backend: str, sim: str | None = None, label: str | None = None) -> dict:
    so, se = os.path.join(run_dir, "stdout.txt"), os.path.join(run_dir, "stderr.txt")
    out = os.path.join(run_dir, "cohort")
    cmd = [TIME, "-v", sim or SIM, "--config", CONFIG, "--backend", backend, "--quiet", "--output", out]
    if rounds != 30:
        cmd += ["--rounds", str(rounds)]
    # Poll the process's CPU time as metrics.jsonl grows (a line per round,
    # flushed), to get CPU seconds over rounds 2..N like Flower's.
    import psutil

    jsonl = os.path.join(out, "metrics.jsonl")
    cpu_at: dict[int, float] = {}
    with open(so, "w") as o, open(se, "w") as e:
        pr = subprocess.Popen(cmd, stdout=o, stderr=e, cwd=ROOT)
        sim_p = None
        while pr.poll() is None:
            try:
                if sim_p is None:
                    kids = psutil.Process(pr.pid).children()
                    sim_p = kids[0] if kids else None
                if sim_p is not None and os.path.exists(jsonl):
                    with open(jsonl, "rb") as f:
                        n = f.read().count(b"\n")
                    for k in (1, rounds):
                        if n >= k and k not in cpu_at:
                            t = sim_p.cpu_times()
                            cpu_at[k] = t.user + t.system
            except (psutil.Error, OSError):
                pass
            time.sleep(0.02)
        rc = pr.returncode
    if rc != 0:
        raise RuntimeError(f"cohort-sim --backend {backend} failed (exit {rc}); see {so} and {se}")
    tv = time_v(se)
    round_s, acc, eval_s = [], [], []
    with open(os.path.join(out, "metrics.csv")) as f:
        for row in csv.DictReader(f):
            round_s.append(float(row["wall_ms"]) / 1000)
            acc.append(float(row["acc_fashion"]))
            eval_s.append(float(row["eval_ms"]) / 1000)
    if len(round_s) != rounds:
        raise RuntimeError(f"cohort-sim wrote {len(round_s)} rounds, expected {rounds}")
    return {
        "system": f"Cohort {label or backend}",
        "cmd": " ".join(cmd[2:]).replace(ROOT + "/", ""),
        "round_s": round_s,
        "acc": acc,
        "eval_s": eval_s,
        "peak_mb": tv["max_rss_mb"],
        "peak_note": "one process, time -v",
        "elapsed_s": tv.get("elapsed_s"),
        "cpu_s_2": (cpu_at[rounds] - cpu_at[1]) / (rounds - 1) if 1 in cpu_at and rounds in cpu_at and rounds > 1 else float("nan"),
        "cpu_total_s": tv.get("user_s", float("nan")) + tv.get("sys_s", float("nan")),
    }


def summarize(r: dict) -> dict:
    rs = r["round_s"]
    r["mean_2"] = statistics.fmean(rs[1:]) if len(rs) > 1 else float("nan")
    r["mean_1"] = statistics.fmean(rs)
    r["median_2"] = statistics.median(rs[1:]) if len(rs) > 1 else float("nan")
    r["eval_mean"] = statistics.fmean(r["eval_s"][1:] or r["eval_s"])
    r["final"] = r["acc"][-1]
    r["best"] = max(r["acc"])
    return r


def fmt_table(rows: list[dict], rounds: int) -> str:
    hdr = (f"| run | system | load avg before (1, 5, 15 min) | s/round, rounds 2-{rounds} (median) | "
           f"s/round, rounds 1-{rounds} | of it evaluation | CPU s/round, rounds 2-{rounds} | final acc | best acc | "
           f"peak memory | process wall s (CPU s) |")
    lines = [hdr, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['system']} | {r['load']} | {r['mean_2']:.3f} ({r['median_2']:.3f}) | "
            f"{r['mean_1']:.3f} | {r['eval_mean']:.3f} | {r['cpu_s_2']:.3f} | {100 * r['final']:.2f}% | "
            f"{100 * r['best']:.2f}% | {r['peak_mb']:.0f} MB ({r['peak_note']}) | "
            f"{r['elapsed_s']:.1f} ({r['cpu_total_s']:.1f}) |"
        )
    return "\n".join(lines)


def fmt_ratios(rows: list[dict], runs: int, rounds: int) -> str:
    lines = [f"| run | Flower / Cohort | s/round (2-{rounds}) | s/round (1-{rounds}) | CPU s/round (2-{rounds}) | "
             f"peak memory (RSS) | peak memory (Flower PSS) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    agg: dict[str, list[list[float]]] = {}
    for i in range(1, runs + 1):
        for fl in [r for r in rows if r["run"] == i and r["system"].startswith("Flower")]:
            for c in [r for r in rows if r["run"] == i and r["system"].startswith("Cohort")]:
                v = [fl["mean_2"] / c["mean_2"], fl["mean_1"] / c["mean_1"], fl["cpu_s_2"] / c["cpu_s_2"],
                     fl["peak_mb"] / c["peak_mb"], fl["pss_mb"] / c["peak_mb"]]
                name = f"{fl['system']} / {c['system']}"
                agg.setdefault(name, []).append(v)
                lines.append(f"| {i} | {name} | {v[0]:.2f}x | {v[1]:.2f}x | {v[2]:.2f}x | {v[3]:.1f}x | {v[4]:.1f}x |")
    for name, vs in agg.items():
        med = [statistics.median(col) for col in zip(*vs)]
        lo = [min(col) for col in zip(*vs)]
        hi = [max(col) for col in zip(*vs)]
        cells = " | ".join(f"{m:.2f}x ({a:.2f}-{b:.2f})" if k < 3 else f"{m:.1f}x"
                           for k, (m, a, b) in enumerate(zip(med, lo, hi)))
        lines.append(f"| median (range) | {name} | {cells} |")
    return "\n".join(lines)


def main() -> int:
    global SIM
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="repetitions of (Flower, Cohort auto, Cohort dfdx)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--systems", default="flower,auto,dfdx",
                    help="what each repetition runs, in order: flower (tensor batches), "
                    "flower-dataloader (batches by torch DataLoader), and Cohort backends (auto, dfdx, gemm)")
    ap.add_argument("--out", default=None, help="folder for logs and results (default results/<time>)")
    ap.add_argument("--before", default=None, metavar="COHORT_SIM",
                    help="another cohort-sim binary (e.g. built from an earlier commit), run as system "
                    "`before` with --backend auto: before/after in the same run")
    args = ap.parse_args()

    if not os.path.exists(SIM):
        sys.exit(f"{SIM} missing: cargo build --release -p cohort-simulator --bin cohort-sim")
    if not os.path.exists(TIME):
        sys.exit(f"{TIME} missing: apt-get install -y time")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join(HERE, "results", stamp)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    # A copy of the binary, so that a rebuild of target/ by someone else
    # during the runs cannot change what is measured half-way.
    shutil.copy2(SIM, os.path.join(out, "cohort-sim"))
    sim = os.path.join(out, "cohort-sim")
    SIM = sim
    systems = [b for b in args.systems.split(",") if b]
    before = None
    if args.before:
        before = os.path.join(out, "cohort-sim-before")
        shutil.copy2(args.before, before)
        if "before" not in systems:
            systems.append("before")
    elif "before" in systems:
        sys.exit("--systems names `before` but --before gives no binary")

    nproc = os.cpu_count()
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    sim_version = subprocess.run([SIM, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"W1 side by side, {stamp}: {nproc} CPUs ({cpu}); {sim_version}; logs in {out}", flush=True)

    rows = []
    for i in range(1, args.runs + 1):
        for system in systems:
            run_dir = os.path.join(out, f"{i}-{system}")
            if os.path.exists(run_dir):
                shutil.rmtree(run_dir)
            os.makedirs(run_dir)
            up = uptime()
            print(f"[run {i}] {system}: {up}", flush=True)
            if system == "flower":
                r = run_flower(run_dir, args.rounds, py, "tensor")
            elif system == "flower-dataloader":
                r = run_flower(run_dir, args.rounds, py, "dataloader")
            elif system == "before":
                r = run_cohort(run_dir, args.rounds, "auto", sim=before, label="before (auto)")
            else:
                r = run_cohort(run_dir, args.rounds, system)
            r.update(run=i, uptime=up, load=load_of(up))
            summarize(r)
            rows.append(r)
            if "train_s_sum" in r and len(r["train_s_sum"]) > 1:
                print(f"[run {i}] {r['system']}: clients' training "
                      f"{statistics.fmean(r['train_s_sum'][1:]):.3f} s a round summed over the actors "
                      f"(rounds 2-{args.rounds}), evaluation {r['eval_mean']:.3f} s", flush=True)
            print(f"[run {i}] {r['system']}: {r['mean_2']:.3f} s/round (rounds 2-{args.rounds}), "
                  f"{r['mean_1']:.3f} (1-{args.rounds}), final {100 * r['final']:.2f}%, best "
                  f"{100 * r['best']:.2f}%, peak {r['peak_mb']:.0f} MB, {r['elapsed_s']:.1f} s", flush=True)

    v = next(r for r in rows if r["system"].startswith("Flower"))["versions"]
    versions = (f"Flower {v['flwr']}, PyTorch {v['torch']}, Ray {v['ray']}, numpy {v['numpy']}, "
                f"Python {v['python']}; {sim_version}")
    table = fmt_table(rows, args.rounds)
    ratios = fmt_ratios(rows, args.runs, args.rounds)
    after = uptime()
    text = (f"W1 side by side ({stamp}), {args.rounds} rounds, runs alternating "
            + ", ".join(systems) + f"; {versions}\n\n"
            f"{table}\n\n{ratios}\n\nafter the last run: {after}\n")
    print("\n" + text)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"stamp": stamp, "versions": versions, "rows": rows, "uptime_after": after}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
