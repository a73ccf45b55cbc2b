"""Routing metrics and expert-load heatmaps during training, and the warning when routing collapses onto a few experts.

Two [L, E] matrices per MoE layer and expert, summed over the log window and all ranks (`MoeRoutingMetrics`, from
the model's router states):
  - received: the (token, slot) routes each expert processed, after the capacity limit
    (`received_LE`); with drop_tokens no expert receives more than its capacity, so a collapse shows up here
    as dropped routes rather than as one dominant expert;
  - demand: the routes the router asked for, its top-k over the router logits before capacity
    (`demand_LE`); this is where collapse shows: one expert chosen far more often than its fair share 1/E.
Each report writes run_dir/routing/expert_load_step_N.png (received | demand heatmaps, drop fraction per layer) and
a .json with the numbers, hands the PNG to the metrics sink (W&B shows it), and logs a warning for each collapsed
layer.

Layers are named by their decoder layer index (MoeConfig.moe_layer_indices: with first_k_dense_replace=1 the first
MoE layer is layer 1), in metric names, heatmaps, reports and warnings alike.

Shape legend: L MoE layers, E experts, T tokens, k experts per token.
"""

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moe_model.routing import MoeRoutingMetrics

from .metrics import MetricsSink

log = logging.getLogger(__name__)

# A layer has collapsed when one expert's share of the router's choices exceeds COLLAPSE_FACTOR / E (fair share:
# 1/E), capped at half-way between 1/E and the most one expert can get with top-k routing, 1/k.
COLLAPSE_FACTOR = 3.0


def shares(counts_LE: torch.Tensor) -> torch.Tensor:
    """Each layer's counts as a share of its routes (rows sum to 1)."""
    return counts_LE / counts_LE.sum(dim=1, keepdim=True).clamp(min=1)


def imbalance(counts_LE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the busiest expert's count over the mean count (1.0 = balanced, E = all on one expert) and the
    coefficient of variation: the standard deviation of the counts over experts (population) over their mean."""
    mean_L = counts_LE.mean(dim=1).clamp(min=torch.finfo(counts_LE.dtype).tiny)
    return counts_LE.max(dim=1).values / mean_L, counts_LE.std(dim=1, correction=0) / mean_L


def routing_metrics(totals: MoeRoutingMetrics, layer_ids: list[int], expert_bias_LE: torch.Tensor | None = None
                    ) -> dict[str, float]:
    """The routing/layer_i/* scalars of one log window, i the decoder layer index (`layer_ids`, one per MoE layer):
    each expert's share of the received routes, the load imbalance of the received routes (max_load, load_cv) and
    of the router's demand (max_demand, demand_cv), the dropped share, the layer's balancing loss and z-loss, and,
    with the expert bias, its value per expert (at log time) and its min and max."""
    metrics = {}
    received_share = shares(totals.received_LE)
    max_load_L, load_cv_L = imbalance(totals.received_LE)
    max_demand_L, demand_cv_L = imbalance(totals.demand_LE)
    per_layer = {"dropped_fraction": totals.dropped_L, "max_load": max_load_L, "load_cv": load_cv_L,
                 "max_demand": max_demand_L, "demand_cv": demand_cv_L, "aux_loss": totals.aux_loss_L,
                 "z_loss": totals.z_loss_L}
    per_layer = {name: values_L.tolist() for name, values_L in per_layer.items()}
    for index, layer in enumerate(layer_ids):
        prefix = f"routing/layer_{layer}"
        for name, values in per_layer.items():
            metrics[f"{prefix}/{name}"] = values[index]
        for expert, value in enumerate(received_share[index].tolist()):
            metrics[f"{prefix}/expert_{expert}"] = value
        if expert_bias_LE is not None:
            bias = expert_bias_LE[index].tolist()
            metrics[f"{prefix}/expert_bias_min"], metrics[f"{prefix}/expert_bias_max"] = min(bias), max(bias)
            for expert, value in enumerate(bias):
                metrics[f"{prefix}/expert_bias_{expert}"] = value
    return metrics


def collapse_threshold(num_experts: int, top_k: int) -> float:
    return min(COLLAPSE_FACTOR / num_experts, (1 / num_experts + 1 / top_k) / 2)


def collapse_warnings(demand_share_LE: list[list[float]], top_k: int, layer_ids: list[int]) -> list[str]:
    """One message per MoE layer whose busiest expert takes far more than its share of the router's choices."""
    messages = []
    for layer, row in zip(layer_ids, demand_share_LE):
        E = len(row)
        expert = max(range(E), key=row.__getitem__)
        if row[expert] > collapse_threshold(E, top_k):
            messages.append(f"routing collapse in layer {layer}: the router sends {row[expert]:.0%} of its "
                            f"routes to expert {expert} ({row[expert] * E:.1f}x the fair share 1/{E}); raise "
                            "model.router_aux_loss_coef or lower the learning rate")
    return messages


@dataclass
class RoutingSnapshot:
    step: int
    layers: list[int]  # decoder layer indices of the MoE layers, as in the routing/layer_i/* metrics
    received_share: list[list[float]]  # [L][E]
    demand_share: list[list[float]]  # [L][E]
    dropped_fraction: list[float]  # [L]
    warnings: list[str]


def render_heatmap(snapshot: RoutingSnapshot, path: Path) -> Path:
    """Two heatmaps (layers x experts: received after capacity | router demand) and the drop fraction per layer."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    L, E = len(snapshot.layers), len(snapshot.received_share[0])
    vmax = max(max(max(r) for r in snapshot.received_share), max(max(r) for r in snapshot.demand_share))
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.3 * E * 2, 2 + 0.35 * L), sharey=True, squeeze=False)
    labels = [f"layer {layer} (dropped {d:.1%})" for layer, d in zip(snapshot.layers, snapshot.dropped_fraction)]
    for ax, data, title in ((axes[0, 0], snapshot.received_share, "received (after capacity)"),
                            (axes[0, 1], snapshot.demand_share, "router demand (top-k, before capacity)")):
        image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(E))
        ax.tick_params(axis="x", labelsize=6)
    axes[0, 0].set_yticks(range(L), labels, fontsize=7)
    fig.colorbar(image, ax=axes[0, :].tolist(), label=f"share of the layer's routes (fair: 1/{E} = {1 / E:.3f})")
    title = f"Expert load, step {snapshot.step}"
    if snapshot.warnings:
        title += f": COLLAPSE in {len(snapshot.warnings)} layer(s)"
    fig.suptitle(title, color="red" if snapshot.warnings else "black", fontsize=10, y=1.04)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


class RoutingReport:
    """Rank 0's periodic expert-load report: `observe` every log window, `write` when `due`. `layer_ids`: the
    decoder layer index of each MoE layer (MoeConfig.moe_layer_indices)."""

    def __init__(self, out_dir: Path, interval: int | None, top_k: int, layer_ids: list[int]) -> None:
        self.out_dir = out_dir
        self.interval = interval
        self.top_k = top_k
        self.layer_ids = layer_ids
        self.last_reported = 0
        self._latest: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._warned_no_matplotlib = False

    def observe(self, received_LE: torch.Tensor, demand_LE: torch.Tensor, dropped_L: torch.Tensor) -> None:
        """Keep the latest window's counts, summed over ranks (cheap: the PNG is only drawn when due)."""
        self._latest = (received_LE.detach().cpu(), demand_LE.detach().cpu(), dropped_L.detach().cpu())

    def due(self, step: int, last_step: bool = False) -> bool:
        """At the first observed step in each new `interval` (works when interval is not a multiple of the log
        interval), and at the last step."""
        if self.interval is None or self._latest is None:
            return False
        return last_step or step // self.interval > self.last_reported // self.interval

    def write(self, step: int, sink: MetricsSink | None = None) -> RoutingSnapshot:
        received, demand, dropped = self._latest
        demand_share = shares(demand).tolist()
        snapshot = RoutingSnapshot(
            step=step, layers=self.layer_ids, received_share=shares(received).tolist(), demand_share=demand_share,
            dropped_fraction=dropped.tolist(), warnings=collapse_warnings(demand_share, self.top_k, self.layer_ids),
        )
        for message in snapshot.warnings:
            log.warning("step %d: %s", step, message)
        stem = self.out_dir / f"expert_load_step_{step:08d}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(asdict(snapshot), indent=1))
        png = self._render(snapshot, stem.with_suffix(".png"))
        if png is not None and sink is not None:
            sink.log_image("routing/expert_load", png, step, caption="; ".join(snapshot.warnings) or f"step {step}")
        self.last_reported = step
        return snapshot

    def _render(self, snapshot: RoutingSnapshot, path: Path) -> Path | None:
        try:
            return render_heatmap(snapshot, path)
        except ImportError:
            if not self._warned_no_matplotlib:
                log.warning("matplotlib is not installed: expert-load heatmaps are saved as JSON only "
                            "(pip install matplotlib)")
                self._warned_no_matplotlib = True
            return None


__all__ = ["COLLAPSE_FACTOR", "RoutingReport", "RoutingSnapshot", "collapse_warnings", "imbalance",
           "render_heatmap", "routing_metrics", "shares"]
