"""The plaintext aggregator and the in-process transport: sums, dropouts, strict decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.fl.transport import run_round
from securefed.protocols import AGGREGATORS, SERVER, ClientInput, Message
from securefed.protocols.errors import (
    ConfigurationError,
    DecodeError,
    LocalProtocolError,
    RoundAbortedError,
)
from securefed.protocols.plaintext import decode_upload, encode_upload
from securefed.protocols.wire import pack


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), d=st.integers(1, 50), seed=st.integers(0, 1000), data=st.data())
def test_sum_equals_plaintext_sum_with_dropouts(n: int, d: int, seed: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    vecs = {i: rng.standard_normal(d).astype(np.float32) for i in range(n)}
    weights = {i: float(rng.integers(1, 100)) for i in range(n)}
    dropped = data.draw(st.sets(st.sampled_from(range(n)), max_size=n - 1))
    stage = data.draw(st.sampled_from(["start", "request", "upload"]))
    agg = AGGREGATORS.create("plaintext")
    out = run_round(agg.new_round(0, {i: ClientInput(vecs[i], weights[i]) for i in range(n)}), agg.stages,
                    {c: stage for c in dropped})
    alive = sorted(set(range(n)) - dropped)
    assert out.result.contributors == tuple(alive)
    want = sum(weights[i] * vecs[i].astype(np.float64) for i in alive)
    np.testing.assert_allclose(out.result.total, want, rtol=1e-6, atol=1e-6)
    assert out.result.total_weight == sum(weights[i] for i in alive)
    obs = out.observation
    assert set(obs.individual_updates or {}) == set(alive)  # plaintext: the server sees every update
    assert all(out.traffic.up[i] > 4 * d for i in alive)


def test_all_dropped_aborts() -> None:
    agg = AGGREGATORS.create("plaintext")
    rnd = agg.new_round(0, {0: ClientInput(np.zeros(3, np.float32))})
    with pytest.raises(RoundAbortedError):
        run_round(rnd, agg.stages, {0: "upload"})


def test_client_input_refuses_nan_and_negative_weight() -> None:
    with pytest.raises(ValueError, match="NaN"):
        ClientInput(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="weight"):
        ClientInput(np.zeros(2, np.float32), -1.0)


def test_unknown_aggregator_and_stage() -> None:
    with pytest.raises(ConfigurationError, match="plaintext"):
        AGGREGATORS.create("magic")
    agg = AGGREGATORS.create("plaintext")
    with pytest.raises(LocalProtocolError, match="stage"):
        run_round(agg.new_round(0, {0: ClientInput(np.zeros(2, np.float32))}), agg.stages, {0: "nowhere"})


def test_malformed_upload_excludes_only_that_client() -> None:
    agg = AGGREGATORS.create("plaintext")
    rnd = agg.new_round(0, {0: ClientInput(np.ones(4, np.float32)), 1: ClientInput(np.ones(4, np.float32))})
    # Client 1 is replaced by a peer that sends a truncated upload.
    honest = rnd.clients[1]

    class Truncating:
        party_id = 1

        def receive(self, m: Message) -> list[Message]:
            (reply,) = honest.receive(m)
            return [Message(1, SERVER, reply.stage, reply.payload[:-3])]

    rnd.clients = {0: rnd.clients[0], 1: Truncating()}  # type: ignore[dict-item]
    out = run_round(rnd, agg.stages)
    assert out.result.contributors == (0,)
    assert "DecodeError" in out.excluded[1]
    np.testing.assert_array_equal(out.result.total, np.ones(4))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_upload_decoder_fuzz_only_typed_errors(blob: bytes) -> None:
    try:
        decode_upload(blob, dim=4)
    except DecodeError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_upload_decoder_mutations(pos: int, junk: bytes) -> None:
    good = encode_upload(3, np.arange(4, dtype=np.float32), 2.0)
    i = pos % len(good)
    bad = good[:i] + junk + good[i + len(junk):]
    try:
        r, v, w = decode_upload(bad, dim=4)
    except DecodeError:
        return
    assert v.shape == (4,) and np.isfinite(v).all()


def test_upload_decoder_rejects_nonfinite_and_oversize() -> None:
    with pytest.raises(DecodeError, match="NaN"):
        decode_upload(encode_upload(0, np.array([np.inf, 0, 0, 0], np.float32), 1.0), dim=4)
    with pytest.raises(DecodeError):
        decode_upload(encode_upload(0, np.zeros(5, np.float32), 1.0), dim=4)
    with pytest.raises(DecodeError, match="protocol"):
        decode_upload(pack(9, 2, b""), dim=4)
