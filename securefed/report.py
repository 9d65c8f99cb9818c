"""``report.md``: a human summary of a run (utility, cost, partition)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _metric_line(ev: dict[str, float] | None) -> str:
    if not ev:
        return "n/a"
    return ", ".join(f"{k} {_fmt(v)}" for k, v in ev.items() if k != "eval_examples")


def write_report(run_dir: Path, summary: dict[str, Any], history: list[dict[str, Any]]) -> Path:
    lines = [
        f"# securefed run `{summary['run']}`",
        "",
        f"{summary['model']} + {summary['peft_method']} ({summary['adapter_parameters']:,} trainable adapter "
        f"parameters) on {summary['dataset']} ({summary['task']}), {summary['clients']} clients, "
        f"{summary['rounds']} rounds, aggregation `{summary['aggregation']}`.",
        "",
        "## Utility",
        "",
        f"- before training (zero-shot baseline): {_metric_line(summary.get('baseline_eval'))}",
        f"- after the last round: {_metric_line(summary.get('final_eval'))}",
        "",
        "| round | clients | train loss | eval | update norm | up (B/client) | round s | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h in history:
        up = list((h.get("bytes_up") or {}).values())
        t = h.get("time", {})
        lines.append(
            f"| {h['round']} | {len(h.get('contributors', []))}/{len(h.get('sampled', []))} | "
            f"{_fmt(h.get('train_loss', 'n/a'))} | {_metric_line(h.get('eval'))} | {_fmt(h.get('update_norm', 'n/a'))} | "
            f"{_fmt(sum(up) / len(up)) if up else 'n/a'} | {_fmt(t.get('round', 0.0))} | {_fmt(t.get('train', 0.0))} | "
            f"{_fmt(t.get('eval', 0.0))} |"
        )
    aborted = summary.get("aborted_rounds") or []
    if aborted:
        lines += ["", f"Aborted rounds (global model unchanged): {aborted}"]
    ts = summary["time_seconds"]
    lines += [
        "",
        "## Cost",
        "",
        f"- wall time {ts['total']:.1f} s (training {ts['train']:.1f} s, aggregation {ts['aggregate']:.2f} s, "
        f"evaluation {ts['eval']:.1f} s)",
        f"- mean bytes per client per round: up {summary['mean_bytes_up_per_client']:,.0f}, "
        f"down {summary['mean_bytes_down_per_client']:,.0f}",
        "",
        "## Partition",
        "",
        f"Client sizes: {summary['partition_sizes']} (label histograms in partition.json).",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
