"""Configs validate on load; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from securefed.config import RunConfig, load_config, to_toml
from securefed.errors import ConfigError


def test_default_config_is_the_documented_experiment() -> None:
    c = load_config()
    assert (c.model.name, c.data.name, c.data.task) == ("smollm2-135m", "rotten-tomatoes", "verbalized")
    assert (c.peft.method, c.peft.r, c.peft.target_modules) == ("lora", 8, ("q_proj", "v_proj"))
    assert (c.partition.clients, c.partition.scheme, c.partition.alpha) == (8, "dirichlet", 0.5)
    assert (c.train.rounds, c.train.local_steps) == (3, 20)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    c = load_config(overrides=["train.lr=0.01", 'peft.target_modules=["q_proj"]', "aggregation.options={x = 1}"])
    p = tmp_path / "c.toml"
    p.write_text(to_toml(c))
    assert load_config(p) == c


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lrr=1", "train.lrr"),
        ("bogus.x=1", "bogus"),
        ('train.lr="fast"', "train.lr"),
        ("train.rounds=0", "train.rounds"),
        ("train.rounds=1.5", "train.rounds"),
        ("train.batch_size=true", "train.batch_size"),
        ('partition.scheme="random"', "partition.scheme"),
        ("partition.alpha=-1", "partition.alpha"),
        ("sampling.rate=0", "sampling.rate"),
        ("dropout.rate=1.0", "dropout.rate"),
        ("peft.r=0", "peft.r"),
        ('peft.target_modules="q_proj"', "peft.target_modules"),
        ('run.name="../x"', "run.name"),
    ],
)
def test_bad_values_name_their_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert key in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.lr"])


def test_config_is_frozen() -> None:
    c = RunConfig()
    with pytest.raises(AttributeError):
        c.train = None  # type: ignore[misc]
