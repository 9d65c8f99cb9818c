"""Crash safety: SIGKILL a DP job mid-round, resume it, and check nothing was forgotten.

The job (this file run as a script) trains LoRA on a tiny random Llama with
DP-SGD in two clients and DP-FedAvg on the server, recording every round in
the privacy ledger through PrivacySession. The test kills it with SIGKILL
while round 2 is training (its plan recorded, nothing committed), then:

* the epsilon read from the ledger before the kill (which already charges the
  planned round) is never higher than the epsilon after resuming;
* the interrupted round stays charged at its plan;
* the resumed job runs until the budget guard refuses a round, and a further
  attempt after that is refused too, without anything being recorded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from securefed.privacy.budget import level_epsilon
from securefed.privacy.config import BudgetConfig, DPConfig, SampleDPConfig, UserDPConfig
from securefed.privacy.errors import BudgetExceededError
from securefed.privacy.events import GaussianEvent, PoissonSampledEvent
from securefed.privacy.ledger import LEDGER_FILE, PrivacyLedger
from securefed.privacy.session import PrivacySession, RunShape

CFG = DPConfig(
    sample=SampleDPConfig(enabled=True, noise_multiplier=1.0, clip=1.0),
    user=UserDPConfig(enabled=True, noise_multiplier=3.0, clip=1.0),
    budget=BudgetConfig(sample_epsilon=50.0, user_epsilon=3.0),
    accountant="rdp",
)
SHAPE = RunShape(client_sizes=(24, 24), rounds=50, expected_clients=2, local_steps=2, expected_batch_size=4)
RUN_ID = "crash-test"
REFUSED_EXIT = 3


def _spent(run_dir: Path) -> tuple[float, float]:
    """(max sample epsilon, user epsilon) from the ledger, counting planned and interrupted rounds."""
    with PrivacyLedger.open(run_dir / LEDGER_FILE) as led:
        s = level_epsilon("sample", led.history("sample"), 1e-5, accountant="rdp").epsilon
        u = level_epsilon("user", led.history("user"), 1e-5, accountant="rdp").epsilon
    return s, u


def job(run_dir: Path, resume: bool, pause: float) -> int:  # pragma: no cover - runs in a subprocess
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from securefed.peft.spec import AdapterSpec
    from securefed.privacy.dp_sgd import train_dp_sgd
    from securefed.privacy.secure_noise import SecureNoise
    from securefed.privacy.user_level import DPFedAvg
    from securefed.protocols.base import AggregateResult

    log = (run_dir / "progress.log").open("a")

    def say(msg: str) -> None:
        log.write(msg + "\n")
        log.flush()
        os.fsync(log.fileno())

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    spec = AdapterSpec.from_state("lora", {n: p for n, p in model.named_parameters() if p.requires_grad})
    g = torch.Generator().manual_seed(1)
    data = {c: [torch.randint(0, 200, (8,), generator=g) for _ in range(n)] for c, n in enumerate(SHAPE.client_sizes)}

    def loss(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        logits = m(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    session = PrivacySession.open(run_dir, CFG, shape=SHAPE, run_id=RUN_ID, resume=resume)
    s = session.spent()
    say(f"open sample={s.sample.epsilon!r} user={s.user.epsilon!r} interrupted={session.interrupted_rounds}")  # type: ignore[union-attr]
    noise = SecureNoise()
    fed = DPFedAvg(CFG.user, noise_multiplier=session.user_noise_multiplier or 0.0, num_clients=2,
                   expected_clients=SHAPE.expected_clients, noise=noise, clip=session.resume_clip())
    last = session.ledger.last_committed_round()
    global_vec = spec.flatten({n: p for n, p in model.named_parameters() if p.requires_grad})
    for r in range(0 if last is None else last + 1, SHAPE.rounds):
        try:
            ticket = session.plan_round(
                r, sample={c: session.planned_sample_event(c) for c in data}, user=fed.round_event()
            )
        except BudgetExceededError as err:
            say(f"refused {r} {err.level} {err.projected!r}")
            return REFUSED_EXIT
        say(f"planned {r}")
        time.sleep(pause)  # the window in which the test kills us: plan recorded, nothing committed
        inputs, events = [], {}
        for c, examples in data.items():
            state = spec.unflatten(global_vec)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(state[n])
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
            res = train_dp_sgd(model, examples, make_batch=torch.stack, per_example_loss=loss, optimizer=opt,
                               steps=SHAPE.local_steps, expected_batch_size=SHAPE.expected_batch_size,
                               noise_multiplier=session.sample_noise_multiplier or 0.0, clip=CFG.sample.clip, noise=noise)
            events[c] = res.event
            new = spec.flatten({n: p for n, p in model.named_parameters() if p.requires_grad})
            inputs.append(fed.client_input(new - global_vec))
        total = np.sum([i.vector.astype(np.float64) for i in inputs], axis=0)
        release = fed.release(AggregateResult(total, float(len(inputs)), tuple(data)), spec.dim)
        session.commit_round(ticket, sample=events, user=release.event, info=release.info())
        fed.advance(release)
        global_vec = (global_vec + release.average).astype(np.float32)  # released only after the commit
        say(f"committed {r}")
    return 0


def _start(run_dir: Path, resume: bool, pause: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, __file__, str(run_dir), "resume" if resume else "new", str(pause)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def _lines(run_dir: Path) -> list[str]:
    p = run_dir / "progress.log"
    return p.read_text().splitlines() if p.exists() else []


def test_sigkill_mid_round_then_resume(tmp_path: Path) -> None:
    proc = _start(tmp_path, resume=False, pause=4.0)
    deadline = time.monotonic() + 240
    while "planned 2" not in _lines(tmp_path):
        if proc.poll() is not None:
            pytest.fail(f"job exited early: {proc.stdout.read().decode()[-3000:] if proc.stdout else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("job did not reach round 2 in time")
        time.sleep(0.05)
    before = _spent(tmp_path)  # includes the planned, uncommitted round 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert "committed 2" not in _lines(tmp_path)

    after_open = _spent(tmp_path)
    assert after_open[0] >= before[0] and after_open[1] >= before[1]

    proc = _start(tmp_path, resume=True, pause=0.0)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == REFUSED_EXIT, out[-3000:]
    lines = _lines(tmp_path)
    opened = [ln for ln in lines if ln.startswith("open")][-1]
    assert "interrupted=[2]" in opened
    resumed_user = float(opened.split("user=")[1].split()[0])
    assert resumed_user >= before[1] - 1e-12
    assert any(ln.startswith("refused") for ln in lines)

    with PrivacyLedger.open(tmp_path / LEDGER_FILE, run_id=RUN_ID) as led:
        statuses = [r.status for r in led.rounds()]
        assert statuses.count("interrupted") == 1 and "planned" not in statuses
        assert [r.round for r in led.rounds() if r.status == "interrupted"] == [2]
        # round 2 was re-run as a new entry after the interrupted one
        assert [r.round for r in led.rounds()].count(2) == 2
    final = _spent(tmp_path)
    assert CFG.budget.user_epsilon is not None
    assert after_open[1] <= final[1] <= CFG.budget.user_epsilon

    # The guard still refuses, and refusing records nothing.
    session = PrivacySession.open(tmp_path, CFG, shape=SHAPE, run_id=RUN_ID, resume=True)
    n = len(session.ledger.rounds())
    with pytest.raises(BudgetExceededError):
        session.plan_round(99, user=PoissonSampledEvent(1.0, GaussianEvent(3.0)))
    assert len(session.ledger.rounds()) == n
    session.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(job(Path(sys.argv[1]), sys.argv[2] == "resume", float(sys.argv[3])))
