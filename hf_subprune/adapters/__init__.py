"""Architecture adapters, keyed by ``config.model_type``."""

from .base import (ADAPTERS, Adapter, AttentionSpec, MlpSpec, UnsupportedModelError, auto_class_for, get_adapter,
                   register_adapter)
from . import families  # noqa: F401  (registers the built-in families)

__all__ = ["ADAPTERS", "Adapter", "AttentionSpec", "MlpSpec", "UnsupportedModelError", "get_adapter", "register_adapter",
           "auto_class_for"]
