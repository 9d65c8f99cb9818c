"""Threat-model types, recorded views on disk, and the attacks' handling of bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from securefed.attacks import (
    ATTACKS,
    AttackConfigError,
    EvaluationTruth,
    NotAServerViewError,
    PublicKnowledge,
    ServerView,
    ViewFormatError,
    ViewKind,
    ViewMismatchError,
    load_truth,
    load_views,
    save_views,
)
from securefed.attacks.simulate import (
    causal_lm_loss,
    encode,
    fedsgd_update,
    full_spec,
    observe,
    tiny_llama,
    word_tokenizer,
)
from securefed.peft.spec import AdapterSpec, TensorSpec
from securefed.protocols.base import ServerObservation

TEXTS = ["a quiet film about loss", "loud and empty"]



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids OpenMP contention on a shared machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope="module")
def setup():
    tok = word_tokenizer(sorted({w for t in TEXTS for w in t.split()}) + [f"w{i}" for i in range(60)])
    model = tiny_llama(len(tok), hidden=32, intermediate=64, seed=0)
    client = copy.deepcopy(model)
    spec, params = full_spec(client, layers=2)
    for n, p in client.named_parameters():
        p.requires_grad_(n in params)
    ids, mask = encode(tok, TEXTS)
    vec = fedsgd_update(spec, params, client, causal_lm_loss(ids, mask), lr=0.1)
    glob = spec.flatten({n: p.detach() for n, p in params.items()})
    public = PublicKnowledge(model_name="tiny", spec=spec, global_vector=glob, peft_method="full", round_index=3,
                             learning_rate=0.1, batch_size=2, text_template=None)
    return tok, model, public, vec


def test_view_from_plaintext_observation_is_read_only(setup):
    _, _, public, vec = setup
    view = ServerView.from_observation(observe({0: vec, 1: vec}), public)
    assert view.kind is ViewKind.INDIVIDUAL and view.contributors == (0, 1)
    assert [t.label for t in view.targets()] == ["client 0", "client 1", "aggregate"]
    with pytest.raises(ValueError):
        view.individual_updates[0][0] = 1.0  # read-only copy of what the server saw
    with pytest.raises(TypeError):
        view.individual_updates[5] = vec  # type: ignore[index]
    np.testing.assert_allclose(view.aggregate, 2 * vec.astype(np.float64), rtol=1e-6)


def test_attacks_refuse_anything_but_a_server_view(setup):
    tok, model, public, vec = setup
    attack = ATTACKS.create("dager")
    obs = observe({0: vec})
    for bad in (vec, obs, EvaluationTruth(0, {0: tuple(TEXTS)}), {"update": vec}, model):
        with pytest.raises(NotAServerViewError) as err:
            attack.run(bad)  # type: ignore[arg-type]
        assert isinstance(err.value, TypeError)
        assert "ServerView" in str(err.value)
    view = ServerView.from_observation(obs, public)
    with pytest.raises(NotAServerViewError):
        attack.run(view, aux=EvaluationTruth(0, {0: tuple(TEXTS)}))  # type: ignore[arg-type]


def test_ciphertext_view_reports_zero_recovery(setup):
    _, _, public, _ = setup
    obs = ServerObservation(protocol="ckks", contributors=(0, 1), aggregate=None, total_weight=None,
                            ciphertexts={0: b"\x01" * 64, 1: b"\x02" * 64})
    view = ServerView.from_observation(obs, public)
    assert view.kind is ViewKind.CIPHERTEXT and view.targets() == ()
    for name in ATTACKS.names():
        res = ATTACKS.create(name).run(view)
        (rec,) = res.reconstructions
        assert rec.status == "nothing-to-invert" and rec.texts == () and rec.tokens == ()
        assert "ciphertexts" in rec.notes[0]


def test_real_ckks_round_with_client_held_keys_gives_nothing(setup):
    _, _, public, vec = setup
    obs = observe({0: vec, 1: vec}, aggregator="ckks", options={"key_mode": "client-held"})
    view = ServerView.from_observation(obs, public)
    assert view.kind is ViewKind.CIPHERTEXT and view.aggregate is None
    (rec,) = ATTACKS.create("dager").run(view).reconstructions
    assert rec.status == "nothing-to-invert" and rec.texts == ()


def test_masked_view_attacks_only_the_sum(setup):
    _, _, public, vec = setup
    rng = np.random.default_rng(0)  # test input: stands for uniformly random masked vectors
    obs = ServerObservation(protocol="secagg", contributors=(0, 1), aggregate=2 * vec.astype(np.float64), total_weight=2.0,
                            masked_updates={0: rng.random(vec.shape[0]).astype(np.float32), 1: rng.random(vec.shape[0]).astype(np.float32)})
    view = ServerView.from_observation(obs, public)
    assert view.kind is ViewKind.MASKED
    assert [t.label for t in view.targets()] == ["aggregate"]


def test_spec_mismatch_is_a_typed_error(setup):
    tok, model, public, vec = setup
    view = ServerView.from_observation(observe({0: vec}), public)
    other = tiny_llama(len(tok), hidden=48, intermediate=64, seed=0)
    with pytest.raises(ViewMismatchError, match="shape"):
        ATTACKS.create("dager").run(view, loader=lambda p: (other, tok))
    wrong = AdapterSpec("full", (TensorSpec("model.layers.0.self_attn.nonexistent.weight", (2, 2)),))
    pk = PublicKnowledge(model_name="tiny", spec=wrong, global_vector=np.zeros(4, np.float32), peft_method="full",
                         round_index=0, learning_rate=0.1)
    v2 = ServerView.from_observation(observe({0: np.zeros(4, np.float32)}), pk)
    with pytest.raises(ViewMismatchError):
        ATTACKS.create("dager").run(v2, loader=lambda p: (model, tok))
    with pytest.raises(ViewMismatchError, match="global_vector"):
        PublicKnowledge(model_name="tiny", spec=public.spec, global_vector=np.zeros(3, np.float32), peft_method="full",
                        round_index=0, learning_rate=0.1)
    with pytest.raises(ViewMismatchError, match="entries"):
        ServerView.from_observation(observe({0: np.zeros(5, np.float32)}), public)


def test_options_are_validated():
    with pytest.raises(AttackConfigError) as err:
        ATTACKS.create("dager", bogus=1)
    assert err.value.key == "attack.bogus"
    with pytest.raises(AttackConfigError, match="choose one of"):
        ATTACKS.create("no-such-attack")
    with pytest.raises(AttackConfigError):
        ATTACKS.create("dager", span_threshold=2.0)
    with pytest.raises(AttackConfigError):
        ATTACKS.create("lamp", loss="l7")


def test_views_round_trip_through_disk(setup, tmp_path):
    _, _, public, vec = setup
    view = ServerView.from_observation(observe({0: vec, 4: -vec}, weights={0: 2.0, 4: 1.0}), public)
    truth = EvaluationTruth(3, {0: (TEXTS[0],), 4: (TEXTS[1],)})
    save_views(tmp_path / "views", [view], [truth])
    (back,) = load_views(tmp_path / "views")
    assert back.kind is view.kind and back.contributors == view.contributors and back.protocol == "plaintext"
    np.testing.assert_array_equal(back.individual_updates[4], view.individual_updates[4])
    np.testing.assert_array_equal(back.aggregate, view.aggregate)
    assert dict(back.individual_weights) == {0: 2.0, 4: 1.0}
    assert back.public.spec == public.spec and back.public.round_index == 3 and back.public.batch_size == 2
    np.testing.assert_array_equal(back.public.global_vector, public.global_vector)
    assert load_truth(tmp_path / "views")[3].for_clients((4, 0)) == (TEXTS[1], TEXTS[0])


def test_corrupt_recordings_are_rejected(setup, tmp_path):
    _, _, public, vec = setup
    view = ServerView.from_observation(observe({0: vec}), public)
    root = tmp_path / "views"
    (d,) = save_views(root, [view])
    meta = json.loads((d / "view.json").read_text())
    (d / "view.json").write_text(json.dumps(meta | {"version": 99}))
    with pytest.raises(ViewFormatError, match="version"):
        load_views(root)
    (d / "view.json").write_text("{not json")
    with pytest.raises(ViewFormatError):
        load_views(root)
    (d / "view.json").write_text(json.dumps(meta))
    (d / "view.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ViewFormatError):
        load_views(root)
    with pytest.raises(ViewFormatError, match="record"):
        load_views(tmp_path / "nowhere")


def test_recorded_view_is_attackable(setup, tmp_path):
    tok, model, public, vec = setup
    save_views(tmp_path, [ServerView.from_observation(observe({0: vec}), public)])
    (view,) = load_views(tmp_path)
    rec = ATTACKS.create("dager").run(view, loader=lambda p: (model, tok), targets="clients").reconstructions[0]
    assert sorted(rec.texts) == sorted(TEXTS)
