"""One federated experiment, end to end (server and clients in one process).

Per round, as data (docs/architecture.md):

1. sample clients (fixed m or Poisson q, seeded) and simulated dropouts;
2. each sampled client loads the global adapter into the shared base model,
   trains locally and returns ``delta`` (adapter tensors only);
3. the configured aggregator's parties exchange byte messages through the
   in-process transport; the server obtains ``sum w_i delta_i`` and ``sum w_i``;
4. the server optimizer moves the global adapter;
5. the round's metrics line is appended (and fsynced) to ``metrics.jsonl`` and
   the adapter checkpoint replaced atomically, so a run that fails midway
   keeps every finished round's outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from safetensors.numpy import save_file

from securefed.assets.data import DatasetSplits, Example, fingerprint, load_dataset
from securefed.assets.models import Task, load_model
from securefed.config import RunConfig, to_dict, to_toml
from securefed.errors import ConfigError, DataError, RunError
from securefed.fl.checkpoint import read_checkpoint, resumable_history, write_checkpoint
from securefed.fl.client import ClientUpdate, LocalTrainer
from securefed.fl.partition import Partition, partition
from securefed.fl.private import LoopPrivacy, spent_record
from securefed.fl.sampling import sample_clients, sample_dropouts
from securefed.fl.server_opt import ServerOptimizer, make_server_optimizer
from securefed.fl.transport import RoundOutcome, run_round
from securefed.peft.registry import PEFT_METHODS
from securefed.privacy.dp_sgd import DPSGDResult
from securefed.privacy.errors import BudgetExceededError
from securefed.protocols import AGGREGATORS, AggregateResult, Aggregator, ClientInput
from securefed.protocols.errors import RoundAbortedError
from securefed.tasks import Task as TrainTask
from securefed.tasks import make_task

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Progress:
    """Callbacks for progress display (the CLI wires tqdm bars to these)."""

    on_round: Callable[[int, int], None] = lambda r, n: None
    on_client: Callable[[int, int, int], None] = lambda r, i, n: None
    on_step: Callable[[int], None] = lambda k: None
    on_message: Callable[[str], None] = lambda s: None


@dataclass
class Experiment:
    """Everything a run holds in memory (built once; shared by all clients)."""

    cfg: RunConfig
    run_dir: Path
    model: torch.nn.Module
    task: TrainTask
    data: DatasetSplits
    train: tuple[Example, ...]
    eval_set: tuple[Example, ...]
    parts: Partition
    trainer: LocalTrainer
    aggregator: Aggregator
    server_opt: ServerOptimizer
    global_vector: np.ndarray
    privacy: LoopPrivacy | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def prepare_run_dir(cfg: RunConfig, run_dir: Path | None) -> Path:
    d = Path(run_dir) if run_dir else Path(cfg.run.output_dir) / cfg.run.name
    if d.exists() and any(d.iterdir()):
        if not cfg.run.overwrite:
            raise RunError(f"run directory {d} exists and is not empty: set run.overwrite=true or choose another run.name")
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    return d


def build_experiment(cfg: RunConfig, run_dir: Path, progress: Progress | None = None, *,
                     resume: bool = False) -> Experiment:
    prog = progress or Progress()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    data = load_dataset(cfg.data.name, seed=cfg.run.seed, test_fraction=cfg.data.test_fraction)
    if data.kind == "instruction" and cfg.data.task != "instruction":
        raise ConfigError(f"{cfg.data.name} is an instruction data set: set data.task = \"instruction\"", key="data.task")
    if data.kind == "classification" and cfg.data.task == "instruction":
        raise ConfigError(f"{cfg.data.name} is a classification data set", key="data.task")
    train = data.train[: cfg.data.train_examples] if cfg.data.train_examples else data.train
    model_task: Task = "seq-cls" if cfg.data.task == "seq-cls" else "causal-lm"
    prog.on_message(f"loading model {cfg.model.name}")
    loaded = load_model(cfg.model.name, task=model_task, num_labels=max(2, len(data.label_names)),
                        dtype=_DTYPES[cfg.model.dtype], seed=cfg.run.seed, cache=cfg.run.cache_dir)
    method = PEFT_METHODS.get(cfg.peft.method)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.run.seed)
        model = method.apply(loaded.model, cfg.peft.options(), task=model_task)
    model.eval()
    spec = method.spec(model)
    task = make_task(cfg.data.task, loaded.tokenizer, dataset=cfg.data.name, max_length=cfg.data.max_length,
                     template=cfg.data.template, label_words=cfg.data.label_words or None,
                     n_labels=len(data.label_names))
    parts = partition(train, cfg.partition.clients, cfg.partition.scheme, alpha=cfg.partition.alpha,
                      seed=cfg.run.seed, min_size=cfg.partition.min_size)
    trainer = LocalTrainer(model, method, spec, task, cfg.train, seed=cfg.run.seed, progress=prog.on_step)
    aggregator = AGGREGATORS.create(cfg.aggregation.name, **cfg.aggregation.options)
    eval_set = data.test[: cfg.eval.max_examples]
    privacy = None
    if cfg.dp.enabled:
        privacy = LoopPrivacy.open(cfg, run_dir, model=model, client_sizes=parts.sizes(),
                                   train_fingerprint=fingerprint(train), resume=resume)
    return Experiment(cfg, run_dir, model, task, data, train, eval_set, parts, trainer, aggregator,
                      make_server_optimizer(cfg.server), trainer.current_vector(), privacy)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(exp: Experiment, round_index: int) -> None:
    state = {k: v.numpy() for k, v in exp.trainer.spec.unflatten(exp.global_vector).items()}
    meta = {"round": str(round_index), "spec": exp.trainer.spec.to_json(), "model": exp.cfg.model.name}
    _atomic_write(exp.run_dir / "adapter.safetensors", lambda p: save_file(state, str(p), metadata=meta))


def evaluate(exp: Experiment) -> dict[str, float]:
    exp.trainer.load_global(exp.global_vector)
    return exp.task.evaluate(exp.model, exp.eval_set, exp.cfg.eval.batch_size)


def _announced_dp(exp: Experiment) -> dict[str, Any]:
    """The DP recipe is public (the server runs the accounting): the view says which noise the updates carry."""
    if exp.privacy is None or not exp.cfg.dp.sample.enabled:
        return {}
    # Client updates carry DP-SGD noise; user-level noise is added by the server after it saw the sum.
    return {"dp_noise_multiplier": exp.privacy.session.sample_noise_multiplier,
            "dp_clip": exp.cfg.dp.sample.clip, "dp_level": "sample"}


def record_view(exp: Experiment, r: int, g0: np.ndarray, outcome: RoundOutcome,
                updates: dict[int, ClientUpdate]) -> None:
    """Write what the server held this round (plus the experimenter's truth) under ``views/``.

    The ``ServerView`` is built only from the protocol's ``ServerObservation``
    and public knowledge; the texts each client trained on are stored apart as
    :class:`EvaluationTruth`, which attacks refuse and only metrics read.
    """
    from securefed.attacks import EvaluationTruth, PublicKnowledge, ServerView, save_views
    from securefed.fl.client import batch_order, local_steps

    cfg = exp.cfg
    used: dict[int, tuple[str, ...]] = {}
    for c in updates:
        ex = [exp.train[j] for j in exp.parts.indices[c]]
        steps = local_steps(len(ex), cfg.train)
        order = batch_order(len(ex), steps * cfg.train.grad_accum, cfg.train.batch_size, (cfg.run.seed, r, c))
        used[c] = tuple(ex[i].text for i in sorted({int(i) for b in order for i in b}))
    public = PublicKnowledge(
        model_name=cfg.model.name, spec=exp.trainer.spec, global_vector=g0, peft_method=cfg.peft.method,
        peft_config={"r": cfg.peft.r, "alpha": cfg.peft.alpha, "target_modules": tuple(cfg.peft.target_modules)},
        round_index=r, learning_rate=cfg.train.lr, local_steps=cfg.train.local_steps,
        local_optimizer=cfg.train.optimizer, batch_size=cfg.train.batch_size,
        task="seq-cls" if cfg.data.task == "seq-cls" else "causal-lm",
        num_labels=max(2, len(exp.data.label_names)), model_seed=cfg.run.seed,
        max_length=cfg.data.max_length, text_template=getattr(exp.task, "template", None),
        **_announced_dp(exp),
    )
    save_views(exp.run_dir / "views", [ServerView.from_observation(outcome.observation, public)],
               [EvaluationTruth(r, used)])


def run_one_round(exp: Experiment, r: int, progress: Progress) -> dict[str, Any]:
    """One round; under DP in the order of :mod:`securefed.fl.private` (plan, train, release, commit, apply).

    Raises:
        BudgetExceededError: the round would pass a privacy budget; nothing of it ran.
    """
    cfg = exp.cfg
    priv = exp.privacy
    t_round = time.perf_counter()
    dim = exp.trainer.spec.dim
    secret_sample = priv.sample_clients(exp.parts.n_clients) if priv else None
    clients = secret_sample if secret_sample is not None else sample_clients(
        exp.parts.n_clients, r, cfg.sampling, cfg.run.seed)
    dropouts = sample_dropouts(clients, cfg.dropout.rate, cfg.dropout.stage, r, cfg.run.seed)
    trained = [c for c in clients if dropouts.get(c) != "start"]
    ticket = priv.plan(r, trained) if priv else None
    updates: dict[int, ClientUpdate] = {}
    dp_runs: dict[int, DPSGDResult | None] = {}
    t_train = 0.0
    for i, c in enumerate(trained):
        progress.on_client(r, i, len(trained))
        ex = [exp.train[j] for j in exp.parts.indices[c]]
        if not ex:
            raise DataError(f"client {c} has an empty data set")
        t0 = time.perf_counter()
        if priv:
            updates[c], dp_runs[c] = priv.train(exp.trainer, c, r, exp.global_vector, ex)
        else:
            updates[c] = exp.trainer.train(c, r, exp.global_vector, ex)
        t_train += time.perf_counter() - t0
    record: dict[str, Any] = {"round": r, "sampled": list(clients), "dropped": {str(k): v for k, v in dropouts.items()}}
    t_agg0 = time.perf_counter()
    outcome: RoundOutcome | None = None
    if updates:
        inputs = {}
        for c, u in updates.items():
            exp.trainer.spec.check(u.delta)
            if priv:
                inputs[c] = priv.client_input(u, cfg.server.weighted)
            else:
                inputs[c] = ClientInput(u.delta, float(u.num_examples) if cfg.server.weighted else 1.0)
        try:
            outcome = run_round(exp.aggregator.new_round(r, inputs), exp.aggregator.stages,
                                {c: s for c, s in dropouts.items() if c in inputs})
        except RoundAbortedError as err:
            # Too few survivors: no aggregate (user-level DP still releases its noise). Config errors propagate.
            record["aborted"] = f"{type(err).__name__}: {err}"
    if not updates:
        record["aborted"] = "every sampled client dropped before training" if clients else "no client was sampled"
    t_agg = time.perf_counter() - t_agg0
    t_upd0 = time.perf_counter()
    g0 = exp.global_vector.copy()
    res: AggregateResult | None = outcome.result if outcome is not None else None
    if res is not None and (res.total.shape[0] != (priv.payload_dim(dim) if priv else dim)
                            or not np.isfinite(res.total).all()):
        raise RunError("aggregate has the wrong length or non-finite entries")
    avg: np.ndarray | None = None
    if priv and ticket is not None:
        # The ledger commit comes before the new model exists anywhere (docs/differential-privacy.md §9).
        rel = priv.release(ticket, res, dim, dp_runs)
        avg = rel.average  # user-level DP: the server's noised average, released every round
        record["privacy"] = spent_record(rel.spent) | {k: v for k, v in rel.info.items() if v is not None}
    if avg is None and res is not None:
        avg = res.total / max(res.total_weight, 1e-12)
    if avg is not None:
        exp.global_vector = exp.server_opt.step(exp.global_vector, avg)
        record["update_norm"] = float(np.linalg.norm(avg))
    if outcome is not None and res is not None:
        record.update(
            contributors=list(res.contributors),
            total_weight=res.total_weight,
            aggregation=dict(res.measurements),
            bytes_up={str(k): v for k, v in outcome.traffic.up.items()},
            # Each trained client first downloaded the global adapter (float32) from the server.
            bytes_down={str(k): v + 4 * dim * (k in updates) for k, v in outcome.traffic.down.items()},
            excluded={str(k): v for k, v in outcome.excluded.items()},
            train_loss=float(np.mean([updates[c].metrics["train_loss"] for c in res.contributors if c in updates])),
        )
    t_upd = time.perf_counter() - t_upd0
    if cfg.attack.record and outcome is not None:
        record_view(exp, r, g0, outcome, updates)
    save_adapter(exp, r)
    t_eval0 = time.perf_counter()
    last = r == cfg.train.rounds
    if last or r % cfg.eval.every == 0:
        record["eval"] = evaluate(exp)
    t_eval = time.perf_counter() - t_eval0
    wall = time.perf_counter() - t_round
    record["time"] = {"train": t_train, "aggregate": t_agg, "server_update": t_upd, "eval": t_eval, "round": wall,
                      "overhead": wall - t_train - t_eval}
    record["rss_mb"] = psutil.Process().memory_info().rss / 2**20
    return record


def open_resumed_run(cfg: RunConfig, run_dir: Path) -> Path:
    """Check that ``run_dir`` holds a run of exactly ``cfg`` (its own config.toml)."""
    d = Path(run_dir)
    saved = d / "config.toml"
    if not saved.exists():
        raise RunError(f"{d} holds no run to resume (no config.toml)")
    if saved.read_text(encoding="utf-8") != to_toml(cfg):
        raise RunError(f"the config differs from {saved}; a run resumes only with its own config "
                       "(securefed run --resume RUN_DIR reads it from there)")
    return d


def run_experiment(cfg: RunConfig, run_dir: Path | None = None, progress: Progress | None = None, *,
                   resume: bool = False) -> dict[str, Any]:
    """Run ``cfg``; write the outputs under ``run_dir``; return the summary.

    With ``resume=True``, continue the run in ``run_dir`` after its last
    checkpointed round (:mod:`securefed.fl.checkpoint`); a DP run reopens its
    privacy ledger, so spent budget carries over and an interrupted round stays charged.

    Raises:
        RunError: the run directory is not empty (new run) or not resumable.
    """
    prog = progress or Progress()
    t_start = time.perf_counter()
    if resume:
        if run_dir is None:
            raise RunError("resuming needs the run directory")
        d = open_resumed_run(cfg, run_dir)
    else:
        d = prepare_run_dir(cfg, run_dir)
        (d / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    exp = build_experiment(cfg, d, prog, resume=resume)
    spec_json = exp.trainer.spec.to_json()
    ck = read_checkpoint(d, spec_json) if resume else None
    if ck is not None:
        exp.global_vector = ck.global_vector
        exp.server_opt.load_state(ck.server_state)
    n_labels = len(exp.data.label_names)
    part_info = {
        "scheme": cfg.partition.scheme,
        "sizes": exp.parts.sizes(),
        "label_histograms": exp.parts.label_histograms(exp.train, n_labels) if n_labels else None,
        "label_names": list(exp.data.label_names),
    }
    (d / "partition.json").write_text(json.dumps(part_info, indent=1), encoding="utf-8")
    metrics_path = d / "metrics.jsonl"
    baseline: dict[str, float] | None = None
    first = 1
    if resume:
        first = (ck.round if ck is not None else 0) + 1
        baseline, exp.history = resumable_history(metrics_path, first - 1)
        prog.on_message(f"resuming after round {first - 1}")
    if cfg.eval.before and first == 1 and baseline is None:
        prog.on_message("evaluating the initial model")
        t0 = time.perf_counter()
        baseline = evaluate(exp)
        _append_jsonl(metrics_path, {"round": 0, "eval": baseline, "time": {"eval": time.perf_counter() - t0}})
    stopped: dict[str, Any] | None = None
    try:
        for r in range(first, cfg.train.rounds + 1):
            prog.on_round(r, cfg.train.rounds)
            try:
                record = run_one_round(exp, r, prog)
            except BudgetExceededError as err:
                # Refused before any client trained or any noise was drawn: end the run here, keeping
                # the model of the last committed round (already written).
                stopped = {"round": r, "reason": "privacy budget", "level": err.level,
                           "projected_epsilon": err.projected, "budget": err.budget, "message": str(err)}
                prog.on_message(f"round {r} refused: {err}")
                _append_jsonl(metrics_path, {"round": r, "stopped": stopped})
                break
            exp.history.append(record)
            _append_jsonl(metrics_path, record)
            write_checkpoint(d, r, exp.global_vector, exp.server_opt.state(), spec_json)
        if stopped is not None and exp.history and "eval" not in exp.history[-1]:
            exp.history[-1]["eval"] = evaluate(exp)
            _append_jsonl(metrics_path, {"round": exp.history[-1]["round"], "eval": exp.history[-1]["eval"],
                                         "note": "final evaluation after the budget stop"})
    finally:
        if exp.privacy is not None:
            exp.privacy.close()
    summary = summarize(exp, baseline, part_info, time.perf_counter() - t_start)
    summary["stopped"] = stopped
    summary["resumed_after_round"] = first - 1 if resume else None
    if exp.privacy is not None:
        from securefed.privacy.report import write_privacy_report

        last = next((h["privacy"] for h in reversed(exp.history) if "privacy" in h), None)
        summary["privacy"] = {"spent": last, "resolved": dict(exp.privacy.session.resolved),
                              "report": "privacy-report.md"}
        write_privacy_report(d)
    (d / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    from securefed.report import write_report

    write_report(d, summary, exp.history)
    return summary


def summarize(exp: Experiment, baseline: dict[str, float] | None, part_info: dict[str, Any], seconds: float) -> dict[str, Any]:
    cfg = exp.cfg
    final = next((h["eval"] for h in reversed(exp.history) if "eval" in h), None)
    up = [v for h in exp.history for v in (h.get("bytes_up") or {}).values()]
    down = [v for h in exp.history for v in (h.get("bytes_down") or {}).values()]
    times = [h["time"] for h in exp.history]
    return {
        "run": cfg.run.name,
        "config": to_dict(cfg),
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "task": cfg.data.task,
        "peft_method": cfg.peft.method,
        "adapter_parameters": exp.trainer.spec.dim,
        "aggregation": cfg.aggregation.name,
        "rounds": cfg.train.rounds,
        "clients": cfg.partition.clients,
        "train_fingerprint": fingerprint(exp.train),
        "baseline_eval": baseline,
        "final_eval": final,
        "aborted_rounds": [h["round"] for h in exp.history if "aborted" in h],
        "mean_bytes_up_per_client": float(np.mean(up)) if up else 0.0,
        "mean_bytes_down_per_client": float(np.mean(down)) if down else 0.0,
        "time_seconds": {
            "total": seconds,
            "train": float(sum(t["train"] for t in times)),
            "aggregate": float(sum(t["aggregate"] for t in times)),
            "eval": float(sum(t["eval"] for t in times)),
        },
        "partition_sizes": part_info["sizes"],
    }
