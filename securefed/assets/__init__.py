"""Embedded, offline models and data sets (see docs/assets.md)."""

from .data import DATASETS, DatasetSplits, Example, load_dataset
from .models import MODEL_ASSETS, LoadedModel, load_model, prepare_model

__all__ = ["DATASETS", "MODEL_ASSETS", "DatasetSplits", "Example", "LoadedModel", "load_dataset", "load_model", "prepare_model"]
