"""Round checkpoints, and what a resumed run starts from.

After each round the loop writes, in this order: the privacy ledger's commit
(DP runs), ``adapter.safetensors`` (the published model), the round's line in
``metrics.jsonl``, and last ``checkpoint.safetensors``: the global adapter
vector, the server optimizer's state (FedAdam/FedYogi moments) and the round
number, replaced atomically. The checkpoint is the commit point of a round: a
resumed run (``securefed run --resume RUN_DIR``) continues after the round it
names, drops any later metrics lines, and reruns the round that was cut off.
Its privacy ledger is reopened, not recreated, so a round that was planned
(and may have released noisy updates) before the crash stays charged.

Safetensors holds arrays and string metadata only; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from securefed.errors import RunError

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "securefed-checkpoint/1"
_SERVER = "server."


@dataclass(frozen=True)
class Checkpoint:
    """The state after ``round`` (0: no round finished yet)."""

    round: int
    global_vector: np.ndarray
    server_state: dict[str, np.ndarray]


def write_checkpoint(run_dir: Path, round_index: int, vector: np.ndarray, server_state: dict[str, np.ndarray],
                     spec_json: str) -> None:
    """Atomically replace the run's checkpoint (write to a temporary file, fsync, rename)."""
    tensors = {"global": np.ascontiguousarray(vector, dtype=np.float32)}
    tensors |= {_SERVER + k: np.ascontiguousarray(v, dtype=np.float64) for k, v in server_state.items()}
    meta = {"format": FORMAT, "round": str(round_index), "spec": spec_json}
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(run_dir: Path, spec_json: str) -> Checkpoint | None:
    """The run's checkpoint, or None if no round finished.

    Raises:
        RunError: the file is unreadable, of another format, or for another adapter.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise RunError(f"{path} is unreadable ({err}); the run cannot be resumed from it") from err
    if meta.get("format") != FORMAT:
        raise RunError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("spec") != spec_json:
        raise RunError(f"{path} was written for another adapter layout; resume with the run's own config.toml")
    if "global" not in tensors or not meta.get("round", "").isdigit():
        raise RunError(f"{path} lacks the global adapter or the round number")
    vec = tensors.pop("global")
    if not np.isfinite(vec).all():
        raise RunError(f"{path} holds non-finite adapter values")
    bad = [k for k in tensors if not k.startswith(_SERVER)]
    if bad:
        raise RunError(f"{path} holds unexpected tensors {bad[:3]}")
    return Checkpoint(int(meta["round"]), vec, {k[len(_SERVER):]: v for k, v in tensors.items()})


def resumable_history(metrics_path: Path, last_round: int) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Baseline evaluation and round records up to ``last_round``; rewrites the file to just those lines.

    Lines of rounds after the checkpoint (cut off before it was written), a
    budget stop and the evaluation after it are dropped: the resumed run
    writes its own.
    """
    if not metrics_path.exists():
        return None, []
    baseline: dict[str, Any] | None = None
    keep: list[dict[str, Any]] = []
    for n, line in enumerate(metrics_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(metrics_path.read_text(encoding="utf-8").splitlines()):
                continue  # a line cut off by the crash
            raise RunError(f"{metrics_path}:{n} is not JSON; the run's metrics are damaged") from None
        rnd = rec.get("round")
        if not isinstance(rnd, int) or rnd > last_round or "stopped" in rec or "note" in rec:
            continue
        if rnd == 0:
            baseline = rec.get("eval")
        keep.append(rec)
    tmp = metrics_path.with_name(f".{metrics_path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
    os.replace(tmp, metrics_path)
    return baseline, [r for r in keep if r["round"] > 0]
