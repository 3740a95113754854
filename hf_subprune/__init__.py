"""hf_subprune: structured pruning of transformers models by greedy submodular selection with a
least-squares refit of the next layer (El Halabi et al., NeurIPS 2022)."""

__version__ = "0.1.0"

from .adapters import ADAPTERS, UnsupportedModelError, get_adapter  # noqa: E402
from .api import PruneResult, count_parameters, prune  # noqa: E402
from .config import PruneConfig  # noqa: E402
from .integrations.recovery import recover  # noqa: E402

__all__ = ["prune", "recover", "PruneConfig", "PruneResult", "count_parameters", "ADAPTERS", "get_adapter",
           "UnsupportedModelError", "SubpruneCallback", "__version__"]


def __getattr__(name: str):
    """``SubpruneCallback`` on first use: transformers' Trainer stack takes seconds to import."""
    if name == "SubpruneCallback":
        from .integrations import SubpruneCallback

        return SubpruneCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
