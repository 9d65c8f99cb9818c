"""DP-SGD overhead on SmolLM2-135M, and federated DP-LoRA utility on Rotten Tomatoes.

Usage: ``python benchmarks/dp.py [--quick] [--json PATH] [--part overhead|utility|all]
[--utility-model minilm-l6|smollm2-135m] [--jobs N] [--threads N]``

(a) Overhead (issue 5): one DP-LoRA step against one non-private LoRA step on
    the real ``smollm2-135m`` (LoRA r = 8 on q_proj, v_proj; batch 8 x 64
    tokens of Rotten Tomatoes text), median of 6 steps after warm-up, for
    every grad-sample mode (hooks, functorch, ghost), DP noise from the CSPRNG.
    Times: all configurations in ONE process, interleaved in two blocks with a
    rotating order, so that load from other processes on this shared machine
    hits every configuration alike and the ratios against the non-private
    baseline (measured in the same run) stay meaningful. Memory: each
    configuration in a fresh subprocess (peak RSS is a per-process high-water
    mark). JSON: ``dp_step_time_ratio`` and ``dp_peak_mem_ratio`` of the
    fastest mode, ``mode``, and every mode's figures. Targets: time <= 1.25,
    memory <= 1.3. ``secure_noise``: the time to draw one step's noise from
    the CSPRNG vs torch's generator for this adapter, and a hooks step with each.

(b) Utility: federated DP-LoRA through the real loop (``run_experiment``):
    4 iid clients, all in every round, unweighted FedAvg, DP-SGD in every
    client, Rotten Tomatoes sentiment, at sample-level epsilon in {1, 3, 8,
    inf} with delta = 1e-5, identical hyperparameters across epsilons. The
    noise is calibrated (PLD) so that the worst client reaches the target over
    the run; the reported epsilon is what each run's privacy ledger says was
    spent (the runs, with their ledgers and privacy reports, stay under
    ``--runs-dir``). Default model ``smollm2-135m`` (the default experiment's
    verbalized task); ``--utility-model minilm-l6`` (LoRA + classification
    head) is ~10x faster per step. ``--jobs 2`` runs the epsilons in two
    processes side by side. JSON: ``utility``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m"
MODES = ("hooks", "functorch", "ghost")
# Published anchors (performance-limits.md §1.3, §1.4; environment-and-assets.md §2.2).
ANCHORS = {
    "opacus_hooks_overhead_here": "DP-LoRA step 1.7-2.6 s vs 1.48 s non-private on SmolLM2-135M (ratio ~1.15-1.75)",
    "yu_2022": "RoBERTa-Large MNLI 87.8% at eps 6.7 (non-private 90.2%), Yu et al. ICLR 2022",
    "dp_transformers_qlora": "Mistral-7B QLoRA SST-2 96.44% at eps 8 vs 97.25% non-DP (microsoft/dp-transformers)",
    "minilm_dp_here": "MiniLM-L6 + LoRA, Rotten Tomatoes, eps 1.24: 0.580 acc (non-DP 0.769), untuned",
}


def _quiet() -> None:
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def _lora_model(name: str = MODEL) -> tuple[Any, Any, Any, Any]:
    """LoRA r = 8 on the attention query/value projections (plus the new head for the encoder)."""
    from securefed.assets.models import load_model
    from securefed.peft.registry import PEFT_METHODS, AdapterOptions

    method = PEFT_METHODS.get("lora")
    if name == "minilm-l6":
        loaded = load_model(name, task="seq-cls", num_labels=2)
        opts = AdapterOptions(r=8, alpha=16.0, target_modules=("query", "value"))
        model = method.apply(loaded.model, opts, task="seq-cls")
    else:
        loaded = load_model(name)
        opts = AdapterOptions(r=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
        model = method.apply(loaded.model, opts, task="causal-lm")
    return model, loaded.tokenizer, method, method.spec(model)


# -- (a) overhead -------------------------------------------------------------------------------


def _overhead_setup(batch: int, seq: int) -> tuple[Any, Any, Any, Any]:
    import torch

    from securefed.assets.data import load_dataset

    model, tok, _, adapter = _lora_model()
    model.train()
    ids_all: list[int] = []
    for e in load_dataset("rotten-tomatoes").train[:400]:
        ids_all += tok.encode(e.text + "\n", add_special_tokens=False)
    ids = torch.tensor(ids_all[: batch * seq]).reshape(batch, seq)

    def per_example_loss(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = m(input_ids=x).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1)

    return model, adapter, ids, per_example_loss


def _timed_block(model: Any, opt: Any, ids: Any, loss_fn: Any, mode: str, noise: Any, batch: int,
                 warm: int, timed: int) -> list[float]:
    """``warm`` untimed then ``timed`` timed optimizer steps under one Opacus wrapping (as a
    client does within a round; wrapping and Opacus's lazy per-layer set-up stay untimed)."""
    from securefed.privacy.dp_sgd import Mode, dp_backward, private_module

    out: list[float] = []
    if mode == "none":
        for i in range(warm + timed):
            t0 = time.perf_counter()
            loss_fn(model, ids).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warm:
                out.append(time.perf_counter() - t0)
        return out
    m = cast(Mode, mode)
    with private_module(model, opt, mode=m, clip=1.0, noise_multiplier=1.0, expected_batch_size=batch,
                        noise=noise) as (module, dp_opt):
        for i in range(warm + timed):
            t0 = time.perf_counter()
            dp_backward(module, dp_opt, loss_fn(module, ids), m)
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
            if i >= warm:
                out.append(time.perf_counter() - t0)
    return out


def _timing_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """All configurations in one process, interleaved in blocks (order rotated every block), so
    that load from other processes hits them alike and the ratios hold."""
    import torch

    from securefed.privacy.secure_noise import FastNoise, SecureNoise

    _quiet()
    batch, seq = spec["batch"], spec["seq"]
    model, adapter, ids, loss_fn = _overhead_setup(batch, seq)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    configs = [("none", None), *[(m, SecureNoise()) for m in MODES], ("hooks-torch-noise", FastNoise())]
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    per_block = -(-spec["steps"] // spec["blocks"])
    for blk in range(spec["blocks"]):
        k = blk % len(configs)
        for name, noise in configs[k:] + configs[:k]:
            mode = "hooks" if name == "hooks-torch-noise" else name
            times[name] += _timed_block(model, opt, ids, loss_fn, mode, noise, batch, spec["warmup"], per_block)
    out: dict[str, Any] = {"times": times, "medians": {k: statistics.median(v) for k, v in times.items()},
                           "adapter_dim": adapter.dim}
    n = adapter.dim
    for name, src in (("secure", SecureNoise()), ("torch", FastNoise())):
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            src.gaussian((n,), 1.0)
            ts.append(time.perf_counter() - t0)
        out[f"noise_{name}_s"] = statistics.median(ts)
    return out


def _memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of one configuration in a fresh process (ru_maxrss is a per-process high-water mark)."""
    import torch

    from securefed.privacy.secure_noise import SecureNoise

    _quiet()
    batch, seq, mode = spec["batch"], spec["seq"], spec["mode"]
    model, _, ids, loss_fn = _overhead_setup(batch, seq)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _timed_block(model, opt, ids, loss_fn, mode, SecureNoise(), batch, 0, spec["steps"])
    return {"mode": mode, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mb": loaded}


def _run_worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", kind, json.dumps(spec)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], **spec}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def overhead(quick: bool) -> dict[str, Any]:
    base = {"warmup": 1, "steps": 6, "blocks": 2, "batch": 8, "seq": 64}
    timing = _run_worker("timing", base)
    if "error" in timing:
        raise SystemExit(f"timing worker failed: {timing['error']}")
    mem = {m: _run_worker("memory", {**base, "steps": 2, "mode": m}) for m in ("none", *MODES)}
    med = timing["medians"]
    ref_mem = mem["none"]
    modes: dict[str, Any] = {}
    for m in MODES:
        r = mem[m]
        modes[m] = {
            "median_step_s": med[m],
            "step_time_ratio": med[m] / med["none"],
            "peak_rss_mb": r.get("peak_rss_mb"),
            "peak_mem_ratio": r["peak_rss_mb"] / ref_mem["peak_rss_mb"] if "error" not in r else None,
            "step_mem_ratio": ((r["peak_rss_mb"] - r["rss_after_load_mb"])
                               / max(ref_mem["peak_rss_mb"] - ref_mem["rss_after_load_mb"], 1e-9))
            if "error" not in r else None,
        }
    best = min(modes, key=lambda m: modes[m]["step_time_ratio"])
    return {
        "model": MODEL,
        "lora": "r=8, alpha=16, q_proj+v_proj",
        "batch": f"{base['batch']} x {base['seq']} tokens",
        "steps_timed": len(timing["times"]["none"]),
        "method": "time: one process, configurations interleaved in 2 blocks (1 untimed warm-up step per block); "
                  "memory: one fresh process per configuration",
        "baseline_median_step_s": med["none"],
        "baseline_peak_rss_mb": ref_mem.get("peak_rss_mb"),
        "modes": modes,
        "mode": best,
        "dp_step_time_ratio": modes[best]["step_time_ratio"],
        "dp_peak_mem_ratio": modes[best]["peak_mem_ratio"],
        "targets": {"dp_step_time_ratio": 1.25, "dp_peak_mem_ratio": 1.3},
        "secure_noise": {
            "adapter_dim": timing["adapter_dim"],
            "noise_secure_s": timing["noise_secure_s"],
            "noise_torch_s": timing["noise_torch_s"],
            "hooks_step_secure_s": med["hooks"],
            "hooks_step_torch_noise_s": med["hooks-torch-noise"],
        },
        "raw_times": timing["times"],
    }


# -- (b) utility --------------------------------------------------------------------------------


def _utility_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Each epsilon is one real federated run (``securefed.fl.runner.run_experiment``)."""
    from securefed.config import load_config
    from securefed.fl.runner import run_experiment

    _quiet()
    n, per_client, rounds = spec["clients"], spec["per_client"], spec["rounds"]
    task = "seq-cls" if spec["model"] == "minilm-l6" else "verbalized"
    base = [
        f'model.name="{spec["model"]}"', f'data.task="{task}"', "data.max_length=64",
        f"data.train_examples={n * per_client}", 'partition.scheme="iid"', f"partition.clients={n}",
        'sampling.mode="fixed"', "sampling.clients_per_round=0", f"train.rounds={rounds}",
        f"train.local_steps={spec['local_steps']}", f"train.batch_size={spec['batch']}", f"train.lr={spec['lr']}",
        'train.optimizer="adamw"', "server.weighted=false", f"eval.max_examples={spec['test']}",
        f"eval.every={rounds}", 'dp.accountant="pld"', "dp.delta=1e-5", "run.overwrite=true",
        f"run.threads={spec['threads']}", f"run.seed={spec.get('seed', 0)}",
    ]
    if spec["model"] == "minilm-l6":  # BERT names its attention projections query/key/value
        base.append('peft.target_modules=["query", "value"]')
    rows: list[dict[str, Any]] = []
    zero_shot: float | None = None
    for i, eps in enumerate(spec["epsilons"]):
        label = "inf" if eps is None else f"{eps:g}"
        before = i == 0 and spec.get("zero_shot", True)
        ov = [*base, f'run.name="eps-{label}"', f"eval.before={'true' if before else 'false'}"]
        if eps is not None:
            ov += ["dp.sample.enabled=true", f"dp.sample.target_epsilon={eps}", f"dp.sample.clip={spec['clip']}",
                   f'dp.sample.mode="{spec["mode"]}"']
        summary = run_experiment(load_config(overrides=ov), Path(spec["runs_dir"]) / f"eps-{label}")
        if before and summary["baseline_eval"]:
            zero_shot = summary["baseline_eval"]["accuracy"]
        priv = summary.get("privacy") or {}
        spent = (priv.get("spent") or {}).get("sample_epsilon")
        rows.append({
            "target_epsilon": label,
            "epsilon_spent_max_client": spent if eps is not None else "inf",
            "delta": 1e-5,
            "noise_multiplier": (priv.get("resolved") or {}).get("noise_sample"),
            "accuracy": summary["final_eval"]["accuracy"],
            "train_seconds": summary["time_seconds"]["train"],
            "seconds": summary["time_seconds"]["total"],
            "run_dir": str(Path(spec["runs_dir"]) / f"eps-{label}"),
        })
        print(f"    eps {label}: accuracy {rows[-1]['accuracy']:.3f}, spent {spent}, "
              f"{rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    return {"zero_shot_accuracy": zero_shot, "rows": rows}


UTILITY_SETUPS: dict[str, dict[str, Any]] = {
    # The causal LM with a verbalizer (the default experiment's task; zero-shot is already above chance).
    "smollm2-135m": {"per_client": 250, "rounds": 3, "local_steps": 10, "batch": 8, "lr": 1e-3, "test": 600},
    # Encoder with a new classification head (trained with the adapter): ~10x faster per step.
    "minilm-l6": {"per_client": 1000, "rounds": 3, "local_steps": 8, "batch": 32, "lr": 5e-3, "test": 500},
}
QUICK = {"per_client": 100, "rounds": 1, "local_steps": 2, "batch": 8, "test": 48}


def utility(quick: bool, mode: str, model: str, runs_dir: Path, threads: int, jobs: int = 1,
            seed: int = 0) -> dict[str, Any]:
    """One run per epsilon; ``jobs`` worker processes share them out (each with ``threads`` threads:
    on 2 cores, two 1-thread runs side by side beat one 2-thread run)."""
    from concurrent.futures import ThreadPoolExecutor

    spec: dict[str, Any] = {"model": model, "clients": 4, "clip": 1.0, "mode": mode, **UTILITY_SETUPS[model],
                            "runs_dir": str(runs_dir), "threads": threads, "seed": seed}
    if quick:
        spec.update(QUICK)
    epsilons: list[float | None] = [1.0, 3.0, 8.0, None]
    jobs = max(1, min(jobs, len(epsilons)))
    groups = [epsilons[j::jobs] for j in range(jobs)]
    specs = [{**spec, "epsilons": g, "zero_shot": j == 0} for j, g in enumerate(groups)]
    with ThreadPoolExecutor(len(specs)) as pool:
        outs = list(pool.map(lambda sp: _run_worker("utility", sp), specs))
    failed = [o for o in outs if "error" in o]
    if failed:
        return {"error": failed[0]["error"][-2000:], "setup": spec}
    by_label = {row["target_epsilon"]: row for o in outs for row in o["rows"]}
    out = {"zero_shot_accuracy": outs[0]["zero_shot_accuracy"],
           "rows": [by_label["inf" if e is None else f"{e:g}"] for e in epsilons]}
    task = ("seq-cls head on the encoder" if model == "minilm-l6" else "verbalized prompt, label-word likelihood")
    return {
        "model": model,
        "task": f"Rotten Tomatoes fresh/rotten sentiment ({task}), accuracy on held-out test examples",
        "setup": {k: v for k, v in spec.items() if k != "epsilons"},
        "loop": "securefed's federated loop (run_experiment): 4 iid clients, all in every round, unweighted FedAvg; "
                "DP-SGD in every client; every epsilon read from the run's privacy ledger",
        "accountant": "pld, delta 1e-5, noise calibrated for the worst client joining every round",
        "zero_shot_accuracy": out["zero_shot_accuracy"],
        "table": out["rows"],
        "anchors": ANCHORS,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer warm-up steps and a much smaller utility run")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--part", choices=("overhead", "utility", "all"), default="all")
    ap.add_argument("--utility-model", choices=sorted(UTILITY_SETUPS), default="smollm2-135m",
                    help="model of the utility runs (default smollm2-135m; minilm-l6 is ~10x faster per step)")
    ap.add_argument("--runs-dir", type=Path, default=Path("bench-results/dp-utility-runs"),
                    help="where the utility runs (with their ledgers and privacy reports) are written")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the utility runs (1: on a shared 2-core machine, 2 threads under load ran 8x slower)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="utility runs side by side, one process each (2 on a 2-core machine with --threads 1)")
    ap.add_argument("--seed", type=int, default=0,
                    help="utility runs' run.seed (data split, partition, batches, adapter init; DP noise is CSPRNG)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        fn = {"timing": _timing_worker, "memory": _memory_worker, "utility": _utility_worker}[kind]
        print(json.dumps(fn(spec)))
        return
    t0 = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "dp", "quick": args.quick}
    best = "hooks"
    if args.part in ("overhead", "all"):
        ov = overhead(args.quick)
        result.update({k: ov[k] for k in ("dp_step_time_ratio", "dp_peak_mem_ratio", "mode")})
        result["overhead"] = ov
        best = ov["mode"] or best
        print(f"(a) baseline LoRA step {ov['baseline_median_step_s']:.3f} s (median of {ov['steps_timed']})")
        for m, v in ov["modes"].items():
            if v["peak_mem_ratio"] is None:
                print(f"    {m:9s} {v['median_step_s']:.3f} s  time x{v['step_time_ratio']:.3f}  memory run FAILED")
            else:
                print(f"    {m:9s} {v['median_step_s']:.3f} s  time x{v['step_time_ratio']:.3f}  "
                      f"peak RSS x{v['peak_mem_ratio']:.3f} (step memory x{v['step_mem_ratio']:.2f})")
        print(f"    best mode {ov['mode']}: time ratio {ov['dp_step_time_ratio']:.3f} (target <= 1.25), "
              f"peak memory ratio {ov['dp_peak_mem_ratio']:.3f} (target <= 1.3)")
        sn = ov["secure_noise"]
        print(f"    noise for {sn['adapter_dim']} values: CSPRNG {sn['noise_secure_s'] * 1e3:.1f} ms, "
              f"torch {sn['noise_torch_s'] * 1e3:.1f} ms")
    if args.part in ("utility", "all"):
        ut = utility(args.quick, best, args.utility_model, args.runs_dir, args.threads, args.jobs, args.seed)
        result["utility"] = ut
        if "error" in ut:
            print("(b) utility FAILED:", ut["error"][-500:])
        else:
            print(f"(b) {ut['model']}: accuracy before training {ut['zero_shot_accuracy']}")
            for row in ut["table"]:
                e = row["epsilon_spent_max_client"]
                print(f"    target eps {row['target_epsilon']!s:>4}: spent {e if isinstance(e, str) else (f'{e:.3f}' if e is not None else '-')}, "
                      f"sigma {row['noise_multiplier'] if row['noise_multiplier'] is None else round(row['noise_multiplier'], 3)}, "
                      f"accuracy {row['accuracy']:.3f}  ({row['seconds']:.0f} s)")
    result["seconds"] = time.perf_counter() - t0
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)) + "\n")
    print(f"total {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
