"""Optimization-based inversion: TAG and LAMP-style gradient matching.

Threat model: an honest-but-curious server with one update (or a sum) and the
public model; the batch size is announced (or given as an option).

The attacker optimizes continuous input embeddings ``Z`` (and soft labels)
so that the gradient they induce, ``∇θ L(f(Z))``, matches the observed
pseudo-gradient (attacks-and-auditing.md §1.2-§1.5):

* ``tag`` (Deng et al., Findings of EMNLP 2021): ``Σ||g − g'||² + α Σ|g − g'|``
  (``loss="l1l2"``), Adam, no prior, no discrete steps;
* ``lamp`` (Balunović, Dimitrov et al., NeurIPS 2022): cosine distance
  averaged over tensors plus an embedding-norm regulariser, and every
  ``swap_every`` steps a discrete step that tries token swaps and moves and
  keeps the one with the lowest ``matching loss + prior_weight x perplexity``
  under a language-model prior: here the global model itself, which the
  server holds anyway (LAMP used a separate GPT-2).

Embeddings are projected to tokens by cosine similarity, restricted (as LAMP
restricts to tokens with non-zero embedding gradient) to the tokens that pass
DAGER's first-layer span test when the view carries that gradient; otherwise
to the whole vocabulary. For causal-LM views the next-token targets are soft:
the distribution of the next position's embedding over the vocabulary.
Sequences are taken to be ``seq_len`` tokens, unpadded (LAMP also assumes the
lengths known). LoRA views are matched through the chain rule on the merged
weight: ``∇A = s·Bᵀ∇W``, ``∇B = s·∇W Aᵀ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AttackConfigError, UnsupportedModelError
from .registry import Attack, AttackContext, register
from .results import Reconstruction, reconstruction
from .target import TargetModel, _linear, decoder_layers
from .text import decode_private
from .views import Target

LOSSES = ("cos", "l2", "l1l2")


@dataclass(frozen=True)
class OptimizationOptions:
    """Knobs shared by ``tag`` and ``lamp``.

    Attributes:
        loss: ``cos``, ``l2`` or ``l1l2`` (TAG).
        l1_factor: weight of the L1 term of ``l1l2`` (LAMP's ``tag_factor``).
        steps, lr: Adam steps and learning rate on the embeddings.
        sequences: how many sequences to reconstruct (``None``: announced batch size x clients).
        seq_len: tokens per sequence (``None``: from the span ranks when available, else 16).
        prior_weight: weight of the prior's perplexity in the discrete steps (0: none).
        swap_every: steps between discrete swap steps (0: none).
        swap_candidates: candidate swaps tried per discrete step.
        reg_weight: weight of LAMP's embedding-norm regulariser.
        restrict_vocab: project onto the first-layer span's tokens when available.
        seed: seed of the random initialisation (not a secret).
    """

    loss: str = "cos"
    l1_factor: float = 0.01
    steps: int = 200
    lr: float = 0.01
    sequences: int | None = None
    seq_len: int | None = None
    prior_weight: float = 0.2
    swap_every: int = 50
    swap_candidates: int = 16
    reg_weight: float = 1.0
    restrict_vocab: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise AttackConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}", key="attack.loss")
        if self.steps < 1 or self.lr <= 0:
            raise AttackConfigError("steps must be >= 1 and lr > 0", key="attack.steps")
        for key in ("sequences", "seq_len"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise AttackConfigError(f"must be >= 1, got {v}", key=f"attack.{key}")
        if self.prior_weight < 0 or self.swap_every < 0 or self.swap_candidates < 1 or self.l1_factor < 0:
            raise AttackConfigError("prior_weight, swap_every, l1_factor must be >= 0", key="attack.prior_weight")


@dataclass(frozen=True)
class TagOptions(OptimizationOptions):
    loss: str = "l1l2"
    lr: float = 0.1
    prior_weight: float = 0.0
    swap_every: int = 0
    reg_weight: float = 0.0


def matching_loss(dummy: list[torch.Tensor], observed: list[torch.Tensor], kind: str, l1_factor: float) -> torch.Tensor:
    """Gradient distance: LAMP's per-tensor cosine, DLG's L2, or TAG's L2 + α·L1."""
    if kind == "cos":
        terms = [1 - F.cosine_similarity(d.flatten(), o.flatten(), dim=0) for d, o in zip(dummy, observed, strict=True)]
        return torch.stack(terms).mean()
    l2 = sum(((d - o) ** 2).sum() for d, o in zip(dummy, observed, strict=True))
    if kind == "l2":
        return torch.as_tensor(l2)
    l1 = sum((d - o).abs().sum() for d, o in zip(dummy, observed, strict=True))
    return torch.as_tensor(l2 + l1_factor * l1)


class _Matcher:
    """Dummy gradients of the attacked tensors, in the same order as the observed ones."""

    def __init__(self, tm: TargetModel, grads: dict[str, torch.Tensor], scale: float) -> None:
        self.tm = tm
        self.scale = scale
        model = tm.model
        # Gradient matching differentiates a gradient: the fused SDPA kernels have no
        # double backward on CPU, the eager attention does (the model is the attack's copy).
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        self.params: list[nn.Parameter] = []
        self.maps: list[tuple[str, int, str | None]] = []  # (spec name, param index, lora part)
        self.observed: list[torch.Tensor] = []
        index: dict[int, int] = {}
        layers = decoder_layers(model) if tm.method == "lora" else None
        for name, g in grads.items():
            role = tm.roles[name]
            if role.part in ("lora_A", "lora_B"):
                assert layers is not None and role.layer is not None
                p = _linear(layers[role.layer], role.module).weight
            else:
                found = tm._model_param(name)
                if found is None:
                    continue
                p = found
            key = id(p)
            if key not in index:
                index[key] = len(self.params)
                self.params.append(p)  # type: ignore[arg-type]
            self.maps.append((name, index[key], role.part if role.part.startswith("lora") else None))
            self.observed.append(g.to(torch.float32))
        for p in self.params:
            p.requires_grad_(True)
        self.lora_scale = tm.lora_scaling() if tm.method == "lora" else 1.0

    def gradients(self, loss: torch.Tensor, create_graph: bool) -> list[torch.Tensor]:
        raw = torch.autograd.grad(loss * self.scale, self.params, create_graph=create_graph)
        out = []
        for name, i, part in self.maps:
            g = raw[i]
            if part is not None:
                role = self.tm.roles[name]
                assert role.layer is not None
                a = self.tm.global_tensor(role.layer, role.module, "lora_A")
                b = self.tm.global_tensor(role.layer, role.module, "lora_B")
                assert a is not None and b is not None
                g = self.lora_scale * (b.T.to(g.dtype) @ g if part == "lora_A" else g @ a.T.to(g.dtype))
            out.append(g)
        return out


class OptimizationAttack(Attack):
    """Continuous embedding optimization with gradient matching (base of ``tag`` and ``lamp``)."""

    name = "optimization"
    citation = "Balunović, Dimitrov, Jovanović, Vechev; LAMP: Extracting Text from Gradients with Language Model Priors; NeurIPS 2022"
    threat_model = "honest-but-curious server; one update or a sum; public model as prior; batch size announced"
    Options = OptimizationOptions

    def invert(self, target: Target, ctx: AttackContext) -> Reconstruction:
        opts: OptimizationOptions = self.options
        public = ctx.view.public
        if public.peft_method not in ("full", "lora"):
            return reconstruction(target, "not-applicable", notes=(f"PEFT method {public.peft_method!r} is not supported",))
        n_seq = opts.sequences or (public.batch_size * len(target.clients) if public.batch_size else None)
        if n_seq is None:
            return reconstruction(target, "not-applicable",
                notes=("the batch size is not announced: pass the 'sequences' option",),
            )
        tm = ctx.model()
        grads = tm.gradients(target.vector, dtype=torch.float32)
        notes: list[str] = []
        vocab, seq_len = self._vocabulary(ctx, tm, target, notes)
        seq_len = opts.seq_len or seq_len or 16
        matcher = _Matcher(tm, grads, scale=target.weight if target.is_aggregate else 1.0)
        emb = tm.model.get_input_embeddings().weight.detach().to(torch.float32)
        allowed = emb[vocab]
        allowed_n = F.normalize(allowed, dim=-1)
        init_size = float(allowed.norm(dim=-1).mean())
        gen = torch.Generator().manual_seed(opts.seed)
        z = torch.randn(n_seq, seq_len, emb.shape[1], generator=gen)
        z = nn.Parameter(F.normalize(z, dim=-1) * init_size)
        labels = nn.Parameter(torch.zeros(n_seq, public.num_labels)) if public.task == "seq-cls" else None
        adam = torch.optim.Adam([z] + ([labels] if labels is not None else []), lr=opts.lr)
        sched = torch.optim.lr_scheduler.StepLR(adam, step_size=50, gamma=0.89 if opts.loss == "cos" else 1.0)

        def task_loss(zz: torch.Tensor) -> torch.Tensor:
            if labels is not None:
                logits = tm.model(inputs_embeds=zz).logits
                return -(F.log_softmax(logits, -1) * F.softmax(labels, -1)).sum(-1).mean()
            logits = tm.model(inputs_embeds=zz).logits[:, :-1]
            nxt = F.softmax(F.normalize(zz[:, 1:], dim=-1) @ allowed_n.T / 0.05, dim=-1) @ F.one_hot(vocab, emb.shape[0]).to(zz.dtype)
            return -(F.log_softmax(logits, -1) * nxt).sum(-1).mean()

        def rec_loss(zz: torch.Tensor, create_graph: bool) -> torch.Tensor:
            dummy = matcher.gradients(task_loss(zz), create_graph=create_graph)
            return matching_loss(dummy, matcher.observed, opts.loss, opts.l1_factor)

        first = float(rec_loss(z.detach(), False))
        best = (math.inf, z.detach().clone())
        for step in range(opts.steps):
            adam.zero_grad()
            rec = rec_loss(z, True)
            total = rec + opts.reg_weight * (z.norm(dim=-1).mean() - init_size) ** 2
            total.backward()
            adam.step()
            sched.step()
            if float(rec.detach()) < best[0]:
                best = (float(rec.detach()), z.detach().clone())
            if opts.swap_every and step >= opts.steps // 10 and (step + 1) % opts.swap_every == 0:
                new = self._swap_step(z.detach(), rec_loss, tm, vocab, allowed_n, opts, gen)
                with torch.no_grad():
                    z.copy_(new)
        final = best[1]
        ids = vocab[(F.normalize(final, dim=-1) @ allowed_n.T).argmax(-1)]
        last = float(rec_loss(emb[ids], False))
        seqs = tuple(tuple(int(t) for t in row) for row in ids)
        texts = tuple(decode_private(tm.tokenizer, s, public.text_template) for s in seqs)
        for p in matcher.params:
            p.requires_grad_(False)
        return reconstruction(target, "partial", sequences=seqs, texts=texts, exact=tuple(False for _ in seqs),
            notes=tuple(notes + ["optimization-based: approximate, nothing is claimed exact"]),
            diagnostics={"initial_loss": first, "best_continuous_loss": best[0], "projected_loss": last,
                         "vocabulary": int(vocab.numel()), "seq_len": seq_len, "sequences": n_seq},
        )

    def _vocabulary(
        self, ctx: AttackContext, tm: TargetModel, target: Target, notes: list[str]
    ) -> tuple[torch.Tensor, int | None]:
        """Allowed tokens (DAGER's first-layer test when possible) and a length estimate."""
        from .dager import DagerOptions, _Log, build_probes, token_candidates
        from .llama import LlamaFirstLayer

        vocab_size = int(tm.model.get_input_embeddings().weight.shape[0])
        if not self.options.restrict_vocab:
            return torch.arange(vocab_size), None
        try:
            ev = LlamaFirstLayer(tm.model)
        except UnsupportedModelError as err:
            notes.append(f"vocabulary not restricted ({err})")
            return torch.arange(vocab_size), None
        log = _Log()
        grads = tm.gradients(target.vector)
        probes = build_probes(tm, grads, DagerOptions(), log, ("attn_in0", "mlp_in0", "attn_in1"))
        first = [p for p in probes.get("attn_in0", []) if p.informative]
        if not first:
            notes.append("vocabulary not restricted: no informative first-layer span")
            return torch.arange(vocab_size), None
        ids = token_candidates(ev, first, DagerOptions(), log)
        if ids.numel() == 0:
            notes.append("vocabulary not restricted: no token passed the first-layer span test")
            return torch.arange(vocab_size), None
        notes.append(f"projection restricted to the {ids.numel()} tokens in the first-layer gradient span")
        ranks = [p.span.rank for s in ("mlp_in0", "attn_in1") for p in probes.get(s, []) if p.informative]
        n = ctx.view.public.batch_size
        seq_len = max(1, round(max(ranks) / (n * len(target.clients)))) if ranks and n else None
        return ids, seq_len

    @staticmethod
    def _swap_step(
        z: torch.Tensor, rec_loss: object, tm: TargetModel, vocab: torch.Tensor, allowed_n: torch.Tensor,
        opts: OptimizationOptions, gen: torch.Generator,
    ) -> torch.Tensor:
        """LAMP's discrete step: try swaps/moves of the projected tokens, keep the best-scoring order."""
        assert callable(rec_loss)
        emb = tm.model.get_input_embeddings().weight.detach().to(torch.float32)

        def score(zz: torch.Tensor) -> float:
            ids = vocab[(F.normalize(zz, dim=-1) @ allowed_n.T).argmax(-1)]
            s = float(rec_loss(emb[ids], False))
            if opts.prior_weight:
                with torch.no_grad():
                    logits = tm.model(input_ids=ids).logits[:, :-1]
                    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:])
                s += opts.prior_weight * float(torch.exp(nll.clamp(max=20)))
            return s

        best_z, best = z, score(z)
        n, length = z.shape[0], z.shape[1]
        if length < 2:
            return z
        for _ in range(opts.swap_candidates):
            cand = z.clone()
            b = int(torch.randint(n, (1,), generator=gen))
            i, j = (int(v) for v in torch.randint(length, (2,), generator=gen))
            if int(torch.randint(2, (1,), generator=gen)):
                cand[b, [i, j]] = cand[b, [j, i]]  # swap two tokens
            else:
                row = list(range(length))
                row.insert(j, row.pop(i))  # move one token
                cand[b] = cand[b, row]
            s = score(cand)
            if s < best:
                best_z, best = cand, s
        return best_z


@register
class LampAttack(OptimizationAttack):
    """LAMP (cosine loss, prior-guided discrete swaps)."""

    name = "lamp"


@register
class TagAttack(OptimizationAttack):
    """TAG (Deng et al., Findings of EMNLP 2021): L2 + α·L1 matching, no prior."""

    name = "tag"
    citation = "Deng et al., TAG: Gradient Attack on Transformer-based Language Models, Findings of EMNLP 2021"
    threat_model = "honest-but-curious server; one update or a sum; public model; batch size announced"
    Options = TagOptions
