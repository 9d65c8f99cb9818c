"""Training tasks: how examples become batches, losses and metrics.

* ``verbalized``: classification as causal LM. The prompt is followed by a
  label word; training puts the loss on the label-word tokens only; accuracy
  picks the label whose word has the highest log-likelihood after the prompt
  (the "verbalizer" of PET, Schick and Schütze, EACL 2021). Evaluating before
  training gives the zero-shot baseline.
* ``seq-cls``: a classification head on the final hidden state.
* ``instruction``: instruction tuning; loss on response tokens only; perplexity.

Every task returns a *per-example* loss (mean over that example's target
tokens), so that the batch loss is the mean over examples: the form DP-SGD's
per-sample clipping assumes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from securefed.assets.data import Example
from securefed.errors import ConfigError, DataError

TEMPLATES = {
    "rotten-tomatoes": "Review: {text}\nSentiment:",
    "bbc-news": "Article: {text}\nTopic:",
}
VERBALIZERS = {
    "rotten-tomatoes": (" negative", " positive"),
    "bbc-news": (" business", " entertainment", " politics", " sports", " technology"),
}


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor  # token targets (-100 = ignored) or class ids for seq-cls


class Task(ABC):
    kind: str

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        if max_length < 8:
            raise ConfigError(f"max_length must be >= 8, got {max_length}", key="data.max_length")
        self.tok = tokenizer
        self.max_length = max_length

    @abstractmethod
    def batch(self, examples: Sequence[Example]) -> Batch: ...

    @abstractmethod
    def per_example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...

    @abstractmethod
    def evaluate(self, model: nn.Module, examples: Sequence[Example], batch_size: int) -> dict[str, float]: ...

    def _pad(self, seqs: list[list[int]], fill: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [fill] * (width - len(s)) for s in seqs], dtype=torch.long)


def _token_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-example mean NLL over target tokens (targets shifted inside)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, :-1, :].float()
    tgt = batch.targets[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none")
    mask = (tgt != -100).to(nll.dtype)
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class VerbalizedClassification(Task):
    kind = "verbalized"

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int, template: str, label_words: Sequence[str]
    ) -> None:
        super().__init__(tokenizer, max_length)
        if "{text}" not in template:
            raise ConfigError("template must contain '{text}'", key="data.template")
        self.template = template
        self.label_ids = [tokenizer.encode(w, add_special_tokens=False) for w in label_words]
        if any(not ids for ids in self.label_ids):
            raise ConfigError(f"a label word tokenizes to nothing: {label_words}", key="data.label_words")
        self.single_token = all(len(ids) == 1 for ids in self.label_ids)

    def _prompt_ids(self, text: str, reserve: int) -> list[int]:
        head, tail = self.template.split("{text}", 1)
        h = self.tok.encode(head, add_special_tokens=False)
        t = self.tok.encode(tail, add_special_tokens=False)
        body = self.tok.encode(text, add_special_tokens=False)
        room = max(1, self.max_length - reserve - len(h) - len(t))
        return h + body[:room] + t

    def batch(self, examples: Sequence[Example]) -> Batch:
        seqs, tgts = [], []
        for e in examples:
            if e.label is None or not 0 <= e.label < len(self.label_ids):
                raise DataError(f"example label {e.label} has no label word")
            lab = self.label_ids[e.label]
            p = self._prompt_ids(e.text, len(lab))
            seqs.append(p + lab)
            tgts.append([-100] * len(p) + lab)
        ids = self._pad(seqs, self.tok.pad_token_id)
        return Batch(ids, self._pad([[1] * len(s) for s in seqs], 0), self._pad(tgts, -100))

    def per_example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return _token_nll(model, batch)

    @torch.no_grad()
    def label_scores(self, model: nn.Module, examples: Sequence[Example]) -> torch.Tensor:
        """Log-likelihood of each label word after each prompt: [len(examples), n_labels]."""
        if self.single_token:
            prompts = [self._prompt_ids(e.text, 1) for e in examples]
            ids = self._pad(prompts, self.tok.pad_token_id)
            mask = self._pad([[1] * len(p) for p in prompts], 0)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            last = torch.tensor([len(p) - 1 for p in prompts])
            logp = F.log_softmax(logits[torch.arange(len(prompts)), last], dim=-1)
            return logp[:, [ids_[0] for ids_ in self.label_ids]]
        cols = []
        for lab in range(len(self.label_ids)):
            b = self.batch([Example(e.text, lab) for e in examples])
            cols.append(-_token_nll(model, b) * (b.targets != -100).sum(1))
        return torch.stack(cols, dim=1)

    def evaluate(self, model: nn.Module, examples: Sequence[Example], batch_size: int) -> dict[str, float]:
        correct, n = 0, 0
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            pred = self.label_scores(model, chunk).argmax(1)
            correct += int((pred == torch.tensor([e.label for e in chunk])).sum())
            n += len(chunk)
        return {"accuracy": correct / max(n, 1), "eval_examples": float(n)}


class SequenceClassification(Task):
    kind = "seq-cls"

    def batch(self, examples: Sequence[Example]) -> Batch:
        enc = [self.tok.encode(e.text, truncation=True, max_length=self.max_length) for e in examples]
        labels = []
        for e in examples:
            if e.label is None:
                raise DataError("seq-cls needs labelled examples")
            labels.append(e.label)
        return Batch(self._pad(enc, self.tok.pad_token_id), self._pad([[1] * len(s) for s in enc], 0), torch.tensor(labels))

    def per_example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return F.cross_entropy(logits.float(), batch.targets, reduction="none")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: Sequence[Example], batch_size: int) -> dict[str, float]:
        correct = 0
        for i in range(0, len(examples), batch_size):
            b = self.batch(examples[i : i + batch_size])
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            correct += int((logits.argmax(-1) == b.targets).sum())
        return {"accuracy": correct / max(len(examples), 1), "eval_examples": float(len(examples))}


class InstructionTuning(Task):
    kind = "instruction"
    PROMPT = "### Instruction:\n{text}\n\n### Response:\n"

    def batch(self, examples: Sequence[Example]) -> Batch:
        seqs, tgts = [], []
        for e in examples:
            if e.response is None:
                raise DataError("instruction tuning needs examples with a response")
            p = self.tok.encode(self.PROMPT.format(text=e.text), add_special_tokens=False)
            r = self.tok.encode(e.response, add_special_tokens=False) + [self.tok.eos_token_id]
            p = p[: self.max_length // 2]
            r = r[: self.max_length - len(p)]
            seqs.append(p + r)
            tgts.append([-100] * len(p) + r)
        return Batch(self._pad(seqs, self.tok.pad_token_id), self._pad([[1] * len(s) for s in seqs], 0), self._pad(tgts, -100))

    def per_example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return _token_nll(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: Sequence[Example], batch_size: int) -> dict[str, float]:
        total, count = 0.0, 0
        for i in range(0, len(examples), batch_size):
            b = self.batch(examples[i : i + batch_size])
            n_tok = (b.targets[:, 1:] != -100).sum(1)
            total += float((_token_nll(model, b) * n_tok).sum())
            count += int(n_tok.sum())
        nll = total / max(count, 1)
        return {"loss": nll, "perplexity": math.exp(min(nll, 50.0)), "eval_examples": float(len(examples))}


def make_task(
    kind: str, tokenizer: PreTrainedTokenizerBase, *, dataset: str, max_length: int,
    template: str | None = None, label_words: Sequence[str] | None = None, n_labels: int = 0,
) -> Task:
    """Build the task ``kind`` for ``dataset`` (templates and verbalizers have per-dataset defaults)."""
    if kind == "verbalized":
        tpl = template or TEMPLATES.get(dataset)
        words = tuple(label_words) if label_words else VERBALIZERS.get(dataset)
        if tpl is None or words is None:
            raise ConfigError(f"no default template/label words for {dataset!r}: set data.template and data.label_words", key="data.task")
        if n_labels and len(words) != n_labels:
            raise ConfigError(f"{len(words)} label words for {n_labels} labels", key="data.label_words")
        return VerbalizedClassification(tokenizer, max_length, tpl, words)
    if kind == "seq-cls":
        return SequenceClassification(tokenizer, max_length)
    if kind == "instruction":
        return InstructionTuning(tokenizer, max_length)
    raise ConfigError(f"unknown task {kind!r}; choose verbalized, seq-cls or instruction", key="data.task")
