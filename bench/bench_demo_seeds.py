"""Seed robustness of the demo: `avllm demo` for N seeds, then accuracy per family as mean and range.

Each seed is a whole demo (its own synthetic clips, random encoders, LLM initialisation and data
order) in `<workdir>/seed<N>`; a seed whose folder already holds results is read, not rerun
(`--rerun` to redo). Prints one line per seed and measurement, then a markdown table:

    demo seed=0 key=sync|<AUD_VIS> acc=0.98 n=52
    demo seed=0 wall_s=540 data_s=98 train_s=430 bars=met
    | family | chance | `<VIS>` | `<AUD>` | `<AUD_VIS>` |   (cells: mean [min–max] over seeds)

Usage: python bench/bench_demo_seeds.py [--seeds 0 1 2] [--workdir /tmp/avllm_demo_seeds] [demo overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_seed(seed: int, out: Path, overrides: list[str], rerun: bool) -> dict:
    """One demo run (a subprocess, as a user runs it) -> its results.json plus timings."""
    done = out / "results.json"
    if rerun or not done.is_file():
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "nemo_avllm.cli", "demo", f"out_dir={out}", f"seed={seed}",
               "progress_bar=false", *overrides]
        t0 = time.time()
        log = out.parent / f"seed{seed}.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"demo seed={seed} failed (exit {rc}); see {log}")
        (out / "wall_s.txt").write_text(f"{time.time() - t0:.0f}\n")
    res = json.loads(done.read_text())
    summary = (out / "results.md").read_text()
    times = re.search(r"Data (\d+) s, training (\d+) s, total (\d+) s", summary)
    res["data_s"], res["train_s"], res["total_s"] = (int(x) for x in times.groups())
    wall = out / "wall_s.txt"
    res["wall_s"] = int(wall.read_text()) if wall.is_file() else None
    res["bars_met"] = "Every family clears its bar" in summary
    return res


def aggregate(runs: list[dict]) -> dict:
    """{"accuracy": {key: [values over seeds]}, "parts": ..., "counts": ...} over seeds."""
    agg: dict = {"accuracy": {}, "parts": {}, "counts": {}}
    for r in runs:
        for what in ("accuracy", "parts"):
            for k, v in r.get(what, {}).items():
                agg[what].setdefault(k, []).append(v)
        for k, n in r["counts"].items():  # questions asked over all seeds
            agg["counts"][k] = agg["counts"].get(k, 0) + n
    return agg


def seeds_table(agg: dict) -> str:
    """The demo's table (`nemo_avllm.demo.pipeline.table`) with "mean [min–max]" cells."""
    from nemo_avllm.demo.pipeline import table

    def cell(values: list[float]) -> str:
        return f"{100 * sum(values) / len(values):.0f}% [{100 * min(values):.0f}–{100 * max(values):.0f}]"

    fmt = {what: {k: cell(v) for k, v in agg[what].items()} for what in ("accuracy", "parts")}
    return table({**fmt, "counts": agg["counts"]}, cell=lambda v, n: f"{v} (n={n})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workdir", default="/tmp/avllm_demo_seeds")
    ap.add_argument("--rerun", action="store_true", help="run again seeds that already have results")
    ap.add_argument("overrides", nargs="*", help="demo overrides, e.g. stage2.trainer.max_steps=800")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    runs = []
    for seed in args.seeds:
        r = run_seed(seed, Path(args.workdir) / f"seed{seed}", args.overrides, args.rerun)
        for what in ("accuracy", "parts"):
            for k, v in sorted(r[what].items()):
                print(f"demo seed={seed} key={k} acc={v:.3f}", flush=True)
        print(f"demo seed={seed} wall_s={r['wall_s']} data_s={r['data_s']} train_s={r['train_s']} "
              f"total_s={r['total_s']} bars={'met' if r['bars_met'] else 'missed'}", flush=True)
        runs.append(r)
    print(f"\nseeds {args.seeds}: accuracy as mean [min–max] over seeds, n = questions over all seeds; bars met in "
          f"{sum(r['bars_met'] for r in runs)}/{len(runs)} runs\n")
    print(seeds_table(aggregate(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
