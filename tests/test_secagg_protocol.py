"""SecAgg / SecAgg+ end to end through the loop's transport, against oracles.

The oracle for success is written here from the protocol's definition (who
holds whose shares after each stage), not from the server's code; the oracle
for the value is the exact plaintext sum of exactly-encodable updates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_secagg_harness import exact_inputs, expected_total, make

from securefed.fl.transport import run_round
from securefed.protocols import AGGREGATORS, ClientInput
from securefed.protocols.errors import ConfigurationError, OverflowRiskError, RoundAbortedError
from securefed.protocols.secagg import STAGES, NeighbourGraph, NonFiniteUpdateError, SecAggRound
from securefed.protocols.secagg.messages import Kind, Limits, UnmaskResponse, peek_kind

DROP_CHOICES = [None, "start", *STAGES]


def _index(stage: str | None) -> int:
    if stage is None:
        return len(STAGES)
    return max(0, STAGES.index(stage)) if stage != "start" else 0


def oracle(graph: NeighbourGraph, t: int, drops: dict[int, str | None], authenticated: bool) -> tuple[bool, set[int]]:
    """Does the round complete, and who contributes? Derived from share holdings alone."""
    ids = set(graph.clients)

    def alive_after(s: int) -> set[int]:
        return {c for c in ids if _index(drops.get(c)) > s}

    u1, u2, u3, u4, u5 = (alive_after(s) for s in range(5))
    if not authenticated:
        u4 = u3  # no consistency stage: a dropout named there takes effect at unmasking

    def neighbourhoods_ok(live: set[int], who: set[int]) -> bool:
        return all(len(graph.holders(c) & live) >= t for c in who)

    needed_keys = {j for j in u2 - u3 if graph.neighbours(j) & u3}

    def shares_ok(live: set[int]) -> bool:
        seeds = all(len(graph.holders(i) & live) >= t for i in u3)
        keys = all(len(graph.neighbours(j) & live) >= t for j in needed_keys)
        return seeds and keys

    ok = (
        bool(u1) and neighbourhoods_ok(u1, u1)
        and bool(u2) and neighbourhoods_ok(u2, u2)
        and bool(u3) and neighbourhoods_ok(u3, u3) and shares_ok(u3)
        and (not authenticated or (neighbourhoods_ok(u4, u4) and shares_ok(u4)))
        and shares_ok(u5)
    )
    return ok, u3


def assert_no_single_client_unmaskable(rnd: SecAggRound, t: int) -> None:
    """From what the server holds, no individual masked input can be unmasked."""
    obs = rnd.server.observation()
    graph = rnd.server.graph
    limits = Limits(len(graph.clients), 1 << 20, 32)
    seed_count: dict[int, int] = {}
    key_count: dict[int, int] = {}
    for m in obs.transcript:
        if peek_kind(m.payload) is Kind.UNMASK_RESPONSE:
            r = UnmaskResponse.decode(m.payload, limits)
            for j, _ in r.seed_shares:
                seed_count[j] = seed_count.get(j, 0) + 1
            for j, _ in r.key_shares:
                key_count[j] = key_count.get(j, 0) + 1
    masked = obs.masked_updates or {}
    shared = {m.sender for m in obs.transcript if peek_kind(m.payload) is Kind.SHARE_KEYS}
    for i in masked:
        seed_known = seed_count.get(i, 0) >= t
        own_key = key_count.get(i, 0) >= t
        peer_keys = all(key_count.get(j, 0) >= t for j in graph.neighbours(i) & shared)
        assert not (seed_known and (own_key or peer_keys)), f"client {i} could be unmasked"
        assert not (seed_known and own_key), f"server holds both shares of client {i}"


@st.composite
def scenarios(draw):  # type: ignore[no-untyped-def]
    n = draw(st.integers(3, 60))
    d = draw(st.integers(1, 12))
    sparse = n >= 5 and draw(st.booleans())
    authenticated = draw(st.integers(0, 3)) == 0
    k = draw(st.sampled_from(list(range(2, n - 1, 2)))) if sparse else n - 1
    # Smallest secure threshold with no corrupt clients, written out independently of the finder.
    t_min = (k + 1) // 2 + 1 if authenticated else 2
    t = draw(st.integers(t_min, k + 1))
    p = draw(st.sampled_from([0.0, 0.05, 0.15, 0.4]))
    drops = {}
    for c in range(n):
        if draw(st.floats(0, 1)) < p:
            drops[c] = draw(st.sampled_from(DROP_CHOICES[1:]))
    return n, d, sparse, authenticated, k, t, drops


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario=scenarios(), seed=st.integers(0, 2**32 - 1))
def test_unmasked_sum_equals_plaintext_sum_or_round_aborts(scenario, seed) -> None:  # type: ignore[no-untyped-def]
    n, d, sparse, authenticated, k, t, drops = scenario
    rng = np.random.default_rng(seed)
    inputs = exact_inputs(rng, n, d, max_weight=4)
    opts: dict[str, object] = dict(threshold=t, corrupt_fraction=0.0, authenticated=authenticated, max_weight=4.0)
    if sparse:
        agg = make("secagg+", k=k, **opts)
    else:
        agg = make("secagg", **opts)
    rnd = agg.new_round(7, inputs)
    assert rnd.server.parameters.threshold == t
    should_succeed, survivors = oracle(rnd.server.graph, t, drops, authenticated)
    event("completes" if should_succeed else "aborts")
    event("dropouts" if drops else "no dropouts")
    if should_succeed:
        res = run_round(rnd, agg.stages, drops).result
        assert res.contributors == tuple(sorted(survivors))
        np.testing.assert_array_equal(res.total, expected_total(inputs, res.contributors))
        assert res.total_weight == sum(inputs[c].weight for c in res.contributors)
        assert res.measurements["dropped"] == n - len(survivors)
    else:
        with pytest.raises(RoundAbortedError):
            run_round(rnd, agg.stages, drops)
        assert not rnd.server.finished
    assert_no_single_client_unmaskable(rnd, t)


@pytest.mark.parametrize("name", ["secagg", "secagg+"])
@pytest.mark.parametrize("authenticated", [False, True])
@pytest.mark.parametrize("stage", DROP_CHOICES[1:])
def test_loop_dropouts_at_each_stage(name: str, authenticated: bool, stage: str) -> None:
    """Two clients of 16 drop at the named stage; the sum covers exactly the right survivors."""
    rng = np.random.default_rng(11)
    inputs = exact_inputs(rng, 16, 9)
    agg = make(name, authenticated=authenticated, corrupt_fraction=0.0, dropout_rate=0.2)
    rnd = agg.new_round(1, inputs)
    drops = {3: stage, 12: stage}
    late = STAGES.index(stage) >= STAGES.index("consistency_check") if stage != "start" else False
    expect = tuple(sorted(set(range(16)) - (set() if late else {3, 12})))
    out = run_round(rnd, agg.stages, drops)
    assert out.result.contributors == expect
    np.testing.assert_array_equal(out.result.total, expected_total(inputs, expect))
    assert out.observation.masked_updates is not None
    assert set(out.observation.masked_updates) == (set(range(16)) if late else set(expect))
    assert out.observation.aggregate is out.result.total
    assert out.dropped == drops


def test_weighted_sums_and_clip_count() -> None:
    """total = sum w_i clip(x_i), total_weight = sum w_i, clipped entries summed securely."""
    rng = np.random.default_rng(5)
    n, d = 9, 300
    inputs = {c: ClientInput((rng.standard_normal(d) * 0.8).astype(np.float32), weight=float(rng.integers(1, 50)))
              for c in range(n)}
    agg = AGGREGATORS.create("secagg+", clip=1.0, scale_bits=14, max_weight=64.0, corrupt_fraction=0.0)
    res = run_round(agg.new_round(0, inputs), agg.stages).result
    exp = expected_total(inputs, res.contributors)
    # n stochastic roundings of at most one step each
    assert np.max(np.abs(res.total - exp)) <= n * 2.0**-14
    assert res.total_weight == sum(v.weight for v in inputs.values())
    assert res.measurements["clipped_entries"] == sum(int((np.abs(v.vector) > 1.0).sum()) for v in inputs.values())


def test_stochastic_rounding_is_unbiased_through_the_protocol() -> None:
    """A value halfway between grid points averages to itself over many masked rounds."""
    agg = make("secagg", scale_bits=4, corrupt_fraction=0.0, dropout_rate=0.0)
    x = np.full(4000, 1 / 32, dtype=np.float32)  # half of the 2^-4 step
    totals = [run_round(agg.new_round(r, {0: ClientInput(x), 1: ClientInput(x)}), agg.stages).result.total
              for r in range(3)]
    mean = np.mean(totals)
    # 24000 Bernoulli(1/2) roundings of 2^-4 each: std of the mean ~ 2^-4 * 0.5 / sqrt(12000) / ... < 3e-4
    assert abs(mean - 2 / 32) < 2e-3
    assert set(np.unique(np.concatenate(totals))) <= {0.0, 1 / 16, 2 / 16}


def test_overflow_is_refused_with_the_knobs_named() -> None:
    agg = make("secagg", clip=8.0, scale_bits=24, modulus_bits=32, corrupt_fraction=0.0)
    rng = np.random.default_rng(0)
    with pytest.raises(OverflowRiskError, match="modulus_bits.*scale_bits.*clip"):
        agg.new_round(0, exact_inputs(rng, 20, 3))
    with pytest.raises(OverflowRiskError):
        make("secagg", clip=8.0, scale_bits=24, max_clients=20)


def test_64_bit_and_small_rings() -> None:
    rng = np.random.default_rng(3)
    for bits in (20, 40, 64):
        agg = make("secagg+", modulus_bits=bits, scale_bits=16 if bits > 20 else 2, corrupt_fraction=0.0)
        inputs = {c: ClientInput((rng.integers(-4, 4, size=33) * 0.25).astype(np.float32)) for c in range(7)}
        res = run_round(agg.new_round(0, inputs), agg.stages).result
        np.testing.assert_array_equal(res.total, expected_total(inputs, res.contributors))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"bogus": 1}, "bogus"),
        ({"clip": -1.0}, "clip"),
        ({"clip": "big"}, "clip"),
        ({"scale_bits": 1.5}, "scale_bits"),
        ({"modulus_bits": 70}, "modulus_bits"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"corrupt_fraction": -0.1}, "corrupt_fraction"),
        ({"graph": "harary"}, "secagg\\+"),
        ({"k": 4}, "k applies"),
        ({"threads": 0}, "threads"),
        ({"authenticated": "yes"}, "authenticated"),
        ({"max_weight": 0.0}, "max_weight"),
    ],
)
def test_factory_validates_options(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        AGGREGATORS.create("secagg", **options)


def test_round_level_input_errors() -> None:
    agg = make("secagg+", corrupt_fraction=0.0)
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigurationError, match="at least 2"):
        agg.new_round(0, exact_inputs(rng, 1, 3))
    bad = exact_inputs(rng, 5, 3)
    bad[2] = ClientInput(np.zeros(4, dtype=np.float32))
    with pytest.raises(ConfigurationError, match="different lengths"):
        agg.new_round(0, bad)
    heavy = exact_inputs(rng, 5, 3)
    heavy[1] = ClientInput(heavy[1].vector, weight=2.0)
    with pytest.raises(ConfigurationError, match="max_weight"):
        agg.new_round(0, heavy)
    nan = exact_inputs(rng, 5, 3)
    nan[4].vector[1] = np.nan  # mutated after ClientInput validated it
    with pytest.raises(NonFiniteUpdateError):
        agg.new_round(0, nan)
    with pytest.raises(ConfigurationError, match="threshold"):
        make("secagg+", k=4, threshold=1, corrupt_fraction=0.0).new_round(0, exact_inputs(rng, 10, 2))
    with pytest.raises(ConfigurationError, match="threshold=3 is below"):
        make("secagg+", k=8, threshold=3, authenticated=True, corrupt_fraction=0.0).new_round(0, exact_inputs(rng, 20, 2))


def test_nan_injected_after_set_up_is_refused_by_the_client() -> None:
    rng = np.random.default_rng(0)
    inputs = exact_inputs(rng, 6, 4)
    agg = make("secagg", corrupt_fraction=0.0)
    rnd = agg.new_round(0, inputs)
    inputs[2].vector[0] = np.inf
    with pytest.raises(NonFiniteUpdateError):
        run_round(rnd, agg.stages)
    assert not rnd.server.finished


def test_registered_and_parameter_finder_used_by_default() -> None:
    assert {"secagg", "secagg+"} <= set(AGGREGATORS.names())
    rng = np.random.default_rng(2)
    agg = AGGREGATORS.create("secagg+", dropout_rate=0.1, corrupt_fraction=0.05)
    rnd = agg.new_round(0, exact_inputs(rng, 100, 2))
    p = rnd.server.parameters
    assert not p.complete and p.k < 99
    assert all(len(rnd.server.graph.neighbours(c)) == p.k for c in range(100))


def test_federated_loop_runs_secagg_plus_with_dropouts(tmp_path: Path) -> None:
    """The run config selects secagg+; the loop's simulated dropouts hit the masked-input stage."""
    import json

    from securefed.config import load_config
    from securefed.fl.runner import run_experiment

    cfg = load_config(overrides=[
        "model.name=tiny-llama", "partition.clients=6", "partition.min_size=2", "train.local_steps=1",
        "train.batch_size=4", "data.train_examples=60", "eval.max_examples=8", "data.max_length=32",
        "train.rounds=1", "eval.before=false", "aggregation.name=secagg+", "aggregation.options.max_weight=100.0",
        "aggregation.options.corrupt_fraction=0.0", "aggregation.options.dropout_rate=0.3",
        "dropout.rate=0.2", "dropout.stage=masked_input",
    ])
    run_experiment(cfg, tmp_path)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["round"] == 1]
    assert "aborted" not in record
    dropped = {int(c) for c in record["dropped"]}
    assert set(record["contributors"]) == set(record["sampled"]) - dropped
    assert record["aggregation"]["protocol"] == "secagg+"
    assert record["aggregation"]["reconstructed_keys"] == len(dropped)
