"""Training integrations: pruning inside a transformers ``Trainer`` run, and recovery training after a cut.

``SubpruneCallback`` is imported on first use: its base class loads transformers' training stack (and peft where
installed), seconds that ``import hf_subprune`` should not pay."""

from .recovery import RecoveryConfig, RecoveryResult, recover

__all__ = ["SubpruneCallback", "recover", "RecoveryConfig", "RecoveryResult"]


def __getattr__(name: str):
    if name == "SubpruneCallback":
        from .trainer import SubpruneCallback

        return SubpruneCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
