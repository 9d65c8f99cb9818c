"""The federated loop end to end on tiny-llama and one real SmolLM2 round; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from securefed.config import load_config
from securefed.errors import AssetError, ConfigError, DataError, RunError, UpdateError
from securefed.fl import runner
from securefed.fl.client import ClientUpdate, LocalTrainer
from securefed.fl.runner import run_experiment
from securefed.peft.spec import AdapterSpec

TINY = [
    "model.name=tiny-llama",
    "partition.clients=3",
    "partition.min_size=2",
    "train.local_steps=2",
    "train.batch_size=4",
    "data.train_examples=120",
    "eval.max_examples=16",
    "data.max_length=32",
]


def test_two_round_tiny_run_writes_every_output(tmp_path: Path) -> None:
    cfg = load_config(overrides=[*TINY, "train.rounds=2", "server.optimizer=fedadam", "dropout.rate=0.3"])
    summary = run_experiment(cfg, tmp_path)
    for name in ("config.toml", "metrics.jsonl", "summary.json", "adapter.safetensors", "report.md", "partition.json"):
        assert (tmp_path / name).exists(), name
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2]
    assert "accuracy" in lines[0]["eval"] and "accuracy" in lines[2]["eval"]
    for rec in lines[1:]:
        assert set(rec["time"]) >= {"train", "aggregate", "eval", "round"}
        assert all(v > 0 for v in rec["bytes_up"].values())
    assert summary["baseline_eval"]["accuracy"] == lines[0]["eval"]["accuracy"]
    # The adapter file holds only adapter tensors and matches its spec.
    state = load_file(str(tmp_path / "adapter.safetensors"))
    assert all("lora_" in k for k in state)
    assert json.loads((tmp_path / "partition.json").read_text())["label_histograms"]
    assert load_config(tmp_path / "config.toml") == cfg


def test_runs_are_reproducible(tmp_path: Path) -> None:
    cfg = load_config(overrides=[*TINY, "train.rounds=1", "eval.before=false"])
    run_experiment(cfg, tmp_path / "a")
    run_experiment(cfg, tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_failure_midway_keeps_finished_rounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(overrides=[*TINY, "train.rounds=3", "eval.before=false"])
    real = LocalTrainer.train

    def flaky(self: LocalTrainer, cid: int, r: int, g: np.ndarray, ex: list) -> ClientUpdate:  # type: ignore[type-arg]
        if r == 2:
            raise UpdateError("injected failure")
        return real(self, cid, r, g, ex)

    monkeypatch.setattr(LocalTrainer, "train", flaky)
    with pytest.raises(UpdateError, match="injected"):
        run_experiment(cfg, tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1]
    assert load_file(str(tmp_path / "adapter.safetensors"))
    # A second run refuses to overwrite the partial outputs unless asked to.
    with pytest.raises(RunError, match="overwrite"):
        run_experiment(cfg, tmp_path)


def test_nan_update_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(overrides=[*TINY, "train.rounds=1", "eval.before=false"])

    def nan_train(self: LocalTrainer, cid: int, r: int, g: np.ndarray, ex: list) -> ClientUpdate:  # type: ignore[type-arg]
        d = np.zeros_like(g)
        d[0] = np.nan
        return ClientUpdate(cid, d, len(ex))

    monkeypatch.setattr(LocalTrainer, "train", nan_train)
    with pytest.raises(UpdateError, match="NaN"):
        run_experiment(cfg, tmp_path)


def test_wrong_length_update_is_refused() -> None:
    spec = AdapterSpec.from_state("lora", {})
    with pytest.raises(UpdateError, match="entries"):
        spec.check(np.zeros(3, dtype=np.float32))


def test_empty_client_dataset_is_refused(tiny_llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = load_config(overrides=[*TINY, "train.rounds=1"])
    exp = runner.build_experiment(cfg, tmp_path)
    with pytest.raises(DataError, match="no training examples"):
        exp.trainer.train(0, 1, exp.global_vector, [])
    with pytest.raises(DataError, match="cannot give"):
        run_experiment(load_config(overrides=[*TINY, "partition.clients=100"]), tmp_path / "x")


def test_unknown_model_and_bad_task(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="registered"):
        run_experiment(load_config(overrides=[*TINY, 'model.name="not-a-model"']), tmp_path / "a")
    with pytest.raises(ConfigError, match="instruction"):
        run_experiment(load_config(overrides=[*TINY, 'data.name="sharegpt"']), tmp_path / "b")


def test_instruction_and_seq_cls_tasks_run(tmp_path: Path) -> None:
    run_experiment(load_config(overrides=[*TINY, 'data.name="sharegpt"', 'data.task="instruction"', "train.rounds=1",
                                          'partition.scheme="natural"']),
                   tmp_path / "a")
    rec = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["eval"]["perplexity"] > 1
    run_experiment(load_config(overrides=[*TINY, 'model.name="tiny-bert"', 'data.task="seq-cls"',
                                          'peft.target_modules=["query","value"]', "train.rounds=1",
                                          'data.name="bbc-news"', "partition.scheme=\"iid\""]), tmp_path / "b")
    rec = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= rec["eval"]["accuracy"] <= 1


@pytest.mark.slow
def test_one_real_smollm2_round(tmp_path: Path) -> None:
    cfg = load_config(overrides=["partition.clients=2", "train.rounds=1", "train.local_steps=2",
                                 "eval.max_examples=16", "data.train_examples=400"])
    summary = run_experiment(cfg, tmp_path)
    # 30 layers x (q: A 8x576 + B 576x8; v: A 8x576 + B 192x8); 3 KV heads of 64 give v its 192 outputs.
    assert summary["adapter_parameters"] == 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8) == 460_800
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["contributors"] == [0, 1] and rec["update_norm"] > 0


def test_recorded_views_feed_the_attack_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from securefed.cli import app

    cfg = load_config(overrides=[*TINY, "train.rounds=1", "eval.before=false", "attack.record=true",
                                 'train.optimizer="sgd"', "train.lr=0.1", "train.local_steps=1", "train.batch_size=1"])
    run_experiment(cfg, tmp_path)
    assert (tmp_path / "views").is_dir()
    result = CliRunner().invoke(app, ["attack", str(tmp_path), "--attack", "bag-of-tokens"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "attacks" / "bag-of-tokens.json").exists()
    bad = CliRunner().invoke(app, ["attack", str(tmp_path), "--attack", "no-such-attack"])
    assert bad.exit_code == 2 and "error" in bad.output


def test_secure_aggregation_in_the_loop_and_misconfiguration_propagates(tmp_path: Path) -> None:
    from securefed.protocols.errors import ConfigurationError

    ok = load_config(overrides=[*TINY, "train.rounds=1", "eval.before=false", 'aggregation.name="secagg+"',
                                "server.weighted=false", "aggregation.options={dropout_rate = 0.0}"])
    run_experiment(ok, tmp_path / "a")
    rec = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["contributors"] == [0, 1, 2] and "aborted" not in rec
    # Weighted FedAvg needs max_weight >= the example counts: an error, not a silently aborted round.
    bad = load_config(overrides=[*TINY, "train.rounds=1", "eval.before=false", 'aggregation.name="secagg+"',
                                 "aggregation.options={dropout_rate = 0.0}"])
    with pytest.raises(ConfigurationError, match="max_weight"):
        run_experiment(bad, tmp_path / "b")


@pytest.mark.parametrize("name", ["ckks", "bfv"])
def test_homomorphic_aggregation_in_the_loop(name: str, tmp_path: Path) -> None:
    cfg = load_config(overrides=[*TINY, "train.rounds=1", "eval.before=false", f'aggregation.name="{name}"',
                                 "server.weighted=false", "attack.record=true"])
    run_experiment(cfg, tmp_path)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["contributors"] == [0, 1, 2] and rec["update_norm"] > 0
    from securefed.attacks import load_views

    (view,) = load_views(tmp_path / "views")
    assert view.ciphertexts and not view.individual_updates  # the server holds ciphertexts only


def test_round_with_every_client_dropped_is_marked_aborted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(overrides=[*TINY, "train.rounds=1", "eval.before=false"])
    monkeypatch.setattr(runner, "sample_dropouts", lambda clients, *a: {c: "start" for c in clients})
    run_experiment(cfg, tmp_path)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert "aborted" in rec and "contributors" not in rec


def test_one_client_under_secure_aggregation_aborts_the_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Poisson sampling or dropouts can leave one client; SecAgg cannot hide it, so the round aborts.
    monkeypatch.setattr(runner, "sample_clients", lambda n, r, cfg, seed: (1,))
    cfg = load_config(overrides=[*TINY, "train.rounds=1", "eval.before=false", 'aggregation.name="secagg"',
                                 "server.weighted=false", "eval.max_examples=4"])
    run_experiment(cfg, tmp_path)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["aborted"].startswith("TooFewClientsError") and "update_norm" not in rec
