"""TAG/LAMP-style optimization and the run-directory entry point, on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from securefed.attacks import (
    ATTACKS,
    EvaluationTruth,
    PublicKnowledge,
    ServerView,
    run_attack,
    save_views,
)
from securefed.attacks.optimization import matching_loss
from securefed.attacks.simulate import (
    causal_lm_loss,
    encode,
    fedsgd_update,
    full_spec,
    lora_model,
    observe,
    tiny_llama,
    word_tokenizer,
)

TEXT = "bright and brave"



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids OpenMP contention on a shared machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope="module")
def setup():
    tok = word_tokenizer(TEXT.split() + [f"w{i}" for i in range(80)])
    base = tiny_llama(len(tok), hidden=32, intermediate=64, seed=4)
    client = copy.deepcopy(base)
    spec, params = full_spec(client, layers=2)
    for n, p in client.named_parameters():
        p.requires_grad_(n in params)
    ids, mask = encode(tok, [TEXT])
    vec = fedsgd_update(spec, params, client, causal_lm_loss(ids, mask), lr=0.1)
    glob = spec.flatten({n: p.detach() for n, p in params.items()})
    public = PublicKnowledge(model_name="tiny", spec=spec, global_vector=glob, peft_method="full", round_index=0,
                             learning_rate=0.1, batch_size=1)
    view = ServerView.from_observation(observe({0: vec}), public)
    return tok, base, view, ids


def test_matching_losses_by_hand():
    import torch

    a, b = [torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 2.0])]
    assert float(matching_loss(a, b, "cos", 0.0)) == pytest.approx(1.0)  # orthogonal
    assert float(matching_loss(a, b, "l2", 0.0)) == pytest.approx(5.0)  # 1 + 4
    assert float(matching_loss(a, b, "l1l2", 0.5)) == pytest.approx(5.0 + 0.5 * 3.0)
    assert float(matching_loss(a, a, "cos", 0.0)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("name", ["lamp", "tag"])
def test_optimization_lowers_the_gradient_distance(setup, name):
    tok, base, view, ids = setup
    opts = {"steps": 12, "seq_len": 3}
    if name == "lamp":
        opts |= {"swap_every": 6, "swap_candidates": 3}
    rec = ATTACKS.create(name, **opts).run(view, loader=lambda p: (base, tok), targets="clients").reconstructions[0]
    assert rec.status == "partial" and len(rec.sequences) == 1 and len(rec.sequences[0]) == 3
    assert rec.diagnostics["best_continuous_loss"] < rec.diagnostics["initial_loss"]
    # projection restricted to the first-layer span's tokens: only batch tokens come out
    batch_tokens = set(ids[0, :-1].tolist())
    assert rec.diagnostics["vocabulary"] == len(batch_tokens)
    assert set(rec.sequences[0]) <= batch_tokens


def test_optimization_on_lora_needs_announced_batch_size(setup):
    tok, base, _, ids = setup
    client = copy.deepcopy(base)
    model, spec, params = lora_model(client, r=4, alpha=8, b_std=0.05)
    vec = fedsgd_update(spec, params, model, causal_lm_loss(*encode(tok, [TEXT])), lr=0.1)
    glob = spec.flatten({n: p.detach() for n, p in params.items()})
    public = PublicKnowledge(model_name="tiny", spec=spec, global_vector=glob, peft_method="lora", round_index=0,
                             learning_rate=0.1, peft_config={"r": 4, "alpha": 8})
    view = ServerView.from_observation(observe({0: vec}), public)
    rec = ATTACKS.create("lamp", steps=5).run(view, loader=lambda p: (base, tok), targets="clients").reconstructions[0]
    assert rec.status == "not-applicable" and "batch size" in rec.notes[0]
    rec = ATTACKS.create("lamp", steps=4, sequences=1, seq_len=3, swap_every=0).run(
        view, loader=lambda p: (base, tok), targets="clients"
    ).reconstructions[0]
    assert rec.diagnostics["best_continuous_loss"] <= rec.diagnostics["initial_loss"]


def test_run_attack_on_a_run_directory(setup, tmp_path):
    tok, base, view, _ = setup
    save_views(tmp_path / "views", [view], [EvaluationTruth(0, {0: (TEXT,)})])
    report = run_attack(tmp_path, "dager", loader=lambda p: (base, tok))
    assert report["summary"]["clients"]["exact_match"] == 1.0
    assert report["summary"]["aggregate"]["rouge1"] == 1.0
    saved = json.loads((tmp_path / "attacks" / "dager.json").read_text())
    assert saved["rounds"][0]["reconstructions"][0]["texts"] == [TEXT]
    assert "Petrov" in saved["citation"]
