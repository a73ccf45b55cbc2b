"""Expert-load report: router demand against a naive count, the collapse rule, the interval, the files it writes."""

import json

import pytest
import torch

from moe_recipe.routing_report import (
    RoutingReport,
    collapse_threshold,
    collapse_warnings,
    router_demand,
    shares,
)


def test_router_demand_counts_each_tokens_top_k():
    torch.manual_seed(0)
    logits = (torch.randn(50, 6), torch.randn(50, 6))
    demand = router_demand(logits, top_k=2)
    for layer, logits_TE in enumerate(logits):
        expected = torch.zeros(6)
        for row in logits_TE:  # naive: sort each token's logits, count its two best experts
            for expert in row.argsort(descending=True)[:2]:
                expected[expert] += 1
        torch.testing.assert_close(demand[layer], expected)
    assert demand.sum().item() == 2 * 50 * 2
    torch.testing.assert_close(shares(demand).sum(dim=1), torch.ones(2))


def test_router_demand_of_real_model_outputs(tiny_model):
    model = tiny_model()
    out = model(input_ids=torch.randint(0, 128, (2, 16)))
    demand = router_demand(out.router_logits, model.config.num_experts_per_tok)
    assert demand.shape == (2, 4) and demand.sum(dim=1).tolist() == [64.0, 64.0]


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


def test_report_logs_the_image_to_wandb(tmp_path):
    logged = []

    class Run:
        def log(self, data, step):
            logged.append((step, data))

    report = RoutingReport(tmp_path, interval=5, top_k=1, layer_ids=[0])
    report.observe(torch.tensor([[3.0, 1]]), torch.tensor([[3.0, 1]]), torch.tensor([0.0]))
    report.write(5, Run())
    ((step, data),) = logged
    assert step == 5 and type(data["routing/expert_load"]).__name__ == "Image"


def test_off_when_interval_is_none(tmp_path):
    report = RoutingReport(tmp_path, interval=None, top_k=2, layer_ids=[0])
    report.observe(torch.ones(1, 4), torch.ones(1, 4), torch.zeros(1))
    assert not report.due(100) and not report.due(100, last_step=True)
