"""Resuming a run: exact continuation, and a DP run SIGKILLed mid-round that resumes without forgetting budget.

Oracles: an uninterrupted run of the same config (the resumed adapter must
match it bit for bit when training is deterministic, FedAdam state included);
the privacy ledger read before the kill (the epsilon after resuming is never
lower, and the cut-off round stays charged as ``interrupted``).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_loop import (
    TINY as LOOP_TINY,  # the tests directory is on sys.path (pytest's prepend import mode)
)

from securefed.config import load_config
from securefed.errors import RunError
from securefed.fl import runner
from securefed.fl.checkpoint import CHECKPOINT
from securefed.fl.client import LocalTrainer
from securefed.fl.runner import run_experiment
from securefed.privacy.errors import LedgerError
from securefed.privacy.report import privacy_summary

TINY = [*LOOP_TINY, "eval.max_examples=8", "train.rounds=3", "server.optimizer=fedadam"]


def _rounds(d: Path) -> list[int]:
    return [json.loads(x)["round"] for x in (d / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_matches_an_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(overrides=TINY)
    run_experiment(cfg, tmp_path / "whole")
    real = LocalTrainer.train

    def crash_in_round_2(self: LocalTrainer, client: int, r: int, *a: object, **k: object) -> object:
        if r == 2 and client > 0:
            raise RuntimeError("simulated crash")
        return real(self, client, r, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalTrainer, "train", crash_in_round_2)
    with pytest.raises(RuntimeError):
        run_experiment(cfg, tmp_path / "cut")
    assert _rounds(tmp_path / "cut") == [0, 1]
    monkeypatch.setattr(LocalTrainer, "train", real)
    summary = run_experiment(cfg, tmp_path / "cut", resume=True)
    assert summary["resumed_after_round"] == 1
    assert _rounds(tmp_path / "cut") == [0, 1, 2, 3]
    a = load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert summary["baseline_eval"] == json.loads((tmp_path / "whole" / "summary.json").read_text())["baseline_eval"]


def test_resume_refuses_another_config_a_missing_ledger_and_a_damaged_checkpoint(tmp_path: Path) -> None:
    cfg = load_config(overrides=[*TINY, "train.rounds=1", "eval.before=false"])
    run_experiment(cfg, tmp_path)
    with pytest.raises(RunError, match="config differs"):
        run_experiment(load_config(overrides=[*TINY, "train.rounds=2", "eval.before=false"]), tmp_path, resume=True)
    with pytest.raises(RunError, match="no run to resume"):
        run_experiment(cfg, tmp_path / "nothing", resume=True)
    # A DP config on a run that has no ledger: refuse rather than start the accounting from zero.
    dp = load_config(overrides=[*TINY, "train.rounds=1", "eval.before=false", "dp.sample.enabled=true",
                                "dp.sample.noise_multiplier=1.0"])
    (tmp_path / "config.toml").write_text(runner.to_toml(dp))
    with pytest.raises(LedgerError):
        run_experiment(dp, tmp_path, resume=True)
    (tmp_path / "config.toml").write_text(runner.to_toml(cfg))
    (tmp_path / CHECKPOINT).write_bytes(b"\x00" * 40)
    with pytest.raises(RunError, match="unreadable"):
        run_experiment(cfg, tmp_path, resume=True)


DP_RUN = [*TINY[:-2], "train.rounds=3", "train.local_steps=8", "eval.before=false", "run.threads=1", "dp.sample.enabled=true",
          "dp.sample.noise_multiplier=1.0", 'dp.accountant="rdp"']


def _cli(run_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "securefed.cli", "run", "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def test_sigkill_mid_round_then_resume_keeps_every_charge(tmp_path: Path) -> None:
    sets = [x for o in DP_RUN for x in ("--set", o)]
    proc = _cli(tmp_path, "--run-dir", str(tmp_path), *sets)
    ledger = tmp_path / "privacy-ledger.sqlite"
    deadline = time.monotonic() + 240
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.exists():
            try:
                with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as con:
                    rows = con.execute("SELECT round, status FROM rounds").fetchall()
            except sqlite3.OperationalError:
                rows = []
            if (2, "planned") in rows:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed, "the run finished or stalled before round 2 was planned"
    before = privacy_summary(tmp_path)["levels"]["sample"]["epsilon_max"]
    assert _rounds(tmp_path) == [1]

    resumed = _cli(tmp_path, "--resume", str(tmp_path))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out.decode()[-2000:]
    assert "sample-level DP: epsilon" in out.decode()
    with sqlite3.connect(ledger) as con:
        rows = con.execute("SELECT round, status FROM rounds ORDER BY seq").fetchall()
    assert rows == [(1, "committed"), (2, "interrupted"), (2, "committed"), (3, "committed")]
    after = privacy_summary(tmp_path)["levels"]["sample"]["epsilon_max"]
    assert after > before
    # The interrupted round is charged on top of the three that ran: four rounds' worth per client.
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["privacy"]["spent"]["sample_epsilon"] == pytest.approx(after, rel=1e-9)
    assert _rounds(tmp_path) == [1, 2, 3]
