"""PEFT method registry: how to build an adapter, what trains, how it flattens.

A :class:`PeftMethod` wraps a frozen base model with trainable adapter tensors
and exposes them as an ordered state dict, so the federated loop only ever
exchanges those tensors (as a flat vector described by an
:class:`~securefed.peft.spec.AdapterSpec`). Base weights never leave a client.

Methods register by name in :data:`PEFT_METHODS` (an object, so tests can build
their own registry). ``supports_dp`` records whether the method passed the
per-sample gradient oracle under Opacus (environment-and-assets.md §2.1):
methods that fail it are refused under DP.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from securefed.errors import ConfigError

from .spec import AdapterSpec


@dataclass(frozen=True)
class AdapterOptions:
    """Options shared by the registered methods (each method reads what it needs)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    train_head: bool = True

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"rank must be >= 1, got {self.r}", key="peft.r")
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}", key="peft.alpha")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}", key="peft.dropout")
        if not self.target_modules:
            raise ConfigError("target_modules must name at least one module", key="peft.target_modules")


class PeftMethod(ABC):
    name: ClassVar[str]
    supports_dp: ClassVar[bool]
    citation: ClassVar[str]

    @abstractmethod
    def apply(self, model: nn.Module, options: AdapterOptions, *, task: str) -> nn.Module:
        """Freeze ``model`` and attach the adapter; returns the wrapped model."""

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable tensors, in a fixed order (parameter registration order)."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def spec(self, model: nn.Module) -> AdapterSpec:
        return AdapterSpec.from_state(self.name, self.trainable_state(model))

    def load_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into the model's trainable tensors in place."""
        own = self.trainable_state(model)
        if set(own) != set(state):
            raise ConfigError("adapter state does not match the model's trainable tensors")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state[n].to(p.dtype))


class LoraMethod(PeftMethod):
    """LoRA (Hu et al., ICLR 2022) through ``peft``: W + (alpha/r) B A, A and B trainable.

    For sequence classification the new classification head trains too (it is
    randomly initialised and must be learned); it is part of the adapter spec.
    """

    name = "lora"
    supports_dp = True
    citation = "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022"

    def apply(self, model: nn.Module, options: AdapterOptions, *, task: str) -> nn.Module:
        from peft import LoraConfig, TaskType, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [m for m in options.target_modules if m not in names]
        if missing:
            raise ConfigError(
                f"target modules {missing} do not exist in this model (it has e.g. "
                f"{sorted(n for n in names if 'proj' in n or 'attn' in n)[:8]})",
                key="peft.target_modules",
            )
        cfg = LoraConfig(
            r=options.r,
            lora_alpha=options.alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
            lora_dropout=options.dropout,
            target_modules=list(options.target_modules),
            task_type=TaskType.SEQ_CLS if task == "seq-cls" else TaskType.CAUSAL_LM,
            bias="none",
        )
        peft_model = get_peft_model(model, cfg)
        if task == "seq-cls" and not options.train_head:
            for n, p in peft_model.named_parameters():
                if "modules_to_save" in n:
                    p.requires_grad_(False)
        return peft_model


class PeftRegistry:
    def __init__(self) -> None:
        self._methods: dict[str, PeftMethod] = {}

    def register(self, method: PeftMethod, *, replace: bool = False) -> None:
        if method.name in self._methods and not replace:
            raise ConfigError(f"PEFT method {method.name!r} already registered")
        self._methods[method.name] = method

    def get(self, name: str) -> PeftMethod:
        try:
            return self._methods[name]
        except KeyError:
            raise ConfigError(
                f"unknown PEFT method {name!r}; choose one of {sorted(self._methods)}", key="peft.method"
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._methods))

    def items(self) -> list[tuple[str, PeftMethod]]:
        return sorted(self._methods.items())


PEFT_METHODS = PeftRegistry()
PEFT_METHODS.register(LoraMethod())
