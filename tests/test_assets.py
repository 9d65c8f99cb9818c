"""Asset loaders against the installed packages (offline)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from securefed.assets.data import DATASETS, iter_sharegpt_conversations, load_dataset
from securefed.assets.models import load_model
from securefed.errors import AssetError, DataError


def test_rotten_tomatoes_contents() -> None:
    d = load_dataset("rotten-tomatoes")
    rows = d.train + d.test
    # 7,403 fresh + 5,405 rotten rows in the file (environment-and-assets.md §3.2), minus duplicate texts.
    assert 12_500 < len(rows) <= 12_808
    counts = Counter(e.label for e in rows)
    assert set(counts) == {0, 1} and counts[1] > counts[0]
    assert d.label_names == ("rotten", "fresh")
    assert len({e.text for e in rows}) == len(rows)
    assert all(e.group for e in rows[:100])
    assert abs(len(d.test) / len(rows) - 0.2) < 0.01


def test_bbc_news_labels_are_sorted_and_deduplicated() -> None:
    d = load_dataset("bbc-news")
    rows = d.train + d.test
    assert d.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert len(rows) == len({e.text for e in rows})
    assert 2_100 <= len(rows) <= 2_225 - 90  # 2,225 files, 98 duplicate texts


def test_sharegpt_pairs_are_complete() -> None:
    d = load_dataset("sharegpt")
    assert len(d.train) > 30_000
    assert all(e.response and e.text for e in d.train[:500])


def test_sharegpt_salvages_a_truncated_array(tmp_path: Path) -> None:
    objs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": "hi"}]} for i in range(3)]
    text = json.dumps(objs)
    cut = text[: text.rfind("{") + 10]  # the last object is cut mid-way
    p = tmp_path / "x.json"
    p.write_text(cut)
    assert [o["id"] for o in iter_sharegpt_conversations(p)] == ["c0", "c1"]


def test_splits_are_seeded_and_deterministic() -> None:
    a = load_dataset("rotten-tomatoes", seed=3)
    b = load_dataset("rotten-tomatoes", seed=3)
    c = load_dataset("rotten-tomatoes", seed=4)
    assert a.test == b.test
    assert a.test != c.test
    assert set(a.train).isdisjoint(a.test)


def test_bad_dataset_requests() -> None:
    with pytest.raises(AssetError, match="registered"):
        load_dataset("imdb")
    with pytest.raises(DataError):
        load_dataset("rotten-tomatoes", test_fraction=1.5)
    assert set(DATASETS) == {"rotten-tomatoes", "bbc-news", "sharegpt"}


def test_unknown_model_names_the_registered_ones() -> None:
    with pytest.raises(AssetError, match="smollm2-135m"):
        load_model("no-such-model-xyz")


def test_tiny_models_are_seeded(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    again = load_model("tiny-llama")
    for (n, p), (_, q) in zip(tiny_llama.model.named_parameters(), again.model.named_parameters(), strict=True):
        assert (p == q).all(), n
    assert tiny_llama.tokenizer.vocab_size == 49152
    g = load_model("tiny-gpt2")
    assert g.model.config.n_layer == 2
    b = load_model("tiny-bert", task="seq-cls")
    assert b.model.config.num_labels == 2


@pytest.mark.slow
def test_smollm2_is_the_real_pretrained_model() -> None:
    import torch

    m = load_model("smollm2-135m")
    assert type(m.model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in m.model.parameters()) == 134_515_008
    ids = m.tokenizer("The capital of France is", return_tensors="pt")
    out = m.model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in m.tokenizer.decode(out[0][ids["input_ids"].shape[1] :])
    # A pretrained LM prefers real English to the same tokens shuffled (environment-and-assets.md §3.1).
    text = m.tokenizer("The cat sat quietly on the warm mat by the door.", return_tensors="pt")["input_ids"]
    shuffled = text[:, torch.randperm(text.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        assert m.model(text, labels=text).loss < m.model(shuffled, labels=shuffled).loss - 2.0


def test_minilm_encoder_loads() -> None:
    m = load_model("minilm-l6", task="seq-cls", num_labels=2)
    assert m.model.config.hidden_size == 384
