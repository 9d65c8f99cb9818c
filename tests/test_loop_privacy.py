"""Differential privacy through the federated loop (tiny-llama): call order, accounting, budget stop, refusals.

Oracles: each client's epsilon is recomputed with Google's ``dp_accounting``
directly from the mechanism's parameters (q = B / n_c, sigma, steps x rounds);
the ledger must be committed before the adapter of a round is written; the
server's noise is checked against the DP-FedAvg formula ``(sum + N(0, (zS)^2)) / m``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from safetensors.numpy import load_file

from securefed.config import load_config
from securefed.errors import ConfigError
from securefed.fl import private, runner
from securefed.fl.runner import run_experiment
from securefed.privacy import dp_sgd
from securefed.privacy.errors import CalibrationError, UnsupportedMethodError

TINY = [
    "model.name=tiny-llama",
    "partition.clients=3",
    "partition.min_size=2",
    "partition.scheme=\"iid\"",
    "train.local_steps=2",
    "train.batch_size=4",
    "data.train_examples=120",
    "eval.max_examples=16",
    "data.max_length=32",
    "eval.before=false",
    'dp.accountant="rdp"',
]
SAMPLE = ["dp.sample.enabled=true", "dp.sample.clip=1.0"]
USER = ["dp.user.enabled=true", 'sampling.mode="poisson"', "sampling.rate=0.67", "server.weighted=false"]


def _lines(d: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def _rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return float(acc.get_epsilon(delta))


def test_sample_level_dp_runs_every_client_through_dp_sgd_and_accounts_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real = dp_sgd.train_dp_sgd

    def spy(*args: Any, **kw: Any) -> dp_sgd.DPSGDResult:
        res = real(*args, **kw)
        calls.append(kw | {"n": len(args[1]), "result": res})
        return res

    monkeypatch.setattr(dp_sgd, "train_dp_sgd", spy)
    cfg = load_config(overrides=[*TINY, *SAMPLE, "train.rounds=2", "dp.sample.noise_multiplier=1.3", "dp.delta=1e-5"])
    summary = run_experiment(cfg, tmp_path)
    lines = _lines(tmp_path)
    sizes = json.loads((tmp_path / "partition.json").read_text())["sizes"]
    # Every client of both rounds trained with DP-SGD at the configured parameters.
    assert len(calls) == 2 * 3
    for c in calls:
        assert c["noise_multiplier"] == 1.3 and c["clip"] == 1.0 and c["expected_batch_size"] == 4
        assert c["steps"] == 2 and c["result"].secure
    # Epsilon per client (oracle: dp_accounting on q = B / n_c over 2 rounds x 2 steps), max over clients.
    want = max(_rdp_epsilon(4 / n, 1.3, 4, 1e-5) for n in sizes)
    got = lines[-1]["privacy"]["sample_epsilon"]
    assert got == pytest.approx(want, rel=1e-6)
    assert lines[0]["privacy"]["sample_epsilon"] < got
    assert summary["privacy"]["spent"]["sample_epsilon"] == got
    for name in ("privacy-ledger.sqlite", "privacy-report.md", "privacy-report.json"):
        assert (tmp_path / name).exists(), name
    report = json.loads((tmp_path / "privacy-report.json").read_text())
    assert json.dumps(report).count("sample") > 0


def test_target_epsilon_is_reached_by_the_worst_client(tmp_path: Path) -> None:
    cfg = load_config(overrides=[*TINY, *SAMPLE, "train.rounds=2", "dp.sample.target_epsilon=4.0",
                                 "partition.scheme=\"quantity\""])
    summary = run_experiment(cfg, tmp_path)
    eps = summary["privacy"]["spent"]["sample_epsilon"]
    # Calibrated for the smallest client taking part in every round, which it does here.
    assert 3.8 <= eps <= 4.0 + 1e-6


def test_ledger_is_committed_before_the_round_model_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, list[str]]] = []
    real = runner.save_adapter

    def checked(exp: runner.Experiment, r: int) -> None:
        with sqlite3.connect(tmp_path / "privacy-ledger.sqlite") as con:
            seen.append((r, [s for (s,) in con.execute("SELECT status FROM rounds WHERE round = ?", (r,))]))
        real(exp, r)

    monkeypatch.setattr(runner, "save_adapter", checked)
    run_experiment(load_config(overrides=[*TINY, *SAMPLE, "train.rounds=2", "dp.sample.noise_multiplier=1.0"]), tmp_path)
    assert seen == [(1, ["committed"]), (2, ["committed"])]


def test_budget_stop_refuses_the_round_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[int] = []
    real = dp_sgd.train_dp_sgd
    def counted(*a: Any, **k: Any) -> dp_sgd.DPSGDResult:
        trained.append(1)
        return real(*a, **k)

    monkeypatch.setattr(dp_sgd, "train_dp_sgd", counted)
    one_round, two_rounds = _rdp_epsilon(4 / 40, 1.5, 2, 1e-5), _rdp_epsilon(4 / 40, 1.5, 4, 1e-5)
    budget = (one_round + two_rounds) / 2
    cfg = load_config(overrides=[*TINY, *SAMPLE, "train.rounds=4", "dp.sample.noise_multiplier=1.5",
                                 f"dp.budget.sample_epsilon={budget:.6f}"])
    summary = run_experiment(cfg, tmp_path)
    assert summary["stopped"]["round"] == 2 and summary["stopped"]["level"] == "sample"
    assert len(trained) == 3  # round 1 only
    lines = _lines(tmp_path)
    assert [x["round"] for x in lines] == [1, 2, 1] and "stopped" in lines[1] and "eval" in lines[2]
    assert load_file(str(tmp_path / "adapter.safetensors")) is not None
    with sqlite3.connect(tmp_path / "privacy-ledger.sqlite") as con:
        assert [r for (r,) in con.execute("SELECT round FROM rounds")] == [1]
    assert summary["privacy"]["spent"]["sample_epsilon"] == pytest.approx(one_round, rel=1e-6)


def test_user_level_dp_fedavg_noise_and_fixed_denominator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    real = private.DPFedAvg.release

    def spy(self: private.DPFedAvg, result: Any, dim: int) -> Any:
        out = real(self, result, dim)
        seen.setdefault("rounds", []).append((np.asarray(result.total, dtype=np.float64).copy(), out))
        return out

    monkeypatch.setattr(private.DPFedAvg, "release", spy)
    cfg = load_config(overrides=[*TINY, *USER, "train.rounds=3", "dp.user.noise_multiplier=1.0", "dp.user.clip=0.05",
                                 'aggregation.name="secagg"', "aggregation.options={dropout_rate = 0.0}"])
    summary = run_experiment(cfg, tmp_path)
    lines = _lines(tmp_path)
    m = 0.67 * 3
    for (total, rel), rec in zip(seen["rounds"], lines, strict=True):
        noise = rel.average.astype(np.float64) * m - total  # the server's noise, recovered
        assert rel.noise_std == pytest.approx(0.05)
        assert abs(np.std(noise) / 0.05 - 1) < 0.05  # dim is in the thousands
        if rec.get("contributors"):
            # Each clipped update has norm <= S, so the sum has norm <= |contributors| S.
            assert np.linalg.norm(total) <= len(rec["contributors"]) * 0.05 * (1 + 1e-4)
        assert rec["privacy"]["noise_std"] == pytest.approx(0.05)
    assert lines[-1]["privacy"]["user_delta"] == 1e-5
    assert lines[-1]["privacy"]["user_epsilon"] == pytest.approx(_rdp_epsilon(0.67, 1.0, 3, 1e-5), rel=1e-6)
    assert summary["privacy"]["resolved"]["noise_user"] == 1.0


def test_an_empty_poisson_sample_still_releases_noise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(private.LoopPrivacy, "sample_clients", lambda self, n: ())
    cfg = load_config(overrides=[*TINY, *USER, "train.rounds=1", "dp.user.noise_multiplier=1.0", "dp.user.clip=0.05",
                                 "eval.max_examples=4"])
    run_experiment(cfg, tmp_path)
    (rec,) = _lines(tmp_path)
    assert rec["aborted"] == "no client was sampled"
    assert rec["update_norm"] > 0 and rec["privacy"]["user_epsilon"] > 0


def test_adaptive_clipping_moves_the_clip_and_records_it(tmp_path: Path) -> None:
    cfg = load_config(overrides=[*TINY, *USER, "train.rounds=3", "dp.user.noise_multiplier=1.0", "dp.user.clip=10.0",
                                 'dp.user.clipping="adaptive"', "dp.user.count_noise_multiplier=1.0",
                                 "dp.user.clip_learning_rate=0.5", "eval.max_examples=4"])
    run_experiment(cfg, tmp_path)
    clips = [x["privacy"]["clip"] for x in _lines(tmp_path)]
    nexts = [x["privacy"]["next_clip"] for x in _lines(tmp_path)]
    assert clips[1:] == nexts[:-1] and clips[0] == 10.0 and len(set(clips)) == 3


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ([*USER[:1], "dp.user.noise_multiplier=1.0", "server.weighted=false"], "sampling.mode"),
        ([*USER[:3], "dp.user.noise_multiplier=1.0"], "server.weighted"),
        ([*SAMPLE, "dp.sample.noise_multiplier=1.0", "train.local_epochs=1.0"], "train.local_epochs"),
        ([*SAMPLE, "dp.sample.noise_multiplier=1.0", "train.grad_accum=2"], "train.grad_accum"),
        ([*SAMPLE, "dp.sample.noise_multiplier=1.0", "train.max_grad_norm=1.0"], "train.max_grad_norm"),
        ([*SAMPLE, "dp.sample.noise_multiplier=1.0", "train.fedprox_mu=0.1"], "train.fedprox_mu"),
    ],
)
def test_loop_settings_the_accounting_cannot_cover_are_refused(overrides: list[str], key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        run_experiment(load_config(overrides=[*TINY, *overrides]), tmp_path)
    assert err.value.key == key
    assert not (tmp_path / "privacy-ledger.sqlite").exists()


def test_unreachable_target_and_unsupported_method_are_refused_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CalibrationError):
        run_experiment(load_config(overrides=[*TINY, *SAMPLE, "dp.sample.target_epsilon=1e-6"]), tmp_path / "a")
    monkeypatch.setattr(private, "check_dp_support", lambda *a, **k: (_ for _ in ()).throw(
        UnsupportedMethodError("refused under DP: test")))
    with pytest.raises(UnsupportedMethodError):
        run_experiment(load_config(overrides=[*TINY, *SAMPLE, "dp.sample.noise_multiplier=1.0"]), tmp_path / "b")


def test_cli_run_states_the_guarantee(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from securefed.cli import app

    sets = [x for o in [*TINY, *SAMPLE, "train.rounds=1", "dp.sample.noise_multiplier=2.0"] for x in ("--set", o)]
    out = CliRunner().invoke(app, ["run", "--quiet", "--run-dir", str(tmp_path), *sets])
    assert out.exit_code == 0, out.output
    assert "sample-level DP: epsilon" in out.output and "delta 1.0e-05" in out.output
    report = CliRunner().invoke(app, ["privacy-report", str(tmp_path)])
    assert report.exit_code == 0 and "privacy-report.md" in report.output


def test_recorded_views_announce_the_dp_recipe(tmp_path: Path) -> None:
    from securefed.attacks import load_views

    cfg = load_config(overrides=[*TINY, *SAMPLE, "train.rounds=1", "dp.sample.noise_multiplier=1.7",
                                 "attack.record=true", "eval.max_examples=4"])
    run_experiment(cfg, tmp_path)
    (view,) = load_views(tmp_path / "views")
    assert view.public.dp_level == "sample" and view.public.dp_noise_multiplier == 1.7 and view.public.dp_clip == 1.0
