"""Recorded server views on disk: safetensors for arrays, JSON for the rest. No pickle.

Layout under a views directory (the loop writes ``RUN_DIR/views`` when
``attack.record = true``)::

    round-0000/view.json          format version, protocol, kind, public knowledge
    round-0000/view.safetensors   global vector, aggregate, per-client vectors, ciphertext bytes
    round-0000/truth.json         (optional) the clients' texts: the evaluator's oracle

Loading is strict: an unknown format version, a missing or extra array, a
length that contradicts the adapter spec, or an oversized JSON file raises
:class:`~securefed.attacks.errors.ViewFormatError`. safetensors never executes
code, so recorded views are safe to load from another machine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from securefed.peft.spec import AdapterSpec

from .errors import ViewFormatError, ViewMismatchError
from .views import EvaluationTruth, PublicKnowledge, ServerView, ViewKind

FORMAT = "securefed-server-view"
VERSION = 1
MAX_JSON_BYTES = 16 * 2**20
_ROUND = re.compile(r"^round-(\d{4,})$")
_PUBLIC_SCALARS = (
    "model_name", "peft_method", "round_index", "learning_rate", "local_steps", "local_optimizer",
    "batch_size", "task", "num_labels", "model_seed", "max_length", "text_template", "sampling",
    "clients_per_round", "sampling_rate", "dp_noise_multiplier", "dp_clip", "dp_level",
)


def _round_dir(root: Path, index: int) -> Path:
    return root / f"round-{index:04d}"


def save_views(path: str | Path, views: Iterable[ServerView], truths: Iterable[EvaluationTruth] = ()) -> list[Path]:
    """Write each view (and optional evaluation truth) under ``path/round-NNNN/``."""
    root = Path(path)
    written: list[Path] = []
    for view in views:
        if not isinstance(view, ServerView):
            raise TypeError(f"save_views takes ServerView objects, got {type(view).__name__}")
        d = _round_dir(root, view.round_index)
        d.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"global": np.ascontiguousarray(view.public.global_vector, dtype=np.float32)}
        if view.aggregate is not None:
            arrays["aggregate"] = np.ascontiguousarray(view.aggregate, dtype=np.float64)
        for name, vecs in (("individual", view.individual_updates), ("masked", view.masked_updates)):
            for cid, v in (vecs or {}).items():
                arrays[f"{name}/{cid}"] = np.ascontiguousarray(v)
        for cid, blob in (view.ciphertexts or {}).items():
            arrays[f"ciphertext/{cid}"] = np.frombuffer(blob, dtype=np.uint8).copy()
        save_file(arrays, str(d / "view.safetensors"))
        pub = view.public
        meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "protocol": view.protocol,
            "kind": view.kind.value,
            "contributors": list(view.contributors),
            "total_weight": view.total_weight,
            "individual_weights": None
            if view.individual_weights is None
            else {str(k): v for k, v in view.individual_weights.items()},
            "public": {k: getattr(pub, k) for k in _PUBLIC_SCALARS}
            | {"spec": json.loads(pub.spec.to_json()), "peft_config": _jsonable(pub.peft_config)},
        }
        (d / "view.json").write_text(json.dumps(meta, indent=1))
        written.append(d)
    for truth in truths:
        d = _round_dir(root, truth.round_index)
        d.mkdir(parents=True, exist_ok=True)
        (d / "truth.json").write_text(
            json.dumps({"round": truth.round_index, "texts": {str(k): list(v) for k, v in truth.texts.items()}})
        )
    return written


def _jsonable(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in m.items()}


def _read_json(p: Path) -> Any:
    if not p.is_file():
        raise ViewFormatError(f"{p} is missing")
    if p.stat().st_size > MAX_JSON_BYTES:
        raise ViewFormatError(f"{p} is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ViewFormatError(f"{p} is not valid JSON: {err}") from err


def round_dirs(path: str | Path) -> list[Path]:
    root = Path(path)
    if not root.is_dir():
        raise ViewFormatError(f"no recorded views at {root}: run with attack.record = true")
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and _ROUND.match(p.name)), key=lambda p: p.name)
    if not dirs:
        raise ViewFormatError(f"{root} holds no round-NNNN directories")
    return dirs


def load_view(d: Path) -> ServerView:
    meta = _read_json(d / "view.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ViewFormatError(f"{d / 'view.json'} is not a securefed server view")
    if meta.get("version") != VERSION:
        raise ViewFormatError(f"{d / 'view.json'} has format version {meta.get('version')}, this reader knows {VERSION}")
    try:
        arrays = load_file(str(d / "view.safetensors"))
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ViewFormatError(f"{d / 'view.safetensors'} is unreadable: {err}") from err
    try:
        p = meta["public"]
        spec = AdapterSpec.from_json(json.dumps(p["spec"]))
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(p.get("peft_config") or {}).items()}
        public = PublicKnowledge(
            spec=spec, global_vector=arrays.pop("global"), peft_config=cfg, **{k: p[k] for k in _PUBLIC_SCALARS}
        )
        groups: dict[str, dict[int, Any]] = {"individual": {}, "masked": {}, "ciphertext": {}}
        aggregate = arrays.pop("aggregate", None)
        for key, arr in arrays.items():
            kind, _, cid = key.partition("/")
            if kind not in groups or not cid.lstrip("-").isdigit():
                raise ViewFormatError(f"{d / 'view.safetensors'} holds an unknown array {key!r}")
            groups[kind][int(cid)] = arr.tobytes() if kind == "ciphertext" else arr
        weights = meta.get("individual_weights")
        return ServerView(
            public=public,
            protocol=str(meta["protocol"]),
            kind=ViewKind(meta["kind"]),
            contributors=tuple(int(c) for c in meta["contributors"]),
            aggregate=aggregate,
            total_weight=meta.get("total_weight"),
            individual_updates=groups["individual"] or None,
            individual_weights=None if weights is None else {int(k): float(v) for k, v in weights.items()},
            masked_updates=groups["masked"] or None,
            ciphertexts=groups["ciphertext"] or None,
        )
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ViewFormatError | ViewMismatchError):
            raise
        raise ViewFormatError(f"{d / 'view.json'} is malformed: {type(err).__name__}: {err}") from err


def load_views(path: str | Path) -> list[ServerView]:
    """Every recorded view under ``path``, in round order."""
    return [load_view(d) for d in round_dirs(path)]


def load_truth(path: str | Path) -> dict[int, EvaluationTruth]:
    """The recorded evaluation truth per round (rounds without one are absent)."""
    out: dict[int, EvaluationTruth] = {}
    for d in round_dirs(path):
        f = d / "truth.json"
        if not f.exists():
            continue
        data = _read_json(f)
        try:
            out[int(data["round"])] = EvaluationTruth(
                int(data["round"]), {int(k): tuple(str(t) for t in v) for k, v in data["texts"].items()}
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ViewFormatError(f"{f} is malformed: {err}") from err
    return out
