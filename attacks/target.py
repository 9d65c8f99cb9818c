"""The attacker's copy of the public model, and what each update coordinate means.

The server knows the base model (by name) and the global adapter it
broadcast, so it can rebuild the exact model every client started the round
from. :class:`TargetModel` does that and maps a target vector back onto named
tensors: for plain SGD an update is ``-learning_rate x (sum of the local
gradients)``, so ``-update / (learning_rate x local_steps)`` is the average
gradient (for one step, exactly the client's gradient); for FedAvg with several
steps it is DAGER's pseudo-gradient (Petrov et al., NeurIPS 2024, §1.10 of
attacks-and-auditing.md).

Spec names are read by role (layer index, module, part), so the peft names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``)
and plain parameter names (``model.layers.0.self_attn.q_proj.weight``) both
resolve; every spec tensor must match a model tensor's shape, or the view is
rejected with :class:`~securefed.attacks.errors.ViewMismatchError`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import UnsupportedModelError, ViewMismatchError
from .views import PublicKnowledge

#: Loads the public model for a view: returns ``(model, tokenizer)``.
ModelLoader = Callable[[PublicKnowledge], tuple[nn.Module, Any]]

_LAYER_PART = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<module>\w+?)"
    r"(?:\.(?P<lora>lora_[AB])(?:\.\w+)?)?\.(?P<part>weight|bias)$"
)
_LAYER_NORM = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.(?P<module>\w*norm\w*)\.weight$")
_WRAPPERS = ("base_model.model.",)


def default_loader(public: PublicKnowledge) -> tuple[nn.Module, Any]:
    """Load ``public.model_name`` through :func:`securefed.assets.models.load_model`."""
    from securefed.assets.models import load_model

    task: Any = public.task
    loaded = load_model(public.model_name, task=task, num_labels=public.num_labels, seed=public.model_seed)
    return loaded.model, loaded.tokenizer


@dataclass(frozen=True)
class ParamRole:
    """What one spec tensor is: ``part`` is ``weight``, ``bias``, ``lora_A`` or ``lora_B``."""

    name: str
    layer: int | None
    module: str
    part: str


def parse_role(name: str) -> ParamRole:
    m = _LAYER_PART.search(name)
    if m:
        part = m.group("lora") or m.group("part")
        return ParamRole(name, int(m.group("layer")), m.group("module"), part)
    m = _LAYER_NORM.search(name)
    if m:
        return ParamRole(name, int(m.group("layer")), m.group("module"), "weight")
    canon = canonical_name(name)
    module, _, part = canon.rpartition(".")
    return ParamRole(name, None, module.rsplit(".", 1)[-1], part)


def canonical_name(name: str) -> str:
    """A spec name as the bare model names it (peft wrappers stripped)."""
    for w in _WRAPPERS:
        if name.startswith(w):
            name = name[len(w) :]
    return name.replace(".modules_to_save.default", "").replace(".original_module", "")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder/encoder block list (``model.model.layers`` for Llama-family models)."""
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return mod
    raise UnsupportedModelError(
        f"{type(model).__name__} has no 'layers' module list: only Llama-family decoders "
        "(Llama, SmolLM2, Mistral, Qwen2) are supported by the layer-wise attacks"
    )


def _linear(layer: nn.Module, module: str) -> nn.Linear:
    for block in ("self_attn", "mlp"):
        parent = getattr(layer, block, None)
        lin = getattr(parent, module, None) if parent is not None else None
        if isinstance(lin, nn.Linear):
            return lin
    raise ViewMismatchError(f"the model's layers have no linear module {module!r}")


class TargetModel:
    """The public model as every client had it at the start of the round.

    Attributes:
        model: the base model with the global adapter merged in (eval mode, no grad).
        tokenizer: the public tokenizer.
        roles: spec name -> :class:`ParamRole`.
        merged: whether the global adapter could be applied to the weights (so a
            forward pass reproduces the clients' starting model).
    """

    def __init__(self, public: PublicKnowledge, model: nn.Module, tokenizer: Any) -> None:
        self.public = public
        # A private copy: merging the global adapter must not alter the caller's model.
        self.model: Any = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.roles = {t.name: parse_role(t.name) for t in public.spec.tensors}
        self.merged = False
        self._check_spec()
        self._apply_global()

    @classmethod
    def load(cls, public: PublicKnowledge, loader: ModelLoader | None = None) -> TargetModel:
        model, tok = (loader or default_loader)(public)
        return cls(public, model, tok)

    # -- spec <-> model ---------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.public.peft_method

    def lora_scaling(self) -> float:
        cfg = self.public.peft_config
        r = cfg.get("r")
        alpha = cfg.get("alpha", cfg.get("lora_alpha"))
        if not isinstance(r, int | float) or not isinstance(alpha, int | float) or r <= 0:
            raise ViewMismatchError("a LoRA view needs numeric peft_config['r'] and peft_config['alpha']")
        if cfg.get("use_rslora"):
            return float(alpha) / float(r) ** 0.5
        return float(alpha) / float(r)

    def _model_param(self, name: str) -> torch.Tensor | None:
        canon = canonical_name(name)
        params = dict(self.model.named_parameters())
        if canon in params:
            return params[canon]
        hits = [p for n, p in params.items() if n.endswith("." + canon) or canon.endswith("." + n)]
        return hits[0] if len(hits) == 1 else None

    def _check_spec(self) -> None:
        spec = self.public.spec
        if self.method not in ("full", "lora"):
            return
        layers = decoder_layers(self.model) if any(r.layer is not None for r in self.roles.values()) else None
        for t in spec.tensors:
            role = self.roles[t.name]
            if role.part in ("lora_A", "lora_B"):
                if layers is None or role.layer is None or role.layer >= len(layers):
                    raise ViewMismatchError(f"spec tensor {t.name} names layer {role.layer}, absent from the model")
                lin = _linear(layers[role.layer], role.module)
                r = int(self.public.peft_config.get("r") or 0)  # type: ignore[arg-type]
                want = (r, lin.in_features) if role.part == "lora_A" else (lin.out_features, r)
                if t.shape != want:
                    raise ViewMismatchError(
                        f"spec tensor {t.name} has shape {t.shape}; model {self.public.model_name!r} "
                        f"with r={r} needs {want}"
                    )
                continue
            p = self._model_param(t.name)
            if p is None:
                raise ViewMismatchError(
                    f"spec tensor {t.name} is not a parameter of model {self.public.model_name!r}: "
                    "the view was recorded with another model or PEFT method"
                )
            if tuple(p.shape) != t.shape:
                raise ViewMismatchError(
                    f"spec tensor {t.name} has shape {t.shape}, model {self.public.model_name!r} has {tuple(p.shape)}"
                )

    def _apply_global(self) -> None:
        if self.method not in ("full", "lora"):
            return
        state = self.public.spec.unflatten(np.asarray(self.public.global_vector))
        with torch.no_grad():
            if self.method == "lora":
                layers = decoder_layers(self.model)
                scale = self.lora_scaling()
                pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
                for name, value in state.items():
                    role = self.roles[name]
                    if role.part in ("lora_A", "lora_B") and role.layer is not None:
                        pairs.setdefault((role.layer, role.module), {})[role.part] = value
                    else:
                        p = self._model_param(name)
                        assert p is not None
                        p.copy_(value.to(p.dtype))
                for (layer, module), ab in pairs.items():
                    if set(ab) != {"lora_A", "lora_B"}:
                        raise ViewMismatchError(f"layer {layer} {module}: the spec holds only {sorted(ab)}")
                    lin = _linear(layers[layer], module)
                    lin.weight += (scale * ab["lora_B"].double() @ ab["lora_A"].double()).to(lin.weight.dtype)
            else:
                for name, value in state.items():
                    p = self._model_param(name)
                    assert p is not None
                    p.copy_(value.to(p.dtype))
        self.merged = True

    # -- updates -> gradients ---------------------------------------------------------------
    def gradients(self, vector: np.ndarray, *, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
        """Named pseudo-gradients ``-vector / (lr x local_steps)`` of a target vector.

        For an aggregate of several clients this is the (weighted) sum of their
        average gradients; span tests do not depend on the scale.
        """
        self.public.spec.check(np.asarray(vector, dtype=np.float32))
        scale = -1.0 / (self.public.learning_rate * self.public.local_steps)
        flat = torch.from_numpy(np.asarray(vector, dtype=np.float64) * scale)
        out: dict[str, torch.Tensor] = {}
        i = 0
        for t in self.public.spec.tensors:
            out[t.name] = flat[i : i + t.numel].reshape(t.shape).to(dtype)
            i += t.numel
        return out

    def find(self, grads: dict[str, torch.Tensor], layer: int | None, module: str, part: str) -> torch.Tensor | None:
        for name, role in self.roles.items():
            if role.layer == layer and role.module == module and role.part == part:
                return grads[name]
        return None

    def global_tensor(self, layer: int, module: str, part: str) -> torch.Tensor | None:
        state = None
        for t in self.public.spec.tensors:
            role = self.roles[t.name]
            if role.layer == layer and role.module == module and role.part == part:
                state = state or self.public.spec.unflatten(np.asarray(self.public.global_vector))
                return state[t.name].double()
        return None

    def has(self, parts: Iterable[str]) -> bool:
        wanted = set(parts)
        return any(r.part in wanted for r in self.roles.values())
