"""Run configuration: TOML mapped onto frozen, validated dataclasses.

Loading is strict, because configs control privacy (noise, clipping,
thresholds): an unknown key, a wrong type or an out-of-range value raises
:class:`~securefed.errors.ConfigError` naming the dotted key. ``--set
key=value`` overrides are parsed as TOML values (``train.lr=1e-3``,
``peft.target_modules=["q_proj"]``) and validated the same way.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from securefed.errors import ConfigError
from securefed.peft.registry import AdapterOptions
from securefed.privacy.config import DPConfig

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "default.toml"


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(msg, key=key)


@dataclass(frozen=True)
class RunSection:
    name: str = "default"
    seed: int = 0
    output_dir: str = "runs"
    cache_dir: str | None = None
    overwrite: bool = False
    threads: int = 0  # 0: torch default

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "run.name",
               f"must be a plain directory name, got {self.name!r}")
        _check(self.threads >= 0, "run.threads", "must be >= 0")


@dataclass(frozen=True)
class ModelSection:
    name: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"


@dataclass(frozen=True)
class DataSection:
    name: str = "rotten-tomatoes"
    task: Literal["verbalized", "seq-cls", "instruction"] = "verbalized"
    max_length: int = 64
    test_fraction: float = 0.2
    train_examples: int = 0  # 0: all
    template: str | None = None
    label_words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(8 <= self.max_length <= 8192, "data.max_length", f"must be in 8..8192, got {self.max_length}")
        _check(0 < self.test_fraction < 1, "data.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        _check(self.train_examples >= 0, "data.train_examples", "must be >= 0 (0 = all)")


@dataclass(frozen=True)
class PeftSection:
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    train_head: bool = True

    def options(self) -> AdapterOptions:
        return AdapterOptions(self.r, self.alpha, self.dropout, self.target_modules, self.train_head)

    def __post_init__(self) -> None:
        self.options()


@dataclass(frozen=True)
class PartitionSection:
    scheme: Literal["iid", "dirichlet", "quantity", "natural"] = "dirichlet"
    clients: int = 8
    alpha: float = 0.5
    min_size: int = 8

    def __post_init__(self) -> None:
        _check(self.clients >= 1, "partition.clients", f"must be >= 1, got {self.clients}")
        _check(self.alpha > 0, "partition.alpha", f"must be > 0, got {self.alpha}")
        _check(self.min_size >= 1, "partition.min_size", "must be >= 1")


@dataclass(frozen=True)
class SamplingSection:
    mode: Literal["fixed", "poisson"] = "fixed"
    clients_per_round: int = 0  # fixed mode; 0: all clients
    rate: float = 1.0  # poisson mode

    def __post_init__(self) -> None:
        _check(self.clients_per_round >= 0, "sampling.clients_per_round", "must be >= 0 (0 = all)")
        _check(0 < self.rate <= 1, "sampling.rate", f"must be in (0, 1], got {self.rate}")


@dataclass(frozen=True)
class TrainSection:
    rounds: int = 3
    local_steps: int = 20
    local_epochs: float = 0.0  # > 0 overrides local_steps
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    fedprox_mu: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping (non-DP training)

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "train.rounds", f"must be >= 1, got {self.rounds}")
        _check(self.local_steps >= 1 or self.local_epochs > 0, "train.local_steps", "must be >= 1 unless local_epochs > 0")
        _check(self.local_epochs >= 0, "train.local_epochs", "must be >= 0")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(0 < self.lr < 10, "train.lr", f"must be in (0, 10), got {self.lr}")
        _check(self.fedprox_mu >= 0, "train.fedprox_mu", "must be >= 0")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")


@dataclass(frozen=True)
class ServerSection:
    optimizer: Literal["fedavg", "fedadam", "fedyogi"] = "fedavg"
    weighted: bool = True
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _check(self.lr > 0, "server.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.beta1 < 1, "server.beta1", "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "server.beta2", "must be in [0, 1)")
        _check(self.tau > 0, "server.tau", "must be > 0")


@dataclass(frozen=True)
class AggregationSection:
    name: str = "plaintext"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DropoutSection:
    rate: float = 0.0
    stage: str = "start"

    def __post_init__(self) -> None:
        _check(0 <= self.rate < 1, "dropout.rate", f"must be in [0, 1), got {self.rate}")


@dataclass(frozen=True)
class EvalSection:
    before: bool = True
    every: int = 1  # evaluate after every k-th round (the last round always)
    max_examples: int = 400
    batch_size: int = 32

    def __post_init__(self) -> None:
        _check(self.every >= 1, "eval.every", "must be >= 1")
        _check(self.max_examples >= 1, "eval.max_examples", "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")


@dataclass(frozen=True)
class AttackSection:
    record: bool = False


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    peft: PeftSection = field(default_factory=PeftSection)
    partition: PartitionSection = field(default_factory=PartitionSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    train: TrainSection = field(default_factory=TrainSection)
    server: ServerSection = field(default_factory=ServerSection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    dropout: DropoutSection = field(default_factory=DropoutSection)
    eval: EvalSection = field(default_factory=EvalSection)
    attack: AttackSection = field(default_factory=AttackSection)
    dp: DPConfig = field(default_factory=DPConfig)


# ---------------------------------------------------------------- generic mapping


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {type(value).__name__}", key=key)
        return build(tp, value, prefix=key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"value {value!r} matches none of the allowed types", key=key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"must be one of {list(args)}, got {value!r}", key=key)
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"expected a list, got {type(value).__name__}", key=key)
        inner = args[0] if args else Any
        return tuple(_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {type(value).__name__}", key=key)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", key=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", key=key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"expected a number, got {value!r}", key=key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", key=key)
        return value
    raise ConfigError(f"unsupported config type {tp}", key=key)


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key(s) {', '.join(where + u for u in unknown)}; allowed: {', '.join(sorted(names))}",
                          key=f"{where}{unknown[0]}")
    kwargs = {k: _convert(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err), key=prefix or None) from err


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{p} is not a table", key=dotted)
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a TOML value; bare words are taken as strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load ``path`` (default: the shipped default experiment) and apply overrides.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type, out-of-range value.
    """
    p = Path(path) if path else DEFAULT_CONFIG
    try:
        tree = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p} is not valid TOML: {err}") from None
    for ov in overrides:
        k, v = parse_override(ov)
        _set_dotted(tree, k, v)
    cfg = build(RunConfig, tree)
    assert isinstance(cfg, RunConfig)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-able dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def to_toml(cfg: RunConfig) -> str:
    """Serialize a resolved config as TOML (None values omitted)."""
    lines: list[str] = []

    def emit(table: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) or k == "options"}
        subs = {k: v for k, v in d.items() if isinstance(v, dict) and k != "options"}
        lines.append(f"[{table}]")
        for k, v in scalars.items():
            if v is None:
                continue
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
        for k, v in subs.items():
            emit(f"{table}.{k}", v)

    for name, section in to_dict(cfg).items():
        emit(name, section)
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    return json.dumps(str(v))
