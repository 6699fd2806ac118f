"""Online energy filtering inside the kernel (DynSparse's cumulative energy, and BLASST).

The static mask (WEST/FAST) decides which KV blocks a query tile visits; the filter decides which
visited blocks cost exp and P*V. The rule and its reference are in
:func:`scaling_attn_compile.contract.reference.energy_filtered_attention_reference`.

    scaling_attn_backend(plan, energy_filter=EnergyFilter("cumulative", recall_budget=1.46))
    plan = plan.with_energy_filter(EnergyFilter("blasst", threshold=math.log(1e-4)))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from ..contract.masks import ENERGY_RULES
from .op import lambda_from_recall


@dataclass(frozen=True)
class EnergyFilter:
    """Which rule, at which threshold, for which layers.

    Attributes:
        rule: ``"cumulative"`` (skip a block when ``m_blk - LSE < lambda``) or ``"blasst"``
            (``m_blk - m < lambda``, i.e. ``lambda = ln(lambda_B)``).
        threshold: ``lambda`` in natural-log units, the same for every layer.
        recall_budget: DynSparse's ``P_real``: ``lambda = ln(P_real) + ln(128 / S)``, which
            scales with the sequence length. Give ``threshold`` or ``recall_budget``.
        layers: per-layer ``lambda`` overrides ``{layer: lambda}``; ``None`` in a value turns the
            filter off for that layer.
    """

    rule: str = "cumulative"
    threshold: float | None = None
    recall_budget: float | None = None
    layers: Mapping[int, float | None] | None = None

    def __post_init__(self):
        if self.rule not in ("cumulative", "blasst"):
            raise ValueError(f"EnergyFilter.rule: expected 'cumulative' or 'blasst', got {self.rule!r}")
        if (self.threshold is None) == (self.recall_budget is None):
            raise ValueError("EnergyFilter: give exactly one of threshold (lambda, natural log) or "
                             f"recall_budget (P_real); got threshold={self.threshold}, "
                             f"recall_budget={self.recall_budget}")
        if self.threshold is not None and math.isnan(self.threshold):
            raise ValueError("EnergyFilter.threshold: expected a number, got nan")
        if self.recall_budget is not None and not self.recall_budget > 0:
            raise ValueError(f"EnergyFilter.recall_budget: expected > 0, got {self.recall_budget}")

    def for_layer(self, layer: int, seq_len: int) -> tuple[int, float]:
        """``(energy_rule, energy_threshold)`` op arguments for ``layer``; ``(0, 0.0)`` is off."""
        if self.layers is not None and layer in self.layers:
            lam = self.layers[layer]
            return (0, 0.0) if lam is None else (ENERGY_RULES[self.rule], float(lam))
        if self.threshold is not None:
            return ENERGY_RULES[self.rule], float(self.threshold)
        return ENERGY_RULES[self.rule], lambda_from_recall(self.recall_budget, seq_len)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["layers"] is not None:
            d["layers"] = {str(k): v for k, v in d["layers"].items()}  # JSON keys are strings
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> EnergyFilter:
        d = dict(d)
        if d.get("layers") is not None:
            d["layers"] = {int(k): v for k, v in d["layers"].items()}
        return cls(**d)
