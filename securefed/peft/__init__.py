"""PEFT methods (registry) and the adapter spec that clients exchange."""

from .registry import PEFT_METHODS, AdapterOptions, LoraMethod, PeftMethod, PeftRegistry
from .spec import AdapterSpec, TensorSpec

__all__ = ["PEFT_METHODS", "AdapterOptions", "AdapterSpec", "LoraMethod", "PeftMethod", "PeftRegistry", "TensorSpec"]
