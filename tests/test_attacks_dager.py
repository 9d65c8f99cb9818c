"""DAGER on tiny Llama models with known inputs (float64, full gradient and LoRA).

Oracle: the texts the simulated client trained on. The span tests must give
them back exactly (full gradient, B <= 4), on one client's update and on the
plaintext sum of two clients; LoRA must be exact while the batch has at most
r distinct inputs per layer and degrade beyond.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from securefed.attacks import ATTACKS, PublicKnowledge, ServerView, score_texts
from securefed.attacks.llama import LlamaFirstLayer
from securefed.attacks.simulate import (
    causal_lm_loss,
    encode,
    full_spec,
    lora_model,
    observe,
    sgd_update,
    tiny_llama,
    word_tokenizer,
)
from securefed.attacks.span import SpanBasis, estimate_rank

SENTENCES = [
    "the film is a quiet triumph of small moments",
    "a clumsy script sinks every good idea",
    "funny and warm from start to finish",
    "nothing here feels new or alive",
    "the cast carries a thin story",
    "an honest portrait of grief and hope",
    "too long by half and twice as dull",
    "beautiful images cannot save the plot",
]
FILLER = [f"word{i}" for i in range(300)]
LR = 1e-2



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids OpenMP contention on a shared machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope="module")
def tok():
    words = sorted({w for s in SENTENCES for w in s.split()}) + FILLER
    return word_tokenizer(words)


@pytest.fixture(scope="module")
def base(tok):
    return tiny_llama(len(tok), seed=1)


def _public(spec, vector, **kw):
    return PublicKnowledge(model_name="tiny", spec=spec, global_vector=vector, round_index=0, learning_rate=LR, **kw)


def _full_view(base, tok, batches, *, steps=1, aggregator="plaintext", options=None):
    model = copy.deepcopy(base)
    spec, params = full_spec(model)
    updates = {}
    for cid, texts in enumerate(batches):
        ids, mask = encode(tok, texts)
        updates[cid] = sgd_update(model, spec, params, [causal_lm_loss(ids, mask)] * steps, lr=LR)
    glob = spec.flatten({n: p.detach() for n, p in params.items()})
    public = _public(spec, glob, peft_method="full", local_steps=steps, batch_size=len(batches[0]))
    return ServerView.from_observation(observe(updates, aggregator=aggregator, options=options), public)


def _loader(base, tok):
    return lambda public: (base, tok)


def test_first_layer_matches_the_hugging_face_forward(base):
    """The incremental evaluator reproduces the model's own layer inputs (hook oracle)."""
    ids = torch.tensor([[5, 17, 17, 42, 99, 3, 250]])
    seen = {}
    layers = base.model.layers
    hooks = [
        layers[0].mlp.gate_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", i[0][0])),
        layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("down", i[0][0])),
        layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("l1", i[0][0])),
    ]
    with torch.no_grad():
        base(ids)
    for h in hooks:
        h.remove()
    ev = LlamaFirstLayer(base)
    pre = ev.empty()
    for pos, t in enumerate(ids[0].tolist()):
        cand = ev.candidates(torch.tensor([t]))
        h = ev.residual_mid(pre, cand)[0, 0]
        x = ev.mlp_input(h)
        a = ev.mlp_hidden(x)
        # HF's RMSNorm rounds through float32 even in a float64 model: compare at that precision.
        assert torch.allclose(x, seen["mlp"][pos], atol=1e-5)
        assert torch.allclose(a, seen["down"][pos], atol=1e-5)
        assert torch.allclose(ev.layer1_input(h, a), seen["l1"][pos], atol=1e-5)
        pre = ev.extend(pre, cand, torch.tensor([0]), torch.tensor([0]))


def test_rank_estimate_finds_the_drop():
    s = torch.tensor([1.0, 0.5, 0.1, 1e-3, 1e-12, 5e-13])
    assert estimate_rank(s) == (4, pytest.approx(7.0))  # round-off below 1e-10 of the top counts as one floor
    assert estimate_rank(torch.tensor([1.0, 0.9, 0.8]))[0] == 3  # no drop: full row rank


def test_span_distance_is_zero_inside_and_positive_outside():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=gen, dtype=torch.float64)
    grad = torch.randn(40, 5, generator=gen, dtype=torch.float64) @ x  # rows are combinations of x
    span = SpanBasis.from_rows([grad])
    assert span.rank == 5 and not span.full
    inside = torch.randn(3, 5, generator=gen, dtype=torch.float64) @ x
    assert float(span.distance(inside).max()) < 1e-10
    outside = torch.randn(3, 32, generator=gen, dtype=torch.float64)
    assert float(span.distance(outside).min()) > 0.1


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_dager_exact_on_full_gradient(base, tok, batch):
    texts = SENTENCES[:batch]
    view = _full_view(base, tok, [texts])
    res = ATTACKS.create("dager").run(view, loader=_loader(base, tok), targets="clients")
    rec = res.reconstructions[0]
    assert rec.status == "recovered", rec.notes
    scores = score_texts(rec.texts, texts)
    assert scores.exact_match == 1.0 and scores.rouge1 == 1.0
    assert len(rec.texts) == batch


def test_dager_recovers_both_batches_from_the_sum(base, tok):
    batches = [SENTENCES[0:2], SENTENCES[2:4]]
    view = _full_view(base, tok, batches)
    res = ATTACKS.create("dager").run(view, loader=_loader(base, tok), targets="aggregate")
    rec = res.reconstructions[0]
    assert rec.target == "aggregate" and rec.clients == (0, 1)
    assert score_texts(rec.texts, batches[0] + batches[1]).exact_match == 1.0


def test_dager_on_a_secagg_sum(base, tok):
    """Through the real masking protocol the server holds masked vectors and the sum: the sum suffices."""
    batches = [SENTENCES[4:5], SENTENCES[5:7]]
    opts = {"clip": 1.0, "scale_bits": 40, "modulus_bits": 64, "dropout_rate": 0.0}  # two clients: no dropout slack
    view = _full_view(base, tok, batches, aggregator="secagg", options=opts)
    assert view.kind.value == "masked"
    res = ATTACKS.create("dager").run(view, loader=_loader(base, tok))
    (rec,) = res.reconstructions  # masked vectors are not targets
    assert rec.target == "aggregate"
    assert score_texts(rec.texts, batches[0] + batches[1]).exact_match == 1.0


def test_dager_fedavg_pseudo_gradient(base, tok):
    """Three local SGD steps on one batch: the pseudo-gradient still yields the text."""
    texts = SENTENCES[4:6]
    view = _full_view(base, tok, [texts], steps=3)
    rec = ATTACKS.create("dager").run(view, loader=_loader(base, tok), targets="clients").reconstructions[0]
    assert score_texts(rec.texts, texts).exact_match == 1.0


def test_dager_reports_more_tokens_than_the_width(base, tok):
    """Sixteen sentences hold ~100 positions, more than hidden 64: the later spans fill the space."""
    texts = (SENTENCES * 2)[:16]
    texts = [t + f" word{i}" for i, t in enumerate(texts)]
    view = _full_view(base, tok, [texts])
    rec = ATTACKS.create("dager").run(view, loader=_loader(base, tok), targets="clients").reconstructions[0]
    assert rec.status in ("partial", "unresolvable")
    assert any("fills the space" in n for n in rec.notes)
    assert score_texts(rec.texts, texts).exact_match < 0.5


def _lora_view(base, tok, texts, r):
    client = copy.deepcopy(base)
    # q and v (peft's default): a q-only adapter never sees position 0, whose query
    # attends to itself alone and so receives no gradient.
    model, spec, params = lora_model(client, r=r, alpha=2 * r, targets=("q_proj", "v_proj"), b_std=0.05, seed=3)
    ids, mask = encode(tok, texts)
    glob = spec.flatten({n: p.detach() for n, p in params.items()})
    upd = sgd_update(model, spec, params, [causal_lm_loss(ids, mask)], lr=LR)
    public = _public(spec, glob, peft_method="lora", peft_config={"r": r, "alpha": 2 * r, "target_modules": ("q_proj", "v_proj")})
    return ServerView.from_observation(observe({0: upd}), public)


def test_lora_exact_up_to_rank(base, tok):
    r = 8
    text = "funny and warm from start"  # 5 distinct tokens (+EOS, which gets no gradient) <= r
    view = _lora_view(base, tok, [text], r)
    rec = ATTACKS.create("dager").run(view, loader=_loader(base, tok), targets="clients").reconstructions[0]
    assert rec.status == "recovered", rec.notes
    assert score_texts(rec.texts, [text]).exact_match == 1.0


def test_lora_degrades_beyond_rank(base, tok):
    r = 8
    texts = SENTENCES[:3]  # 23 distinct tokens: more than the 2r = 16 rows of the q and v A-gradients
    view = _lora_view(base, tok, texts, r)
    rec = ATTACKS.create("dager").run(view, loader=_loader(base, tok), targets="clients").reconstructions[0]
    assert any("rows available" in n for n in rec.notes)  # the rank-r cap is reported
    scores = score_texts(rec.texts, texts)
    assert scores.exact_match < 1.0
    assert scores.rouge1 < 0.9


def test_dager_refuses_adam_silently_never(base, tok):
    """An adaptive local optimizer is flagged in the notes (the update is no longer a gradient sum)."""
    texts = SENTENCES[:1]
    view = _full_view(base, tok, [texts])
    public = view.public
    adam = PublicKnowledge(
        model_name=public.model_name, spec=public.spec, global_vector=np.asarray(public.global_vector),
        peft_method="full", round_index=0, learning_rate=LR, local_optimizer="adamw",
    )
    view2 = ServerView.from_observation(observe({0: np.asarray(view.individual_updates[0])}), adam)
    rec = ATTACKS.create("dager").run(view2, loader=_loader(base, tok), targets="clients").reconstructions[0]
    assert any("adamw" in n for n in rec.notes)
