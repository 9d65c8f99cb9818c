"""Loop overhead and memory per client of the federated loop.

Usage: ``python benchmarks/loop_overhead.py [--quick] [--json PATH]``

Two figures (issue: Foundation):

* ``loop_overhead_fraction``: per round, (round wall time - client training
  time - evaluation time) / round wall time, i.e. what the loop itself costs
  (sampling, adapter load/flatten, the plaintext aggregation protocol, the
  server step, checkpointing). Median over rounds; target <= 0.05.
* ``mem_mb_per_extra_client``: growth of peak RSS per added client when one
  round trains 1, 10 and 100 clients on the shared base model; each count runs
  in a fresh subprocess so peaks do not mix. Target <= 50 MB.

The baseline the overhead is measured against is the training and evaluation
time measured in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import transformers

    from securefed.config import load_config
    from securefed.fl.runner import run_experiment

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(overrides=spec["overrides"])
        t0 = time.perf_counter()
        run_experiment(cfg, Path(d) / "run")
        wall = time.perf_counter() - t0
        rounds = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = [r["time"] for r in rounds if r.get("round", 0) > 0]
    return {"peak_rss_mb": peak_mb, "wall_s": wall, "times": times}


def _run_worker(overrides: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps({"overrides": overrides})],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def overhead(model: str, clients: int, steps: int, rounds: int) -> dict[str, Any]:
    res = _run_worker([
        f'model.name="{model}"', f"partition.clients={clients}", f"train.rounds={rounds}",
        f"train.local_steps={steps}", "eval.before=false", "eval.max_examples=64", "eval.every=1",
        "data.train_examples=2000",
    ])
    fr = [t["overhead"] / t["round"] for t in res["times"]]
    return {
        "model": model, "clients": clients, "local_steps": steps, "rounds": rounds,
        "overhead_fraction_median": statistics.median(fr),
        "overhead_fraction_per_round": fr,
        "overhead_s_median": statistics.median(t["overhead"] for t in res["times"]),
        "round_s_median": statistics.median(t["round"] for t in res["times"]),
        "train_s_median": statistics.median(t["train"] for t in res["times"]),
        "aggregate_s_median": statistics.median(t["aggregate"] for t in res["times"]),
    }


def memory(model: str, counts: list[int]) -> dict[str, Any]:
    peaks = {}
    for n in counts:
        res = _run_worker([
            f'model.name="{model}"', f"partition.clients={n}", "partition.scheme=\"iid\"", "partition.min_size=1",
            "train.rounds=1", "train.local_steps=1", "train.batch_size=4", "eval.before=false",
            "eval.max_examples=4", "data.train_examples=4000",
        ])
        peaks[n] = res["peak_rss_mb"]
        print(f"  {model}: {n} clients -> peak RSS {peaks[n]:.0f} MB", flush=True)
    lo, hi = min(counts), max(counts)
    per = (peaks[hi] - peaks[lo]) / (hi - lo)
    return {"model": model, "peak_rss_mb": {str(k): v for k, v in peaks.items()}, "mb_per_extra_client": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and clients")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(_worker(json.loads(a.worker))))
        return
    counts = [1, 10] if a.quick else [1, 10, 100]
    results: dict[str, Any] = {"quick": a.quick, "cpu_count": os.cpu_count()}
    print("loop overhead (round wall - training - evaluation) / round wall")
    runs = [overhead("tiny-llama", 4, 5, 3 if a.quick else 5)]
    runs.append(overhead("smollm2-135m", 2 if a.quick else 4, 2 if a.quick else 5, 2 if a.quick else 3))
    for r in runs:
        print(f"  {r['model']}: {r['clients']} clients x {r['local_steps']} steps: median overhead "
              f"{r['overhead_s_median']:.3f} s of a {r['round_s_median']:.2f} s round "
              f"(training {r['train_s_median']:.2f} s) -> fraction {r['overhead_fraction_median']:.4f}")
    results["overhead_runs"] = runs
    print(f"peak RSS with 1 -> {counts[-1]} clients in one round (fresh process each)")
    mem = [memory("tiny-llama", counts), memory("smollm2-135m", counts)]
    for m in mem:
        print(f"  {m['model']}: {m['mb_per_extra_client']:.2f} MB per extra client")
    results["memory_runs"] = mem
    sm = next(r for r in runs if r["model"] == "smollm2-135m")
    results["loop_overhead_fraction"] = sm["overhead_fraction_median"]
    results["mem_mb_per_extra_client"] = max(m["mb_per_extra_client"] for m in mem)
    results["targets"] = {"loop_overhead_fraction": 0.05, "mem_mb_per_extra_client": 50.0}
    print(json.dumps({k: results[k] for k in ("loop_overhead_fraction", "mem_mb_per_extra_client")}))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
