"""The variants of the statistics: which stream the consumer's input comes from, what it must reproduce, and
which block moves the hidden-state stream on. The runner reads this table and compares no variant names."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Variant", "VARIANTS", "DRIFT_CORRECTION", "drift_correction_for"]

DRIFT_CORRECTION = 0.5
"""The default share of the stream's drift the asymmetric target undoes in causal LMs. SmolLM2 at 20% from 4 and 8
WikiText-2 sequences, seeds 0 and 1 (``benchmarks/results/ood_diagnosis.md``): against 0, better in the calibration's
domain, on pydoc and on SST-2 in all 4 runs (by 0.8-4.5%), Python source within 1.3% either way; against 1 (the dense
stream as the target), better in 15 of 16 cells: undoing all of the drift fits the calibration's particular errors."""


@dataclass(frozen=True)
class Variant:
    """Attributes:
        inputs: ``"cut"`` (the block as pruned so far) or ``"original"`` (an uncut copy of it): whose consumer
            input the statistics read.
        target: ``"uncut_block"``: the uncut block's output of the site on the same block input, plus what the
            block's earlier cuts changed in the residual stream (so the MLP's refit also corrects the attention's
            cut), moved by ``drift_correction`` towards the dense model's stream after the site; ``"own_output"``:
            the consumer's input times its original weights.
        stream: ``"cut"`` or ``"original"``: the block the hidden states go through to reach the next block.
    """

    inputs: str
    target: str
    stream: str

    @property
    def needs_uncut_copy(self) -> bool:
        """Whether the runner keeps an uncut copy of the block: the uncut-block target needs only the uncut
        block's outputs, read before the first cut (``statistics.uncut_outputs``)."""
        return "original" in (self.inputs, self.stream)


VARIANTS: dict[str, Variant] = {
    "asymmetric": Variant(inputs="cut", target="uncut_block", stream="cut"),
    "sequential": Variant(inputs="cut", target="own_output", stream="cut"),
    "layerwise": Variant(inputs="original", target="own_output", stream="original"),
}


def drift_correction_for(correction: float | None, variant: str, causal_lm: bool) -> float:
    """The configured drift correction, or the default: ``DRIFT_CORRECTION`` where the target is the uncut block's
    output in a causal LM, 0 elsewhere (the other targets have no drift term; on the MiniLM SST-2 classifier 0.5
    moved accuracy by -0.2 to +0.7 points at n = 4-64, within the seed spread: ``minilm_drift.md``)."""
    if correction is not None:
        return float(correction)
    return DRIFT_CORRECTION if causal_lm and VARIANTS[variant].target == "uncut_block" else 0.0
