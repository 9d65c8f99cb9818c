"""The privacy ledger: schema round trip, strict event decoding, refusal of damaged or foreign
ledgers, interrupted rounds, the session's budget guard, and the report."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.privacy.accountants import epsilon_of
from securefed.privacy.config import BudgetConfig, DPConfig, SampleDPConfig, UserDPConfig
from securefed.privacy.errors import (
    BudgetExceededError,
    EventDecodeError,
    LedgerCorruptError,
    LedgerError,
    LedgerMismatchError,
)
from securefed.privacy.events import (
    ComposedEvent,
    DiscreteGaussianEvent,
    DpEvent,
    GaussianEvent,
    NonPrivateEvent,
    NoOpEvent,
    PoissonSampledEvent,
    SelfComposedEvent,
    SkellamEvent,
    dp_sgd_event,
    event_from_json,
    event_to_json,
)
from securefed.privacy.ledger import (
    LEDGER_FILE,
    SCHEMA_VERSION,
    LedgerHeader,
    PrivacyLedger,
    Release,
)
from securefed.privacy.report import write_privacy_report
from securefed.privacy.session import PrivacySession, RunShape

# -- events as data ----------------------------------------------------------------------------

pos = st.floats(0.05, 50.0, allow_nan=False)
prob = st.floats(0.0, 1.0, allow_nan=False)
leaves = st.one_of(
    st.just(NoOpEvent()),
    st.just(NonPrivateEvent()),
    pos.map(GaussianEvent),
    st.builds(DiscreteGaussianEvent, pos, pos),
    st.builds(SkellamEvent, pos, pos, pos),
)
events: st.SearchStrategy[DpEvent] = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(PoissonSampledEvent, prob, inner),
        st.builds(SelfComposedEvent, inner, st.integers(1, 10_000)),
        st.lists(inner, max_size=4).map(lambda xs: ComposedEvent(tuple(xs))),
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(events)
def test_event_json_round_trip(ev: DpEvent) -> None:
    text = event_to_json(ev)
    assert event_from_json(text) == ev
    assert event_to_json(event_from_json(text)) == text  # canonical


@pytest.mark.parametrize(
    "text",
    [
        '{"v":1,"event":{"kind":"laplace","noise_multiplier":1}}',
        '{"v":2,"event":{"kind":"noop"}}',
        '{"v":1,"event":{"kind":"gaussian","noise_multiplier":1,"extra":0}}',
        '{"v":1,"event":{"kind":"gaussian"}}',
        '{"v":1,"event":{"kind":"gaussian","noise_multiplier":"1"}}',
        '{"v":1,"event":{"kind":"gaussian","noise_multiplier":-1}}',
        '{"v":1,"event":{"kind":"poisson_sampled","sampling_probability":1.5,"event":{"kind":"noop"}}}',
        '{"v":1,"event":{"kind":"self_composed","count":1.5,"event":{"kind":"noop"}}}',
        '{"v":1,"event":{"kind":"self_composed","count":0,"event":{"kind":"noop"}}}',
        '{"v":1,"event":{"kind":"gaussian","noise_multiplier":1},"more":1}',
        "not json",
        "[]",
    ],
)
def test_event_decoder_is_strict(text: str) -> None:
    with pytest.raises(EventDecodeError):
        event_from_json(text)


def test_event_decoder_limits_depth_and_size() -> None:
    ev: DpEvent = GaussianEvent(1.0)
    for _ in range(40):
        ev = SelfComposedEvent(ev, 2)
    with pytest.raises(EventDecodeError, match="deeper"):
        event_from_json(event_to_json(ev))
    with pytest.raises(EventDecodeError, match="larger"):
        event_from_json("{" + " " * (1 << 20) + "}")


# -- ledger ------------------------------------------------------------------------------------


def header(run_id: str = "run-a", fp: str = "f" * 64) -> LedgerHeader:
    return LedgerHeader(run_id=run_id, fingerprint=fp, accountant="rdp", delta_sample=1e-5, delta_user=1e-5,
                        config={"note": "test"})


def fill(path: Path, rounds: int = 3) -> list[list[Release]]:
    written = []
    with PrivacyLedger.create(path, header()) as led:
        for r in range(rounds):
            rel = [Release("sample", str(c), dp_sgd_event(0.1, 1.0, 5 + r)) for c in range(3)]
            rel.append(Release("user", "server", PoissonSampledEvent(0.5, GaussianEvent(2.0))))
            seq = led.plan(r, rel, {"round": r})
            led.commit(seq, rel, {"round": r, "next_clip": 0.5 + r})
            written.append(rel)
    return written


def test_schema_round_trip(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    written = fill(path)
    with PrivacyLedger.open(path, run_id="run-a", fingerprint="f" * 64) as led:
        assert led.header.run_id == "run-a" and led.header.schema_version == SCHEMA_VERSION
        recs = led.rounds()
        assert [r.status for r in recs] == ["committed"] * 3
        for rec, rel in zip(recs, written, strict=True):
            assert sorted(rec.releases, key=lambda x: (x.level, x.subject)) == sorted(rel, key=lambda x: (x.level, x.subject))
        assert led.history("sample")["1"] == [dp_sgd_event(0.1, 1.0, 5 + r) for r in range(3)]
        assert led.last_committed_round() == 2 and led.last_info()["next_clip"] == 2.5
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # events are stored as JSON text, not blobs
    assert all(isinstance(e, str) and e.startswith('{"event"') for (e,) in con.execute("SELECT event FROM releases"))
    con.close()


def _tamper(path: Path, sql: str) -> None:
    con = sqlite3.connect(path)
    con.execute(sql)
    con.commit()
    con.close()


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE releases SET event = replace(event, '2.0', '9.0') WHERE seq = 2 AND level = 'user'",
        "DELETE FROM releases WHERE seq = 3 AND subject = '0'",
        "DELETE FROM rounds WHERE seq = 3",
        "UPDATE rounds SET status = 'planned' WHERE seq = 1",
        "UPDATE meta SET value = '2' WHERE key = 'rows'",
        "PRAGMA user_version = 7",
    ],
)
def test_tampered_ledger_refuses_to_resume(tmp_path: Path, sql: str) -> None:
    path = tmp_path / LEDGER_FILE
    fill(path)
    _tamper(path, sql)
    with pytest.raises(LedgerCorruptError):
        PrivacyLedger.open(path, run_id="run-a")


def test_truncated_garbage_and_missing_ledgers_refuse(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    with pytest.raises(LedgerCorruptError, match="zero spent budget"):
        PrivacyLedger.open(path)
    fill(path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(LedgerCorruptError):
            PrivacyLedger.open(path)
    path.write_bytes(b"x" * 8192)
    with pytest.raises(LedgerCorruptError, match="not a SQLite"):
        PrivacyLedger.open(path)


def test_rows_from_another_ledger_break_the_chain(tmp_path: Path) -> None:
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    fill(a)
    with PrivacyLedger.create(b, header(run_id="run-b")):
        pass
    con = sqlite3.connect(b)
    con.execute("ATTACH DATABASE ? AS other", (str(a),))
    con.execute("INSERT INTO rounds SELECT * FROM other.rounds")
    con.execute("INSERT INTO releases SELECT * FROM other.releases")
    con.execute("UPDATE meta SET value = (SELECT value FROM other.meta WHERE key = 'head') WHERE key = 'head'")
    con.execute("UPDATE meta SET value = '3' WHERE key = 'rows'")
    con.commit()
    con.close()
    with pytest.raises(LedgerCorruptError, match="hash chain"):
        PrivacyLedger.open(b)


def test_foreign_or_reconfigured_ledger_refuses(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    fill(path)
    with pytest.raises(LedgerMismatchError, match="belongs to run"):
        PrivacyLedger.open(path, run_id="run-b")
    with pytest.raises(LedgerMismatchError, match="configuration changed"):
        PrivacyLedger.open(path, run_id="run-a", fingerprint="0" * 64)
    with pytest.raises(LedgerError, match="already exists"):
        PrivacyLedger.create(path, header())


def test_open_plan_is_charged_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    fill(path, rounds=1)
    led = PrivacyLedger.open(path)
    plan = [Release("user", "server", PoissonSampledEvent(0.5, GaussianEvent(2.0)))]
    led.plan(1, plan)
    with pytest.raises(LedgerError, match="still open"):
        led.plan(2, plan)
    led.close()  # "crash": never committed
    with PrivacyLedger.open(path) as led:
        assert [r.status for r in led.rounds()] == ["committed", "planned"]
        assert led.mark_interrupted() == [1]
        assert [r.status for r in led.rounds()] == ["committed", "interrupted"]
        assert len(led.history("user")["server"]) == 2
    PrivacyLedger.open(path).close()  # still verifies after the status change


# -- session, guard and report -------------------------------------------------------------------


CFG = DPConfig(
    sample=SampleDPConfig(enabled=True, noise_multiplier=1.2, clip=1.0),
    user=UserDPConfig(enabled=True, noise_multiplier=1.5, clip=0.5),
    budget=BudgetConfig(sample_epsilon=4.0, user_epsilon=3.0),
    accountant="rdp",
)
SHAPE = RunShape(client_sizes=(200, 400, 300), rounds=20, expected_clients=1.5, local_steps=5, expected_batch_size=8)


def run_rounds(s: PrivacySession, start: int, n: int) -> int:
    done = 0
    for r in range(start, start + n):
        sample = {c: s.planned_sample_event(c) for c in (0, 2)}
        user = PoissonSampledEvent(s.client_sampling_rate, GaussianEvent(s.user_noise_multiplier or 0))
        try:
            t = s.plan_round(r, sample=sample, user=user)
        except BudgetExceededError:
            return done
        s.commit_round(t, sample=sample, user=user, info={"next_clip": 0.5})
        done += 1
    return done


def test_guard_refuses_before_recording_and_report_matches(tmp_path: Path) -> None:
    s = PrivacySession.open(tmp_path, CFG, shape=SHAPE, run_id="g")
    done = run_rounds(s, 0, 100)
    assert 0 < done < 100
    spent = s.spent()
    assert spent.user is not None and spent.sample is not None
    assert spent.user.epsilon <= 3.0 and spent.sample.epsilon <= 4.0
    entries = len(s.ledger.rounds())
    with pytest.raises(BudgetExceededError) as info:
        run_rounds_strict(s, done)
    assert info.value.level in ("sample", "user") and info.value.projected > info.value.budget
    assert len(s.ledger.rounds()) == entries  # nothing recorded for the refused round
    # the user-level epsilon equals an independent recomputation from the events
    user_events = [PoissonSampledEvent(0.5, GaussianEvent(1.5))] * done
    assert spent.user.epsilon == pytest.approx(epsilon_of(user_events, 1e-5, accountant="rdp"), rel=1e-9)
    s.close()
    out = write_privacy_report(tmp_path)
    assert all(p.is_file() and p.stat().st_size > 0 for p in out.values())
    rep = json.loads(out["json"].read_text())
    assert rep["levels"]["user"]["epsilon"] == pytest.approx(spent.user.epsilon)
    assert rep["levels"]["sample"]["epsilon_max"] == pytest.approx(spent.sample.epsilon)
    assert set(rep["levels"]["sample"]["per_client"]) == {"0", "2"}
    assert len(rep["timeline"]) == done
    md = out["markdown"].read_text()
    assert "NOT against the server itself" in md and "add-or-remove one training example" in md
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_rounds_strict(s: PrivacySession, r: int) -> None:
    sample = {c: s.planned_sample_event(c) for c in (0, 2)}
    s.plan_round(r, sample=sample, user=PoissonSampledEvent(s.client_sampling_rate, GaussianEvent(s.user_noise_multiplier or 0)))


def test_session_resume_checks_config_and_shape(tmp_path: Path) -> None:
    s = PrivacySession.open(tmp_path, CFG, shape=SHAPE, run_id="g")
    run_rounds(s, 0, 2)
    before = s.spent()
    s.close()
    other = DPConfig(sample=SampleDPConfig(enabled=True, noise_multiplier=2.0), accountant="rdp")
    with pytest.raises(LedgerMismatchError, match="configuration changed"):
        PrivacySession.open(tmp_path, other, shape=SHAPE, run_id="g", resume=True)
    with pytest.raises(LedgerMismatchError):
        PrivacySession.open(tmp_path, CFG, shape=RunShape((200, 400, 300), 30, 1.5, 5, 8), run_id="g", resume=True)
    with pytest.raises(LedgerError, match="already exists"):
        PrivacySession.open(tmp_path, CFG, shape=SHAPE, run_id="g")
    again = PrivacySession.open(tmp_path, CFG, shape=SHAPE, run_id="g", resume=True)
    assert again.spent().user.epsilon == pytest.approx(before.user.epsilon)  # type: ignore[union-attr]
    assert again.resume_clip() == 0.5
    again.close()


def test_commit_of_more_than_planned_is_recorded_then_raised(tmp_path: Path) -> None:
    s = PrivacySession.open(tmp_path, CFG, shape=SHAPE, run_id="g")
    t = s.plan_round(0, sample={0: s.planned_sample_event(0, steps=2)})
    with pytest.raises(LedgerError, match="more than it planned"):
        s.commit_round(t, sample={0: s.planned_sample_event(0, steps=50), 1: s.planned_sample_event(1)})
    hist = s.ledger.history("sample")
    assert hist["0"] == [s.planned_sample_event(0, steps=50)] and "1" in hist  # truth recorded
    assert math.isfinite(s.spent().sample.epsilon)  # type: ignore[union-attr]
    s.close()
