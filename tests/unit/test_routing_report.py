"""Routing metrics and the expert-load report: the window's scalars, the collapse rule, the interval, the files it
writes and the image it hands to the metrics sink."""

import json

import pytest
import torch

from moe_recipe.routing_report import (
    RoutingReport,
    collapse_threshold,
    collapse_warnings,
    routing_metrics,
    shares,
)


def test_routing_metrics_of_a_window():
    received = torch.tensor([[30.0, 10, 10, 10], [15, 15, 15, 15]])
    demand = torch.tensor([[50.0, 4, 3, 3], [15, 15, 15, 15]])
    metrics = routing_metrics(received, demand, torch.tensor([0.25, 0.0]))
    assert [metrics[f"routing/layer_0/expert_{e}"] for e in range(4)] == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert metrics["routing/layer_0/max_load"] == pytest.approx(2.0)  # 0.5 of the routes, fair share 0.25
    assert metrics["routing/layer_0/max_demand"] == pytest.approx(50 / 60 * 4)
    assert metrics["routing/layer_0/dropped_fraction"] == 0.25
    assert metrics["routing/layer_1/max_load"] == metrics["routing/layer_1/max_demand"] == pytest.approx(1.0)
    torch.testing.assert_close(shares(demand).sum(dim=1), torch.ones(2))


@pytest.mark.parametrize("experts, k, threshold", [(8, 2, 0.3125), (64, 8, 3 / 64), (4, 2, 0.375), (16, 1, 3 / 16)])
def test_collapse_threshold(experts, k, threshold):
    assert collapse_threshold(experts, k) == pytest.approx(threshold)
    assert 1 / experts < threshold <= 1 / k  # above the fair share, reachable with top-k


def test_collapse_warning_names_the_layer_and_expert():
    balanced = [0.125] * 8
    collapsed = [0.45, 0.05, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]
    assert collapse_warnings([balanced, balanced], top_k=2, layer_ids=[0, 1]) == []
    (message,) = collapse_warnings([balanced, collapsed], top_k=2, layer_ids=[0, 1])
    assert "MoE layer 1" in message and "expert 0" in message and "45%" in message and "3.6x" in message


def test_report_interval_and_files(tmp_path):
    report = RoutingReport(tmp_path / "routing", interval=10, top_k=2, layer_ids=[0, 1])
    assert not report.due(10)  # nothing observed yet
    received = torch.tensor([[30.0, 10, 10, 10], [15, 15, 15, 15]])
    demand = torch.tensor([[50.0, 4, 3, 3], [15, 15, 15, 15]])
    report.observe(received, demand, torch.tensor([0.2, 0.0]))
    assert [s for s in (4, 10, 14, 21, 25, 30) if report.due(s) and report.write(s)] == [10, 21, 30]
    assert report.due(31, last_step=True)

    snapshot = json.loads((tmp_path / "routing" / "expert_load_step_00000021.json").read_text())
    assert snapshot["received_share"][0] == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert snapshot["dropped_fraction"] == pytest.approx([0.2, 0.0])
    assert len(snapshot["warnings"]) == 1 and "MoE layer 0" in snapshot["warnings"][0]
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
