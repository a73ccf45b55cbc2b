"""Routing metrics and the expert-load report: the window's scalars, the collapse rule, the interval, the files it
writes and the image it hands to the metrics sink."""

import json

import pytest
import torch

from moe_model.routing import MoeRoutingMetrics
from moe_recipe.routing_report import (
    RoutingReport,
    collapse_threshold,
    collapse_warnings,
    imbalance,
    routing_metrics,
    shares,
)


def window(received, demand, dropped, aux=(0.0, 0.0), z=(0.0, 0.0)) -> MoeRoutingMetrics:
    return MoeRoutingMetrics(forwards=1, aux_loss_L=torch.tensor(aux), z_loss_L=torch.tensor(z),
                             received_LE=received, demand_LE=demand, dropped_L=dropped)


def test_routing_metrics_of_a_window():
    received = torch.tensor([[30.0, 10, 10, 10], [15, 15, 15, 15]])
    demand = torch.tensor([[50.0, 4, 3, 3], [15, 15, 15, 15]])
    totals = window(received, demand, torch.tensor([0.25, 0.0]), aux=(1.5, 1.25), z=(0.5, 0.75))
    metrics = routing_metrics(totals, layer_ids=[0, 1])
    assert [metrics[f"routing/layer_0/expert_{e}"] for e in range(4)] == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert metrics["routing/layer_0/max_load"] == pytest.approx(2.0)  # 30 routes of a mean 15: twice the fair share
    assert metrics["routing/layer_0/max_demand"] == pytest.approx(50 / 15)
    # received: deviations from the mean 15 are (15, -5, -5, -5): std sqrt(300 / 4) = 8.66, cv 8.66 / 15
    assert metrics["routing/layer_0/load_cv"] == pytest.approx(75**0.5 / 15)
    # demand: mean 15, deviations (35, -11, -12, -12): std sqrt((1225 + 121 + 144 + 144) / 4)
    assert metrics["routing/layer_0/demand_cv"] == pytest.approx((1634 / 4) ** 0.5 / 15)
    assert metrics["routing/layer_0/dropped_fraction"] == 0.25
    assert (metrics["routing/layer_0/aux_loss"], metrics["routing/layer_1/aux_loss"]) == (1.5, 1.25)
    assert (metrics["routing/layer_0/z_loss"], metrics["routing/layer_1/z_loss"]) == (0.5, 0.75)
    assert metrics["routing/layer_1/max_load"] == metrics["routing/layer_1/max_demand"] == pytest.approx(1.0)
    assert metrics["routing/layer_1/load_cv"] == metrics["routing/layer_1/demand_cv"] == 0.0
    assert not any("expert_bias" in name for name in metrics)  # no bias given
    torch.testing.assert_close(shares(demand).sum(dim=1), torch.ones(2))


def test_routing_metrics_use_decoder_layer_indices_and_show_the_expert_bias():
    """With first_k_dense_replace=1 and 3 layers the MoE layers are decoder layers 1 and 2, not 0 and 1."""
    received = torch.tensor([[4.0, 0], [1, 3]])
    bias = torch.tensor([[0.25, -0.25], [-0.5, 0.125]])
    metrics = routing_metrics(window(received, received, torch.zeros(2)), layer_ids=[1, 2], expert_bias_LE=bias)
    assert not any(name.startswith("routing/layer_0/") for name in metrics)
    assert metrics["routing/layer_1/expert_0"] == 1.0 and metrics["routing/layer_2/expert_1"] == 0.75
    assert metrics["routing/layer_1/max_load"] == 2.0 and metrics["routing/layer_1/load_cv"] == 1.0  # std 2, mean 2
    assert metrics["routing/layer_2/max_demand"] == 1.5 and metrics["routing/layer_2/demand_cv"] == 0.5
    assert [metrics[f"routing/layer_2/expert_bias_{e}"] for e in range(2)] == [-0.5, 0.125]
    assert (metrics["routing/layer_2/expert_bias_min"], metrics["routing/layer_2/expert_bias_max"]) == (-0.5, 0.125)
    assert (metrics["routing/layer_1/expert_bias_min"], metrics["routing/layer_1/expert_bias_max"]) == (-0.25, 0.25)


def test_imbalance_of_an_empty_layer_is_zero():
    max_over_mean, cv = imbalance(torch.zeros(1, 4))
    assert max_over_mean.item() == 0.0 and cv.item() == 0.0


@pytest.mark.parametrize("experts, k, threshold", [(8, 2, 0.3125), (64, 8, 3 / 64), (4, 2, 0.375), (16, 1, 3 / 16)])
def test_collapse_threshold(experts, k, threshold):
    assert collapse_threshold(experts, k) == pytest.approx(threshold)
    assert 1 / experts < threshold <= 1 / k  # above the fair share, reachable with top-k


def test_collapse_warning_names_the_layer_and_expert():
    balanced = [0.125] * 8
    collapsed = [0.45, 0.05, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]
    assert collapse_warnings([balanced, balanced], top_k=2, layer_ids=[0, 1]) == []
    (message,) = collapse_warnings([balanced, collapsed], top_k=2, layer_ids=[1, 3])  # decoder layers 1 and 3
    assert "layer 3" in message and "expert 0" in message and "45%" in message and "3.6x" in message


def test_report_interval_and_files(tmp_path):
    report = RoutingReport(tmp_path / "routing", interval=10, top_k=2, layer_ids=[1, 2])  # decoder indices
    assert not report.due(10)  # nothing observed yet
    received = torch.tensor([[30.0, 10, 10, 10], [15, 15, 15, 15]])
    demand = torch.tensor([[50.0, 4, 3, 3], [15, 15, 15, 15]])
    report.observe(received, demand, torch.tensor([0.2, 0.0]))
    assert [s for s in (4, 10, 14, 21, 25, 30) if report.due(s) and report.write(s)] == [10, 21, 30]
    assert report.due(31, last_step=True)

    snapshot = json.loads((tmp_path / "routing" / "expert_load_step_00000021.json").read_text())
    assert snapshot["received_share"][0] == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert snapshot["dropped_fraction"] == pytest.approx([0.2, 0.0])
    assert snapshot["layers"] == [1, 2]
    assert len(snapshot["warnings"]) == 1 and "in layer 1:" in snapshot["warnings"][0]
    png = (tmp_path / "routing" / "expert_load_step_00000021.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_report_hands_the_image_to_the_metrics_sink(tmp_path):
    logged = []

    class Sink:
        def log_image(self, name, path, step, caption=None):
            logged.append((name, path, step, caption))

    report = RoutingReport(tmp_path, interval=5, top_k=1, layer_ids=[0])
    report.observe(torch.tensor([[3.0, 1]]), torch.tensor([[3.0, 1]]), torch.tensor([0.0]))
    report.write(5, Sink())
    ((name, path, step, caption),) = logged
    assert name == "routing/expert_load" and step == 5 and caption == "step 5"
    assert path == tmp_path / "expert_load_step_00000005.png" and path.read_bytes().startswith(b"\x89PNG")


def test_off_when_interval_is_none(tmp_path):
    report = RoutingReport(tmp_path, interval=None, top_k=2, layer_ids=[0])
    report.observe(torch.ones(1, 4), torch.ones(1, 4), torch.zeros(1))
    assert not report.due(100) and not report.due(100, last_step=True)
