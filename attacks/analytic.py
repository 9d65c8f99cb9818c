"""Analytic primitives: what a single gradient gives away in closed form.

All three assume an honest-but-curious server holding one update (or a sum);
none needs a prior (attacks-and-auditing.md §1.1).

* ``bag-of-tokens``: with a trainable, *untied* input embedding, the gradient
  row of token ``v`` is non-zero iff ``v`` is an input somewhere in the batch
  (LAMP's ``--use_embedding``), so the non-zero rows are the batch's distinct
  tokens, exactly. With *tied* embeddings (SmolLM2) the output layer's gradient
  touches every row, and only the norm-based estimate of breaching's
  ``embedding-norm`` strategy is available: rows whose log-norm stands out
  (z-score above ``z``) are reported, explicitly as an estimate.
* ``lm-head-labels``: labels / next tokens from the output layer (iDLG, Zhao et
  al. 2020; Wainakh et al.): entries of a bias gradient ``p − y`` are negative
  exactly at the labels when each label occurs once; without a bias, rows whose
  norm stands out (the ``−1`` of the one-hot target dominates ``p``).
* ``linear-inversion``: a layer ``y = W x + b`` fed a single input vector (batch
  size 1, one position) has ``∇W = (∂L/∂y) xᵀ`` and ``∇b = ∂L/∂y``, so
  ``x = ∇W_i / ∇b_i`` for every row with ``∇b_i ≠ 0`` (Phong et al. 2017;
  breaching ``invert_fc_layer``). The rank-one structure is checked first: a
  batch or a sequence feeding the layer breaks it, and the layer is skipped
  with a note rather than returning an average of several inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import AttackConfigError
from .registry import Attack, AttackContext, register
from .results import Reconstruction, Status, reconstruction
from .target import TargetModel, canonical_name
from .views import Target

_EMBED_NAMES = ("embed_tokens", "wte", "word_embeddings")
_HEAD_NAMES = ("lm_head", "score", "classifier", "out_proj")


def _find(tm: TargetModel, grads: dict[str, torch.Tensor], modules: tuple[str, ...], part: str) -> tuple[str, torch.Tensor] | None:
    for name, g in grads.items():
        canon = canonical_name(name)
        mod, _, p = canon.rpartition(".")
        if p == part and mod.rsplit(".", 1)[-1] in modules:
            return canon, g
    return None


def _tied(tm: TargetModel) -> bool:
    cfg = getattr(tm.model, "config", None)
    return bool(getattr(cfg, "tie_word_embeddings", False))


def norm_outliers(norms: torch.Tensor, z: float) -> torch.Tensor:
    """Indices whose log-norm exceeds mean + z·std of the log-norms (breaching's embedding-norm rule)."""
    logs = torch.log(norms.clamp_min(1e-300))
    finite = norms > 0
    mu, sd = logs[finite].mean(), logs[finite].std()
    cut = mu + z * sd
    return torch.nonzero(finite & (logs > cut)).flatten()


@dataclass(frozen=True)
class BagOptions:
    """``z``: the log-norm z-score cutoff for tied embeddings; ``zero_tol``: relative norm counted as zero."""

    z: float = 3.0
    zero_tol: float = 1e-9

    def __post_init__(self) -> None:
        if self.z <= 0 or not 0 < self.zero_tol < 1:
            raise AttackConfigError("z must be > 0 and zero_tol in (0, 1)", key="attack.z")


@register
class BagOfTokensAttack(Attack):
    """Distinct input tokens from the embedding gradient (LAMP §3; breaching ``recover_token_information``)."""

    name = "bag-of-tokens"
    citation = "Balunović et al., LAMP, NeurIPS 2022 (embedding rows); Fowl et al., Decepticons, ICLR 2023 (norm estimate)"
    threat_model = "honest-but-curious server; one update or a sum; the input embedding trains"
    Options = BagOptions

    def invert(self, target: Target, ctx: AttackContext) -> Reconstruction:
        opts: BagOptions = self.options
        tm = ctx.model()
        grads = tm.gradients(target.vector)
        hit = _find(tm, grads, _EMBED_NAMES, "weight")
        if hit is None:
            return reconstruction(target, "not-applicable", notes=("the view carries no input-embedding gradient (embeddings frozen)",))
        name, g = hit
        norms = g.norm(dim=1)
        top = float(norms.max())
        if top == 0.0:
            return reconstruction(target, "unresolvable", notes=("the embedding gradient is zero",))
        nonzero = torch.nonzero(norms > opts.zero_tol * top).flatten()
        diag = {"embedding": name, "nonzero_rows": int(nonzero.numel()), "vocab": int(g.shape[0])}
        if not _tied(tm) and nonzero.numel() < g.shape[0]:
            toks = tuple(int(t) for t in nonzero)
            return reconstruction(target, "recovered", tokens=toks, diagnostics=diag,
                notes=("untied embedding: the non-zero rows are exactly the batch's distinct input tokens (counts unknown)",),
            )
        out = norm_outliers(norms, opts.z)
        toks = tuple(int(t) for t in out[torch.argsort(norms[out], descending=True)])
        return reconstruction(target, "partial", tokens=toks, diagnostics=diag | {"z": opts.z},
            notes=(
                "tied (or dense) embedding gradient: the output layer touches every row, so the tokens are a "
                f"norm-based estimate (log-norm z-score > {opts.z}), not exact",
            ),
        )


@dataclass(frozen=True)
class LabelOptions:
    """``z``: log-norm z-score cutoff for heads without a bias."""

    z: float = 3.0

    def __post_init__(self) -> None:
        if self.z <= 0:
            raise AttackConfigError("z must be > 0", key="attack.z")


@register
class LmHeadLabelsAttack(Attack):
    """Labels / next tokens from the output layer's gradient (iDLG; Wainakh et al.)."""

    name = "lm-head-labels"
    citation = "Zhao et al., iDLG, 2020; Wainakh et al., User-level label leakage, 2022"
    threat_model = "honest-but-curious server; one update or a sum; the output layer trains"
    Options = LabelOptions

    def invert(self, target: Target, ctx: AttackContext) -> Reconstruction:
        opts: LabelOptions = self.options
        tm = ctx.model()
        grads = tm.gradients(target.vector)
        bias = _find(tm, grads, _HEAD_NAMES, "bias")
        if bias is not None:
            name, b = bias
            labels = tuple(int(j) for j in torch.nonzero(b < 0).flatten())
            return reconstruction(target, "recovered" if labels else "unresolvable", labels=labels,
                diagnostics={"head": name},
                notes=("labels = negative entries of the output-bias gradient (exact when each label occurs once)",),
            )
        weight = _find(tm, grads, _HEAD_NAMES, "weight")
        if weight is None and _tied(tm):
            weight = _find(tm, grads, _EMBED_NAMES, "weight")
        if weight is None:
            return reconstruction(target, "not-applicable", notes=("the view carries no output-layer gradient",))
        name, w = weight
        if w.shape[0] < 3:
            return reconstruction(target, "not-applicable",
                notes=(f"{name} has {w.shape[0]} rows and no bias: its rows cancel (softmax gradients sum to zero), the sign of the label is not identifiable",),
            )
        out = norm_outliers(w.norm(dim=1), opts.z)
        return reconstruction(target, "partial", labels=tuple(int(j) for j in out), diagnostics={"head": name, "z": opts.z},
            notes=("labels = output rows with outlying gradient norm: an estimate (tied embeddings mix in input tokens)",),
        )


@dataclass(frozen=True)
class LinearOptions:
    """``rank_one_tol``: relative residual under which a weight gradient counts as rank one."""

    rank_one_tol: float = 1e-4

    def __post_init__(self) -> None:
        if not 0 < self.rank_one_tol < 1:
            raise AttackConfigError("rank_one_tol must be in (0, 1)", key="attack.rank_one_tol")


def invert_linear(gw: torch.Tensor, gb: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``x`` with ``∇W ≈ ∇b xᵀ`` (least squares over rows) and the relative residual."""
    gw, gb = gw.to(torch.float64), gb.to(torch.float64)
    denom = float(gb @ gb)
    if denom == 0.0:
        return torch.zeros(gw.shape[1], dtype=torch.float64), 1.0
    x = (gb @ gw) / denom
    resid = float((gw - torch.outer(gb, x)).norm() / gw.norm().clamp_min(1e-300))
    return x, resid


@register
class LinearInversionAttack(Attack):
    """Closed-form input of a biased linear layer at batch size 1 (Phong et al. 2017)."""

    name = "linear-inversion"
    citation = "Phong et al., Privacy-preserving deep learning via additively homomorphic encryption, 2017"
    threat_model = "honest-but-curious server; one client's update from a single input vector (batch size 1)"
    Options = LinearOptions

    def invert(self, target: Target, ctx: AttackContext) -> Reconstruction:
        opts: LinearOptions = self.options
        tm = ctx.model()
        grads = tm.gradients(target.vector)
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for name, g in grads.items():
            mod, _, part = canonical_name(name).rpartition(".")
            if part in ("weight", "bias"):
                by_module.setdefault(mod, {})[part] = g
        features: dict[str, tuple[float, ...]] = {}
        notes: list[str] = []
        diag: dict[str, float | int | str | bool] = {}
        for mod, parts in by_module.items():
            if set(parts) != {"weight", "bias"} or parts["weight"].ndim != 2:
                continue
            x, resid = invert_linear(parts["weight"], parts["bias"])
            diag[f"residual[{mod}]"] = resid
            if resid <= opts.rank_one_tol:
                features[mod] = tuple(float(v) for v in x)
            else:
                notes.append(f"{mod}: weight gradient is not rank one (residual {resid:.2e}): several inputs feed it")
        if not diag:
            return reconstruction(target, "not-applicable", notes=("the view has no linear layer with a trainable bias",))
        status: Status = "recovered" if features else "unresolvable"
        return reconstruction(target, status, features=features, notes=tuple(notes), diagnostics=diag)
