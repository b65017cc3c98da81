"""What the monotonicity study found for one model, as plain data.

Apart from the driver (`analysis.py`) that fills it and the report (`plots.py`) that draws it,
so the report imports the result and the driver imports the report, never in a circle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ModelAnalysis:
    """One model's results: what is written to JSON, CSV, the summary and the plots."""

    label: str
    model: str
    mode: str
    num_layers: int
    sequences: int
    tokens: int
    final_top1_accuracy: float  # vs the reference; in free_running mode a self-check (~1, float32 near-ties aside)
    truncated_inputs: int
    layers: list[dict]
    heuristic: dict
    examples: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)
