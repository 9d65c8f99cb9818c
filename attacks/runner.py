"""``securefed attack RUN_DIR --attack NAME``: run an attack on a run's recorded views.

The loop writes ``RUN_DIR/views/round-NNNN/`` when ``attack.record = true``
(:mod:`.store`). :func:`run_attack` loads every recorded view, runs the named
attack on each, scores the reconstructions against the recorded evaluation
truth when there is one (the attack itself never sees it), and writes
``RUN_DIR/attacks/NAME.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .metrics import score_bag, score_texts
from .registry import ATTACKS
from .store import load_truth, load_views
from .target import ModelLoader, default_loader
from .text import strip_template


def run_attack(
    run_dir: str | Path,
    name: str,
    *,
    targets: str = "all",
    loader: ModelLoader | None = None,
    write: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Run attack ``name`` (with ``options``) on every view recorded under ``run_dir``.

    Returns (and writes to ``run_dir/attacks/NAME.json``) the per-round,
    per-target reconstructions with their scores, and means over targets.

    Raises:
        ViewFormatError: no (or corrupt) recorded views.
        AttackConfigError: unknown attack or option.
    """
    run_dir = Path(run_dir)
    attack = ATTACKS.create(name, **options)
    views = load_views(run_dir / "views")
    truths = load_truth(run_dir / "views")
    tokenize: Callable[[str], Sequence[int]] | None = None
    rounds: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for view in views:
        result = attack.run(view, loader=loader, targets=targets)
        truth = truths.get(view.round_index)
        if truth is not None and tokenize is None:
            tok = (loader or default_loader)(view.public)[1]
            tokenize = lambda s, tok=tok: tok.encode(s, add_special_tokens=False)  # noqa: E731
        entry = result.to_dict()
        for rec, out in zip(result.reconstructions, entry["reconstructions"], strict=True):
            if truth is None:
                continue
            refs = [strip_template(t, None) for t in truth.for_clients(rec.clients)]
            out["scores"] = score_texts(rec.texts, refs, tokenize=tokenize).to_dict()
            if rec.tokens and tokenize is not None:
                out["bag_scores"] = score_bag(rec.tokens, [tokenize(r) for r in refs])
        rounds.append(entry)
    summary = _summary(rounds)
    report = {
        "attack": name,
        "citation": attack.citation,
        "threat_model": attack.threat_model,
        "run_dir": str(run_dir),
        "options": {k: v for k, v in options.items() if isinstance(v, str | int | float | bool) or v is None},
        "seconds": time.perf_counter() - t0,
        "summary": summary,
        "rounds": rounds,
    }
    if write:
        out_dir = run_dir / "attacks"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean scores over the clients' targets and over the aggregates, plus status counts."""
    out: dict[str, Any] = {}
    for group in ("clients", "aggregate"):
        recs = [
            r
            for rnd in rounds
            for r in rnd["reconstructions"]
            if (r["target"] == "aggregate") == (group == "aggregate")
        ]
        scored = [r["scores"] for r in recs if "scores" in r]
        statuses: dict[str, int] = {}
        for r in recs:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        entry: dict[str, Any] = {"targets": len(recs), "status": statuses}
        if scored:
            for key in ("rouge1", "rouge2", "rougeL", "token_accuracy", "exact_match"):
                entry[key] = statistics.mean(s[key] for s in scored)
        if recs:
            entry["seconds_median"] = statistics.median(r["seconds"] for r in recs)
        out[group] = entry
    return out
