"""Analytic attacks on tiny models with known inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from securefed.attacks import ATTACKS, PublicKnowledge, ServerView
from securefed.attacks.analytic import invert_linear
from securefed.attacks.simulate import (
    causal_lm_loss,
    encode,
    fedsgd_update,
    full_spec,
    observe,
    seq_cls_loss,
    tiny_llama,
    word_tokenizer,
)

TEXTS = ["the score swells over every scene", "a dull and tired sequel"]



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids OpenMP contention on a shared machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(sorted({w for t in TEXTS for w in t.split()}) + [f"w{i}" for i in range(200)])


def _view(model, spec, params, loss, *, lr=0.1, batch_size=None):
    vec = fedsgd_update(spec, params, model, loss, lr=lr)
    glob = spec.flatten({n: p.detach() for n, p in params.items()})
    public = PublicKnowledge(model_name="tiny", spec=spec, global_vector=glob, peft_method="full", round_index=0,
                             learning_rate=lr, batch_size=batch_size, task="seq-cls" if "classifier" in " ".join(spec.names) else "causal-lm",
                             num_labels=3)
    return ServerView.from_observation(observe({0: vec}), public)


def test_bag_of_tokens_exact_with_untied_embeddings(tok):
    base = tiny_llama(len(tok), tied=False, seed=2)
    client = copy.deepcopy(base)
    spec, params = full_spec(client)
    ids, mask = encode(tok, TEXTS)
    view = _view(client, spec, params, causal_lm_loss(ids, mask))
    rec = ATTACKS.create("bag-of-tokens").run(view, loader=lambda p: (base, tok), targets="clients").reconstructions[0]
    # Every input but the final EOS (its output predicts nothing, so it gets no gradient).
    expected = {t for row, m in zip(ids.tolist(), mask.tolist(), strict=True) for t in row[: sum(m) - 1]}
    assert rec.status == "recovered"
    assert set(rec.tokens) == expected


def test_bag_of_tokens_with_tied_embeddings_is_labelled_an_estimate(tok):
    base = tiny_llama(len(tok), tied=True, seed=2)
    client = copy.deepcopy(base)
    spec, params = full_spec(client)
    ids, mask = encode(tok, TEXTS)
    view = _view(client, spec, params, causal_lm_loss(ids, mask))
    rec = ATTACKS.create("bag-of-tokens", z=2.0).run(view, loader=lambda p: (base, tok), targets="clients").reconstructions[0]
    assert rec.status == "partial" and any("estimate" in n for n in rec.notes)
    batch_tokens = set(ids.flatten().tolist())
    assert rec.tokens and sum(t in batch_tokens for t in rec.tokens) / len(rec.tokens) >= 0.8


def test_bag_of_tokens_needs_a_trainable_embedding(tok):
    base = tiny_llama(len(tok), seed=2)
    client = copy.deepcopy(base)
    spec, params = full_spec(client, layers=1)  # first block only: embeddings frozen
    ids, mask = encode(tok, TEXTS)
    view = _view(client, spec, params, causal_lm_loss(ids, mask))
    rec = ATTACKS.create("bag-of-tokens").run(view, loader=lambda p: (base, tok), targets="clients").reconstructions[0]
    assert rec.status == "not-applicable"


def _bert(tok, seed=0):
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     num_labels=3, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).double().eval()


def test_linear_inversion_exact_at_batch_size_one(tok):
    base = _bert(tok)
    client = copy.deepcopy(base)
    spec, params = full_spec(client)
    ids, mask = encode(tok, TEXTS[:1], append_eos=False)
    seen = {}
    hooks = [
        client.classifier.register_forward_hook(lambda m, i, o: seen.__setitem__("classifier", i[0][0].detach())),
        client.bert.pooler.dense.register_forward_hook(lambda m, i, o: seen.__setitem__("bert.pooler.dense", i[0][0].detach())),
    ]
    view = _view(client, spec, params, seq_cls_loss(ids, mask, torch.tensor([2])))
    for h in hooks:
        h.remove()
    rec = ATTACKS.create("linear-inversion").run(view, loader=lambda p: (base, tok), targets="clients").reconstructions[0]
    assert rec.status == "recovered"
    for layer, true in seen.items():
        got = torch.tensor(rec.features[layer], dtype=torch.float64)
        # the pooler sees the first position only; float32 upload limits precision
        assert torch.allclose(got, true, rtol=1e-4, atol=1e-5), layer
    # layers fed by a whole sequence are not rank one and are skipped, with a note
    assert any("not rank one" in n for n in rec.notes)
    labels = ATTACKS.create("lm-head-labels").run(view, loader=lambda p: (base, tok), targets="clients").reconstructions[0]
    assert labels.labels == (2,)


def test_linear_inversion_refuses_batches(tok):
    base = _bert(tok)
    client = copy.deepcopy(base)
    spec, params = full_spec(client)
    ids, mask = encode(tok, TEXTS, append_eos=False)
    view = _view(client, spec, params, seq_cls_loss(ids, mask, torch.tensor([0, 1])))
    rec = ATTACKS.create("linear-inversion").run(view, loader=lambda p: (base, tok), targets="clients").reconstructions[0]
    assert "classifier" not in rec.features  # two inputs feed it: no average is returned
    labels = ATTACKS.create("lm-head-labels").run(view, loader=lambda p: (base, tok), targets="clients").reconstructions[0]
    assert labels.labels == (0, 1)


def test_invert_linear_by_hand():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    dy = torch.tensor([0.3, 0.0, -1.2], dtype=torch.float64)
    got, resid = invert_linear(torch.outer(dy, x), dy)
    assert torch.allclose(got, x) and resid < 1e-12
