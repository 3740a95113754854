"""Allocating one parameter budget over many sites from their error curves (pure Python on numbers).

Each site offers a few widths, each with the parameters it keeps and the error it costs; ``allocate`` picks
one per site, minimising the summed error within the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SiteOptions", "allocate", "mlp_options"]

@dataclass(frozen=True)
class SiteOptions:
    """The widths one site may take, with the parameters each keeps and the relative error it costs
    (read off the site's greedy error curve on the original model's statistics)."""

    block: int
    kind: str  # "mlp" or "attention"
    widths: tuple[tuple[int, int] | int, ...]  # MLP: neurons; attention: (heads, kv_heads)
    params: tuple[int, ...]
    errors: tuple[float, ...]


def allocate(options: list[SiteOptions], budget: int) -> list[int]:
    """Pick one option per site, minimising the summed error with at most ``budget`` parameters.

    A Lagrangian relaxation (each site minimises ``error + lam * params``, ``lam`` found by bisection) gives
    a point on the lower convex hull of every curve; the slack left under the budget is then spent greedily
    on the upgrades with the best error reduction per parameter. Returns the chosen option index per site.
    """
    if sum(min(o.params) for o in options) > budget:
        raise ValueError("the parameter budget is below the minimum widths: lower the sparsity or the minimum width")

    def choose(lam: float) -> list[int]:
        return [min(range(len(o.params)), key=lambda j: (o.errors[j] + lam * o.params[j], -o.params[j])) for o in options]

    def cost(pick: list[int]) -> int:
        return sum(o.params[j] for o, j in zip(options, pick))

    lo, hi = 0.0, 1.0
    while cost(choose(hi)) > budget:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(choose(mid)) > budget else (lo, mid)
    pick = choose(hi)
    while True:  # spend the slack: best error reduction per extra parameter that still fits
        slack = budget - cost(pick)
        best, best_rate = None, 0.0
        for s, (o, j) in enumerate(zip(options, pick)):
            for j2 in range(len(o.params)):
                extra = o.params[j2] - o.params[j]
                if 0 < extra <= slack and o.errors[j2] < o.errors[j]:
                    rate = (o.errors[j] - o.errors[j2]) / extra
                    if rate > best_rate:
                        best, best_rate = (s, j2), rate
        if best is None:
            return pick
        pick[best[0]] = best[1]


def mlp_options(curve_errors: list[float], target: float, width: int, per_neuron: int, multiple: int,
                min_width: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]:
    """MLP widths on the rounding grid, from the full greedy curve (error after keeping k neurons)."""
    widths = [w for w in range(multiple, width + 1, multiple) if w >= min_width] or [width]
    if widths[-1] != width:
        widths.append(width)
    errors = [(curve_errors[w - 1] if w < width else 0.0) / max(target, 1e-30) for w in widths]
    return tuple(widths), tuple(w * per_neuron for w in widths), tuple(errors)
