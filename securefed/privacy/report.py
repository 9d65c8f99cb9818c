"""The privacy report of a run, computed from its ledger alone.

``write_privacy_report(run_dir)`` writes ``privacy-report.md``,
``privacy-report.json`` and ``privacy-epsilon.png`` (epsilon per round at both
levels). Everything comes from the ledger: the mechanisms and parameters in
its header, and every recorded release, so the report of a crashed or resumed
run includes interrupted rounds at their planned cost.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .budget import level_epsilon
from .ledger import LEDGER_FILE, PrivacyLedger, RoundRecord

RELATIONS = {
    "sample": (
        "add-or-remove one training example of one client (the client's own dataset with or without "
        "that example); holds for each client separately"
    ),
    "user": "add-or-remove one client with all of its data (the population with or without that client)",
}


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if not math.isfinite(x) else f"{x:.4g}"


def _timeline(records: Sequence[RoundRecord], header_delta: Mapping[str, float | None], accountant: str) -> list[dict[str, Any]]:
    sample_hist: dict[str, list[Any]] = {}
    user_hist: list[Any] = []
    rows: list[dict[str, Any]] = []
    for rec in records:
        for r in rec.releases:
            if r.level == "sample":
                sample_hist.setdefault(r.subject, []).append(r.event)
            else:
                user_hist.append(r.event)
        row: dict[str, Any] = {"entry": rec.seq, "round": rec.round, "status": rec.status,
                               "sample_releases": sum(r.level == "sample" for r in rec.releases)}
        ds, du = header_delta.get("sample"), header_delta.get("user")
        if ds is not None:
            row["sample_epsilon_max"] = level_epsilon("sample", sample_hist, ds, accountant=accountant).epsilon
        if du is not None:
            row["user_epsilon"] = level_epsilon("user", {"server": user_hist}, du, accountant=accountant).epsilon
        rows.append(row)
    return rows


def privacy_summary(run_dir: Path) -> dict[str, Any]:
    """The report's content as a JSON-able dict (what ``privacy-report.json`` holds)."""
    with PrivacyLedger.open(Path(run_dir) / LEDGER_FILE) as ledger:
        h = ledger.header
        records = ledger.rounds()
        sample_hist = ledger.history("sample")
        user_hist = ledger.history("user")
    cfg = dict(h.config)
    dp = cfg.get("dp", {})
    shape = cfg.get("shape", {})
    resolved = cfg.get("resolved", {})
    levels: dict[str, Any] = {}
    if h.delta_sample is not None:
        lv = level_epsilon("sample", sample_hist, h.delta_sample, accountant=h.accountant)
        eps = sorted(lv.per_subject.values())
        finite = [e for e in eps if math.isfinite(e)]
        levels["sample"] = {
            "epsilon_max": lv.epsilon,
            "worst_client": lv.worst_subject,
            "delta": h.delta_sample,
            "per_client": dict(sorted(lv.per_subject.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0)),
            "distribution": {
                "clients": len(eps),
                "min": eps[0] if eps else None,
                "median": statistics.median(finite) if finite else None,
                "max": eps[-1] if eps else None,
            },
            "neighbouring_relation": RELATIONS["sample"],
            "mechanism": {
                "name": "DP-SGD (Abadi et al. 2016) on the adapter tensors, Opacus per-sample gradients",
                "noise_multiplier": resolved.get("noise_sample"),
                "clip": dp.get("sample", {}).get("clip"),
                "grad_sample_mode": dp.get("sample", {}).get("mode"),
                "expected_batch_size": shape.get("expected_batch_size"),
                "local_steps_per_round": shape.get("local_steps"),
                "sampling": "Poisson, q = expected batch / client examples (per client)",
                "secure_noise": dp.get("sample", {}).get("secure_mode"),
            },
        }
    if h.delta_user is not None:
        lv = level_epsilon("user", user_hist, h.delta_user, accountant=h.accountant)
        u = dp.get("user", {})
        levels["user"] = {
            "epsilon": lv.epsilon,
            "delta": h.delta_user,
            "rounds_charged": len(user_hist.get("server", [])),
            "neighbouring_relation": RELATIONS["user"],
            "mechanism": {
                "name": "DP-FedAvg (McMahan et al. 2018), fixed-denominator average, server-side Gaussian noise",
                "noise_multiplier": resolved.get("noise_user"),
                "clip": u.get("clip"),
                "clipping": u.get("clipping"),
                "adaptive": (
                    {"target_quantile": u.get("target_quantile"), "clip_learning_rate": u.get("clip_learning_rate"),
                     "count_noise_multiplier": u.get("count_noise_multiplier"),
                     "note": "count noise charged: update noise z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021)"}
                    if u.get("clipping") == "adaptive" else None
                ),
                "client_sampling": "Poisson, q = expected clients / clients",
                "expected_clients": shape.get("expected_clients"),
                "clients": len(shape.get("client_sizes", [])),
                "secure_noise": u.get("secure_mode"),
            },
        }
    trust = []
    if "sample" in levels:
        trust.append(
            "Sample level: each client clips and noises its own gradients before anything leaves it, so the "
            "guarantee holds against the server, other clients and anyone who sees the model. It assumes the "
            "client's own code and randomness are honest."
        )
    if "user" in levels:
        trust.append(
            "User level: the server clips (via clients), sums and adds the noise. The guarantee holds against "
            "anyone who sees the released global model, NOT against the server itself, which sees the "
            "un-noised sum (and each update unless secure aggregation hides them). It assumes the server "
            "samples clients by Poisson sampling with secret randomness and adds the noise honestly."
        )
    if any(not lv["mechanism"].get("secure_noise", True) for lv in levels.values()):
        trust.append(
            "Secure mode was OFF for at least one level: noise came from torch's (non-cryptographic) generator, "
            "so the guarantee assumes an adversary who cannot predict that generator."
        )
    trust.append(
        "Both levels use floating-point Gaussian noise; see docs/differential-privacy.md (secure mode) for "
        "the floating-point caveat and the hardening applied."
    )
    interrupted = sorted({r.round for r in records if r.status == "interrupted"})
    open_plan = sorted({r.round for r in records if r.status == "planned"})
    budget = dp.get("budget", {})
    return {
        "run_id": h.run_id,
        "ledger": str(Path(run_dir) / LEDGER_FILE),
        "ledger_schema": h.schema_version,
        "accountant": h.accountant,
        "budget": {"sample_epsilon": budget.get("sample_epsilon"), "user_epsilon": budget.get("user_epsilon")},
        "levels": levels,
        "composition_note": (
            "The two levels are different guarantees for different neighbouring relations and are not added. "
            "A user-level guarantee covers every example of that user; a sample-level guarantee does not "
            "protect a user's whole dataset."
        ),
        "trust_assumptions": trust,
        "interrupted_rounds_charged_at_plan": interrupted,
        "open_planned_rounds_charged": open_plan,
        "timeline": _timeline(records, {"sample": h.delta_sample, "user": h.delta_user}, h.accountant),
    }


def _markdown(s: Mapping[str, Any]) -> str:
    lines = [f"# Privacy report: {s['run_id']}", ""]
    lines += [f"Accountant: `{s['accountant']}`; ledger `{s['ledger']}` (schema v{s['ledger_schema']}).", ""]
    lines += ["| level | epsilon | delta | budget | neighbouring relation |", "|---|---|---|---|---|"]
    levels = s["levels"]
    if "sample" in levels:
        lv = levels["sample"]
        lines.append(
            f"| sample (max over {lv['distribution']['clients']} clients) | {_fmt(lv['epsilon_max'])} | "
            f"{lv['delta']:g} | {_fmt(s['budget']['sample_epsilon'])} | {lv['neighbouring_relation']} |"
        )
    if "user" in levels:
        lv = levels["user"]
        lines.append(
            f"| user | {_fmt(lv['epsilon'])} | {lv['delta']:g} | {_fmt(s['budget']['user_epsilon'])} | "
            f"{lv['neighbouring_relation']} |"
        )
    lines += ["", s["composition_note"], ""]
    for name, lv in levels.items():
        lines += [f"## {name.capitalize()}-level mechanism", ""]
        for k, v in lv["mechanism"].items():
            if v is not None:
                lines.append(f"- {k.replace('_', ' ')}: {v}")
        if name == "sample":
            d = lv["distribution"]
            lines += ["", f"Per-client epsilon: min {_fmt(d['min'])}, median {_fmt(d['median'])}, max {_fmt(d['max'])} "
                      f"(worst client {lv['worst_client']})."]
            lines += ["", "| client | epsilon |", "|---|---|"]
            lines += [f"| {c} | {_fmt(e)} |" for c, e in lv["per_client"].items()]
        lines.append("")
    lines += ["## Trust assumptions", ""] + [f"- {t}" for t in s["trust_assumptions"]] + [""]
    if s["interrupted_rounds_charged_at_plan"]:
        lines += [f"Interrupted rounds (charged at their plan): {s['interrupted_rounds_charged_at_plan']}", ""]
    lines += ["## Epsilon per round", "", "| entry | round | status | sample eps (max) | user eps |", "|---|---|---|---|---|"]
    for r in s["timeline"]:
        lines.append(
            f"| {r['entry']} | {r['round']} | {r['status']} | {_fmt(r.get('sample_epsilon_max'))} | "
            f"{_fmt(r.get('user_epsilon'))} |"
        )
    return "\n".join(lines) + "\n"


def _plot(s: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [r["entry"] for r in s["timeline"]]
    for key, label in (("sample_epsilon_max", "sample level (max over clients)"), ("user_epsilon", "user level")):
        ys = [r.get(key) for r in s["timeline"]]
        if any(y is not None for y in ys):
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o", label=label)
    for key, name in (("sample_epsilon", "sample budget"), ("user_epsilon", "user budget")):
        b = s["budget"].get(key)
        if b is not None:
            ax.axhline(b, linestyle="--", linewidth=1, color="grey")
            ax.annotate(name, (xs[0] if xs else 0, b), fontsize=7)
    ax.set_xlabel("ledger entry (round attempt)")
    ax.set_ylabel(f"epsilon ({s['accountant']})")
    ax.set_title(s["run_id"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_privacy_report(run_dir: Path) -> dict[str, Path]:
    """Write the Markdown, JSON and PNG report of ``run_dir``'s ledger; return their paths.

    Raises:
        LedgerCorruptError: the ledger is missing or damaged (no report is better than a wrong one).
    """
    run_dir = Path(run_dir)
    summary = privacy_summary(run_dir)
    out = {
        "markdown": run_dir / "privacy-report.md",
        "json": run_dir / "privacy-report.json",
        "png": run_dir / "privacy-epsilon.png",
    }
    out["json"].write_text(json.dumps(summary, indent=2, default=str, allow_nan=True) + "\n")
    out["markdown"].write_text(_markdown(summary))
    _plot(summary, out["png"])
    return out
