"""Attack matrix: what a curious server recovers, by batch size, update kind, aggregation and DP noise.

Headline (issue 6): DAGER on full-model FedSGD gradients of smollm2-135m over
Rotten Tomatoes reviews, B in {1, 2, 4, 8, 16}: ROUGE-1, exact-match rate and
seconds per batch against the targets (ROUGE-1 >= 0.99, exact >= 0.95, <= 60 s).

Matrix: B in {1, 2, 4, 8, 16, 32} x {full gradient, LoRA r=8, LoRA r=64}
x {one client, sum of 4, sum of 16 clients} x {no noise, DP-SGD at epsilon 8, 1}.

How each cell's view is made (attacks/simulate.py): the clients train the
loop's default task (verbalized Rotten Tomatoes, "Review: {text}\\nSentiment:"
+ label word, max_length 64) from the same global model; each uploads its
FedSGD update (-lr x gradient, float32); the updates go through a registered
aggregator with the in-process transport; DAGER gets the resulting
ServerView. "full" views carry the first two decoder layers of the full
gradient (the tensors DAGER reads; the other 28 layers would only add
information). LoRA: r and alpha = 2r on q_proj and v_proj, with B drawn
N(0, 0.02^2) to stand for a global adapter after some rounds (at B = 0 the
A-gradients vanish). DP: one DP-SGD step, per-example clipping (L2 over every
trainable tensor) and Gaussian noise from a CSPRNG, sigma calibrated with RDP
for the stated sampling rate and step count. The per-example gradients come
from one batched pass per chunk of 4 examples
(attacks/simulate.py:fast_clipped_gradient_sum, tested against the
per-example loop; ``--dp-loop`` uses the loop); each client's clipped sum is
computed once and reused for both epsilon levels and every client count.
Cells whose batch is far beyond what the span tests can separate (more than
64 sentences in the sum), or that would exceed the time budget, are listed as
skipped with the reason.

A second table measures the same DAGER on *weight-delta* uploads
(theta_after - theta_before in float32, as the federated loop sends), where
float32 rounding of the weights acts like noise.

Usage: python benchmarks/attacks.py [--quick] [--json PATH] [--png PATH]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from securefed.assets.data import Example, load_dataset
from securefed.assets.models import load_model
from securefed.attacks import ATTACKS, PublicKnowledge, ServerView, score_texts
from securefed.attacks.simulate import (
    clipped_gradient_sum,
    dp_noised_update,
    fast_clipped_gradient_sum,
    fedsgd_update,
    full_spec,
    lora_model,
    observe,
    sgd_update,
)
from securefed.attacks.text import strip_template
from securefed.privacy.calibrate import calibrate_noise_multiplier
from securefed.protocols import AGGREGATORS
from securefed.tasks import TEMPLATES, make_task

LR = 1e-2
DELTA = 1e-5
CLIENT_EXAMPLES = 500  # examples per client: DP sampling rate q = B / 500
DP_STEPS = 100  # local DP-SGD steps the budget is spread over
CLIP = 1.0
DP_CHUNK = 4  # examples per batched pass for the per-example gradients (fastest measured on 1 thread)
TARGETS = {"rouge1_min": 0.99, "exact_min": 0.95, "seconds_max": 60.0}


@dataclass
class Kind:
    name: str
    model: torch.nn.Module
    spec: Any
    params: dict[str, torch.nn.Parameter]
    public_extra: dict[str, Any]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        lm = load_model(args.model)
        self.tok = lm.tokenizer
        self.pristine = lm.model.eval()
        for p in self.pristine.parameters():
            p.requires_grad_(False)
        self.task = make_task("verbalized", self.tok, dataset="rotten-tomatoes", max_length=64)
        self.template = TEMPLATES["rotten-tomatoes"]
        train = load_dataset("rotten-tomatoes", seed=0).train
        # Test inputs only (not a secret): which reviews the simulated clients hold.
        order = np.random.default_rng(args.seed).permutation(len(train))
        self.pool: list[Example] = [train[int(i)] for i in order]
        self.cursor = 0
        self.batches: dict[tuple[str, int, int], list[Example]] = {}
        self.kinds: dict[str, Kind] = {}
        self.updates: dict[tuple[str, str, int, int], np.ndarray] = {}
        self.sums: dict[tuple[str, str, int, int], np.ndarray] = {}
        self.sum_stats: dict[tuple[str, str, int, int], dict[str, float]] = {}
        self.dp_seconds = 0.0  # time spent on per-example gradients
        self.dp_examples = 0
        self.aggregator = "secagg" if "secagg" in AGGREGATORS.names() else "plaintext"
        # A fixed-point grid fine enough for FedSGD updates (entries ~1e-7..1e-2): per-entry clip
        # 0.05, 40 fractional bits in Z_{2^64}. The protocol's default 16 bits would round most
        # entries of a -lr x gradient upload to zero and measure quantization, not aggregation.
        self.agg_options: dict[str, Any] = (
            {"clip": 0.05, "scale_bits": 40, "modulus_bits": 64} if self.aggregator == "secagg" else {}
        )

    # -- data ------------------------------------------------------------------------------------
    def batch(self, set_name: str, b: int, client: int) -> list[Example]:
        key = (set_name, b, client)
        if key not in self.batches:
            self.batches[key] = self.pool[self.cursor : self.cursor + b]
            self.cursor += b
            if self.cursor > len(self.pool):
                raise RuntimeError("ran out of distinct reviews")
        return self.batches[key]

    def references(self, examples: Sequence[Example]) -> list[str]:
        out = []
        for e in examples:
            bt = self.task.batch([e])
            ids = bt.input_ids[0][bt.attention_mask[0].bool()].tolist()
            # The label word is the last input: the span tests cannot see it (no gradient).
            out.append(strip_template(self.tok.decode(ids, skip_special_tokens=True), self.template))
        return out

    def loss(self, examples: Sequence[Example]) -> Callable[[torch.nn.Module], torch.Tensor]:
        bt = self.task.batch(list(examples))
        return lambda model: self.task.per_example_loss(model, bt).mean()

    # -- update kinds ------------------------------------------------------------------------------
    def kind(self, name: str) -> Kind:
        if name in self.kinds:
            return self.kinds[name]
        if name == "full":
            model = copy.deepcopy(self.pristine)
            spec, params = full_spec(model, layers=2)
            for n, p in model.named_parameters():
                p.requires_grad_(n in params)
            extra: dict[str, Any] = {"peft_method": "full"}
        else:
            r = int(name.split("r")[-1])
            model, spec, params = lora_model(copy.deepcopy(self.pristine), r=r, alpha=2 * r, b_std=0.02, seed=1)
            extra = {"peft_method": "lora", "peft_config": {"r": r, "alpha": 2 * r, "target_modules": ("q_proj", "v_proj")}}
        k = Kind(name, model, spec, params, extra)
        self.kinds[name] = k
        return k

    def public(self, kind: Kind, b: int, *, lr: float = LR) -> PublicKnowledge:
        glob = kind.spec.flatten({n: p.detach() for n, p in kind.params.items()})
        return PublicKnowledge(
            model_name=self.args.model, spec=kind.spec, global_vector=glob, round_index=0, learning_rate=lr,
            local_steps=1, local_optimizer="sgd", batch_size=b, max_length=64, text_template=self.template,
            **kind.public_extra,
        )

    def update(self, kind_name: str, noise: str, b: int, client: int, sigma: float | None) -> np.ndarray:
        key = (kind_name, noise, b, client)
        if key in self.updates:
            return self.updates[key]
        kind = self.kind(kind_name)
        ex = self.batch("matrix", b, client)
        if sigma is None:
            vec = fedsgd_update(kind.spec, kind.params, kind.model, self.loss(ex), lr=LR)
        else:
            # One clipped sum per (kind, B, client): the client's batch is the same at every
            # epsilon and in every sum it joins (clients 0..N-1), so only the noise is redrawn.
            skey = self.sum_key(kind_name, b, client)
            if skey not in self.sums:
                self.sums[skey], self.sum_stats[skey] = self.clipped_sum(kind, ex)
            vec = dp_noised_update(self.sums[skey], len(ex), lr=LR, clip=CLIP, noise_multiplier=sigma)
        self.updates[key] = vec
        return vec

    @staticmethod
    def sum_key(kind_name: str, b: int, client: int) -> tuple[str, str, int, int]:
        return (kind_name, "clipped-sum", b, client)

    def clipped_sum(self, kind: Kind, ex: Sequence[Example]) -> tuple[np.ndarray, dict[str, float]]:
        """Sum of the per-example gradients clipped to CLIP (L2 over every trainable tensor).

        Full fine-tuning trains, and so clips over, every weight of the model: all of them
        require grad here, although the view keeps only the first two layers' tensors of
        the clipped sum (exact: each example's factor min(1, C/||g||) uses the whole norm).
        """
        t = time.perf_counter()
        saved = {n: p.requires_grad for n, p in kind.model.named_parameters()}
        if kind.name == "full":
            for p in kind.model.parameters():
                p.requires_grad_(True)
        try:
            if self.args.dp_loop:
                out = clipped_gradient_sum(kind.model, kind.spec, kind.params, [self.loss([e]) for e in ex], clip=CLIP)
            else:
                # Chunks of similar length pad little; the sum does not depend on the order.
                by_len = sorted(ex, key=lambda e: int(self.task.batch([e]).input_ids.shape[1]))
                chunks = [self.task.batch(by_len[i : i + DP_CHUNK]) for i in range(0, len(by_len), DP_CHUNK)]
                out = fast_clipped_gradient_sum(
                    kind.model, kind.spec, kind.params,
                    [lambda model, bt=bt: self.task.per_example_loss(model, bt) for bt in chunks], clip=CLIP,
                )
        finally:
            for n, p in kind.model.named_parameters():
                p.requires_grad_(saved[n])
        self.dp_seconds += time.perf_counter() - t
        self.dp_examples += len(ex)
        return out

    def forget(self, kind_name: str, b: int) -> None:
        """Drop the cached updates and clipped sums of one (kind, B) once its cells are done."""
        for cache in (self.updates, self.sums):
            for key in [k for k in cache if k[0] == kind_name and k[2] == b]:
                del cache[key]

    # -- attack ------------------------------------------------------------------------------------
    def attack(self, view: ServerView, refs: list[str], targets: str) -> dict[str, Any]:
        t = time.perf_counter()
        res = ATTACKS.create("dager").run(view, loader=lambda public: (self.pristine, self.tok), targets=targets)
        seconds = time.perf_counter() - t
        rec = res.reconstructions[0]
        sc = score_texts(rec.texts, refs, tokenize=lambda s: self.tok.encode(s, add_special_tokens=False))
        return sc.to_dict() | {
            "status": rec.status, "seconds": seconds, "notes": list(rec.notes)[:4],
            "diagnostics": dict(rec.diagnostics),
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def sigmas(batch_sizes: Sequence[int], eps_levels: Sequence[float]) -> dict[tuple[float, int], float]:
    out = {}
    for eps in eps_levels:
        for b in batch_sizes:
            out[(eps, b)] = calibrate_noise_multiplier(
                eps, DELTA, sampling_probability=b / CLIENT_EXAMPLES, steps=DP_STEPS, accountant="rdp"
            )
    return out


def headline(bench: Bench, batch_sizes: Sequence[int], n_batches: int) -> dict[str, Any]:
    kind = bench.kind("full")
    rows: dict[int, list[dict[str, Any]]] = {}
    for b in batch_sizes:
        for j in range(n_batches):
            ex = bench.batch("matrix", b, 0) if j == 0 else bench.batch(f"headline{j}", b, 0)
            vec = fedsgd_update(kind.spec, kind.params, kind.model, bench.loss(ex), lr=LR)
            if j == 0:
                bench.updates[("full", "none", b, 0)] = vec
            view = ServerView.from_observation(observe({0: vec}), bench.public(kind, b))
            r = bench.attack(view, bench.references(ex), "clients")
            rows.setdefault(b, []).append(r)
            print(f"  headline B={b:2d} batch {j}: ROUGE-1 {r['rouge1']:.3f} exact {r['exact_match']:.3f} "
                  f"{r['seconds']:.1f} s [{r['status']}]", flush=True)
    return {
        "dager_rouge1_by_batch": {str(b): statistics.mean(x["rouge1"] for x in rs) for b, rs in rows.items()},
        "dager_rouge2_by_batch": {str(b): statistics.mean(x["rouge2"] for x in rs) for b, rs in rows.items()},
        "dager_exact_by_batch": {str(b): statistics.mean(x["exact_match"] for x in rs) for b, rs in rows.items()},
        "dager_token_accuracy_by_batch": {str(b): statistics.mean(x["token_accuracy"] for x in rs) for b, rs in rows.items()},
        "dager_seconds_per_batch": {str(b): statistics.median(x["seconds"] for x in rs) for b, rs in rows.items()},
        "dager_batches_per_size": n_batches,
        "headline_runs": {str(b): rs for b, rs in rows.items()},
    }


def weight_delta_rows(bench: Bench, batch_sizes: Sequence[int], lrs: Sequence[float]) -> list[dict[str, Any]]:
    """DAGER on theta_after - theta_before (float32 weights), what the federated loop uploads."""
    kind = bench.kind("full")
    out = []
    for lr in lrs:
        for b in batch_sizes:
            ex = bench.batch("matrix", b, 0)
            vec = sgd_update(kind.model, kind.spec, kind.params, [bench.loss(ex)], lr=lr)
            view = ServerView.from_observation(observe({0: vec}), bench.public(kind, b, lr=lr))
            r = bench.attack(view, bench.references(ex), "clients")
            out.append({"upload": "weight delta (float32)", "lr": lr, "batch": b} | r)
            print(f"  weight-delta lr={lr:g} B={b:2d}: ROUGE-1 {r['rouge1']:.3f} exact {r['exact_match']:.3f} [{r['status']}]", flush=True)
    return out


def matrix(bench: Bench, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    cells = []
    sig = sigmas(cfg["batches"], [e for e in cfg["noise"] if e is not None])
    # Grouped by (update kind, B): a group's cells share its clients' batches, updates and
    # clipped sums, which are dropped when the group is done (a full-model sum is 56 MB per
    # client). Within a group: one client, then the sums; no noise, then DP.
    order = sorted(((n, e) for n in cfg["clients"] for e in cfg["noise"]), key=lambda t: (t[0], t[1] is not None))
    for kind_name in cfg["kinds"]:
        for b in cfg["batches"]:
            for n_clients, noise in order:
                cells.append((noise, n_clients, kind_name, b))
    # Which reviews each (B, client) holds must not depend on the order the cells run in:
    # hand them out first, in a fixed order (clients 0 for every B, then 1..3, then 4..15).
    for n_clients in sorted(cfg["clients"]):
        for b in cfg["batches"]:
            if b * n_clients <= cfg["max_sentences"]:
                for c in range(n_clients):
                    bench.batch("matrix", b, c)
    results = []
    for i_cell, (noise, n_clients, kind_name, b) in enumerate(cells):
        if i_cell > 0 and cells[i_cell - 1][2:] != (kind_name, b):
            bench.forget(*cells[i_cell - 1][2:])
        label = "none" if noise is None else f"eps{noise:g}"
        cell: dict[str, Any] = {"batch": b, "update": kind_name, "clients": n_clients, "noise": label}
        if noise is not None:
            cell |= {"epsilon": noise, "delta": DELTA, "noise_multiplier": sig[(noise, b)], "clip": CLIP,
                     "sampling_rate": b / CLIENT_EXAMPLES, "dp_steps": DP_STEPS}
        sentences = b * n_clients
        if sentences > cfg["max_sentences"]:
            results.append(cell | {"skipped": f"{sentences} sentences (about {25 * sentences} token positions) is far beyond "
                                   "the 576-wide spans; measured cells with 32-64 sentences already recover nothing"})
            continue
        if noise is not None and (b > cfg["dp_max_batch"] or n_clients > cfg["dp_max_clients"]):
            results.append(cell | {"skipped": f"DP cells limited to B <= {cfg['dp_max_batch']} and at most "
                                   f"{cfg['dp_max_clients']} clients by this configuration"})
            continue
        if bench.elapsed() > cfg["budget"]:
            results.append(cell | {"skipped": f"time budget of {cfg['budget']:.0f} s reached"})
            continue
        sigma = None if noise is None else sig[(noise, b)]
        updates = {c: bench.update(kind_name, label, b, c, sigma) for c in range(n_clients)}
        refs = [t for c in range(n_clients) for t in bench.references(bench.batch("matrix", b, c))]
        kind = bench.kind(kind_name)
        public = bench.public(kind, b)
        if noise is not None:
            public = dataclasses.replace(public, dp_noise_multiplier=sigma, dp_clip=CLIP, dp_level="sample")
        agg = "plaintext" if n_clients == 1 else bench.aggregator
        opts = bench.agg_options if agg == bench.aggregator else {}
        view = ServerView.from_observation(observe(updates, aggregator=agg, options=opts), public)
        r = bench.attack(view, refs, "clients" if n_clients == 1 else "aggregate")
        cell |= {"aggregator": agg} | r
        if noise is not None:
            stats = [bench.sum_stats[bench.sum_key(kind_name, b, c)] for c in range(n_clients)]
            cell["clipped_fraction"] = statistics.mean(st["clipped_fraction"] for st in stats)
        results.append(cell)
        print(f"  {label:5s} N={n_clients:2d} {kind_name:6s} B={b:2d}: ROUGE-1 {r['rouge1']:.3f} exact {r['exact_match']:.3f} "
              f"{r['seconds']:.1f} s [{r['status']}]  (t={bench.elapsed():.0f} s)", flush=True)
    return results


def write_table(path: Path, out: dict[str, Any]) -> None:
    lines = ["# DAGER attack matrix (ROUGE-1 / exact match)", "",
             f"model {out['config']['model']}, aggregator for sums: {out['config']['aggregator']}", "",
             "| noise | clients | update | " + " | ".join(f"B={b}" for b in out["config"]["matrix_batches"]) + " |",
             "|---|---|---|" + "---|" * len(out["config"]["matrix_batches"])]
    keyed = {(c["noise"], c["clients"], c["update"], c["batch"]): c for c in out["matrix"]}
    combos = sorted({(c["noise"], c["clients"], c["update"]) for c in out["matrix"]}, key=lambda k: (k[0] != "none", k[0], k[1], k[2]))
    for noise, n, kind in combos:
        cells = []
        for b in out["config"]["matrix_batches"]:
            c = keyed.get((noise, n, kind, b))
            cells.append("skipped" if c is None or "skipped" in c else f"{c['rouge1']:.2f} / {c['exact_match']:.2f}")
        lines.append(f"| {noise} | {n} | {kind} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def heatmap(path: Path, out: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noises = sorted({c["noise"] for c in out["matrix"]}, key=lambda s: (s != "none", s))
    batches = out["config"]["matrix_batches"]
    rows = sorted({(c["clients"], c["update"]) for c in out["matrix"]})
    fig, axes = plt.subplots(1, len(noises), figsize=(4.2 * len(noises), 0.45 * len(rows) + 1.8), squeeze=False)
    keyed = {(c["noise"], c["clients"], c["update"], c["batch"]): c for c in out["matrix"]}
    for ax, noise in zip(axes[0], noises, strict=True):
        grid = np.full((len(rows), len(batches)), np.nan)
        for i, (n, kind) in enumerate(rows):
            for j, b in enumerate(batches):
                c = keyed.get((noise, n, kind, b))
                if c is not None and "skipped" not in c:
                    grid[i, j] = c["rouge1"]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(len(rows)):
            for j in range(len(batches)):
                skipped = np.isnan(grid[i, j])
                ax.text(j, i, "skip" if skipped else f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="0.55" if skipped else ("white" if grid[i, j] < 0.5 else "black"))
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_yticks(range(len(rows)), [f"{k}, N={n}" for n, k in rows])
        ax.set_xlabel("batch size per client")
        ax.set_title(f"DAGER ROUGE-1, noise: {noise}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few cells (minutes)")
    ap.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    ap.add_argument("--png", type=Path, default=None, help="heat map (default: next to the JSON)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=None, help="seconds after which matrix cells are skipped")
    ap.add_argument("--dp-loop", action="store_true",
                    help="per-example gradients by the plain loop (one backward each) instead of batched hooks")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine OpenMP contention made 2 threads 4x slower)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg: dict[str, Any]
    if args.quick:
        cfg = {"headline": [1, 4], "n_batches": 1, "batches": [1, 2], "kinds": ["full", "lora-r8"], "clients": [1, 4],
               "noise": [None, 8.0], "max_sentences": 64, "dp_max_batch": 2, "dp_max_clients": 4,
               "delta_lrs": [1e-2], "delta_batches": [1], "budget": args.budget or 900.0}
    else:
        cfg = {"headline": [1, 2, 4, 8, 16], "n_batches": 3, "batches": [1, 2, 4, 8, 16, 32],
               "kinds": ["full", "lora-r8", "lora-r64"], "clients": [1, 4, 16], "noise": [None, 8.0, 1.0],
               "max_sentences": 64, "dp_max_batch": 32, "dp_max_clients": 16,
               "delta_lrs": [1e-1, 1e-2], "delta_batches": [1, 4, 16], "budget": args.budget or 5400.0}
    bench = Bench(args)
    print(f"DAGER headline: full FedSGD gradient, {args.model}, rotten-tomatoes (verbalized), lr {LR}", flush=True)
    out: dict[str, Any] = {"targets": TARGETS}
    out |= headline(bench, cfg["headline"], cfg["n_batches"])
    print("weight-delta uploads (float32 weights):", flush=True)
    out["weight_delta"] = weight_delta_rows(bench, cfg["delta_batches"], cfg["delta_lrs"])
    print("attack matrix:", flush=True)
    out["matrix"] = matrix(bench, cfg)
    out["config"] = {
        "model": args.model, "dataset": "rotten-tomatoes", "task": "verbalized", "max_length": 64, "lr": LR,
        "upload": "FedSGD: -lr x gradient (float32)", "aggregator": bench.aggregator,
        "aggregator_options": bench.agg_options,
        "aggregator_note": "sums of several clients run through this registered aggregator; the attack reads only the sum",
        "headline_batches": cfg["headline"], "matrix_batches": cfg["batches"], "kinds": cfg["kinds"],
        "clients": cfg["clients"], "dp": {"delta": DELTA, "clip": CLIP, "client_examples": CLIENT_EXAMPLES,
                                           "steps": DP_STEPS, "accountant": "rdp",
                                           "max_batch": cfg["dp_max_batch"], "max_clients": cfg["dp_max_clients"],
                                           "per_example": "loop" if args.dp_loop else f"batched hooks, chunks of {DP_CHUNK}",
                                           "per_example_seconds": bench.dp_seconds, "per_example_count": bench.dp_examples},
        "max_sentences": cfg["max_sentences"], "budget_seconds": cfg["budget"],
        "full_view": "first two decoder layers of the full-model gradient",
        "lora": "r, alpha=2r, q_proj+v_proj, B ~ N(0, 0.02^2)", "quick": args.quick, "seed": args.seed,
        "torch_threads": torch.get_num_threads(), "wall_seconds": bench.elapsed(),
    }
    r1, ex, sec = out["dager_rouge1_by_batch"], out["dager_exact_by_batch"], out["dager_seconds_per_batch"]
    print("\nheadline vs targets (ROUGE-1 >= 0.99, exact >= 0.95, <= 60 s):")
    for b in r1:
        ok = r1[b] >= TARGETS["rouge1_min"] and ex[b] >= TARGETS["exact_min"] and sec[b] <= TARGETS["seconds_max"]
        print(f"  B={b:>2}: ROUGE-1 {r1[b]:.3f}  exact {ex[b]:.3f}  {sec[b]:.1f} s  {'meets' if ok else 'MISSES'} targets")
    base = {(c["update"], c["batch"]): c["rouge1"] for c in out["matrix"] if c.get("clients") == 1 and c["noise"] == "none" and "rouge1" in c}
    print("\nROUGE-1 relative to the undefended single-client cell of the same update kind and B:")
    for c in out["matrix"]:
        ref = base.get((c["update"], c["batch"]))
        if "rouge1" in c and ref and (c["clients"] > 1 or c["noise"] != "none"):
            print(f"  {c['noise']:5s} N={c['clients']:2d} {c['update']:8s} B={c['batch']:2d}: {c['rouge1'] / ref:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))
        write_table(args.json.with_suffix(".md"), out)
        heatmap(args.png or args.json.with_suffix(".png"), out)
        print(f"\nwrote {args.json}, {args.json.with_suffix('.md')}, {args.png or args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
