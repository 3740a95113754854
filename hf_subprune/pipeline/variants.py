"""The variants of the statistics: which stream the consumer's input comes from, what it must reproduce, and
which block moves the hidden-state stream on. The runner reads this table and compares no variant names."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Variant", "VARIANTS"]


@dataclass(frozen=True)
class Variant:
    """Attributes:
        inputs: ``"cut"`` (the block as pruned so far) or ``"original"`` (an uncut copy of it): whose consumer
            input the statistics read.
        target: ``"uncut_block"``: the uncut block's output of the site on the same block input, plus what the
            block's earlier cuts changed in the residual stream (so the MLP's refit also corrects the attention's
            cut); ``"own_output"``: the consumer's input times its original weights.
        stream: ``"cut"`` or ``"original"``: the block the hidden states go through to reach the next block.
    """

    inputs: str
    target: str
    stream: str

    @property
    def needs_uncut_copy(self) -> bool:
        return "original" in (self.inputs, self.stream) or self.target == "uncut_block"


VARIANTS: dict[str, Variant] = {
    "asymmetric": Variant(inputs="cut", target="uncut_block", stream="cut"),
    "sequential": Variant(inputs="cut", target="own_output", stream="cut"),
    "layerwise": Variant(inputs="original", target="own_output", stream="original"),
}
