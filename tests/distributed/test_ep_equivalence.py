"""Expert parallelism must not change the maths: EP 1, 2, 4 and EP 2 x DP 2 train to the same losses, routes, grad
norms, weights and expert bias over 20 steps with a balancing method on: the global-batch balancing loss, or the
auxiliary-loss-free expert bias. DeepSpeed's per-rank aux loss is the counter-example. Runs: conftest.py's RUNS."""

import math

import pytest
import torch

pytestmark = pytest.mark.distributed

# (world size, run), each compared with the same run at world 1, EP 1, ZeRO 2.
LAYOUTS = {
    "global": [(2, "deepspeed:global:2:2"), (4, "deepspeed:global:2:4"), (4, "deepspeed:global:2:2"),
               (4, "deepspeed:global:1:2")],
    "bias": [(2, "deepspeed:bias:2:2"), (4, "deepspeed:bias:2:4"), (4, "deepspeed:bias:2:2")],
}


def assert_same_training(run: dict, reference: dict, layout: str) -> None:
    """Routes per expert and the expert bias exactly (counts, and sums of +-rate steps decided by counts); losses
    and grad norms to float tolerance. Measured over 20 steps: loss, lm and balancing loss within 5e-7 relative,
    z-loss (a square of the router's logsumexp, 0.01 of the loss) within 1.2e-5, grad norms within 1.5e-5."""
    assert torch.equal(run["router_demand"], reference["router_demand"]), layout
    assert torch.equal(run["tokens_per_expert"], reference["tokens_per_expert"]), layout
    if reference["expert_bias"] is not None:
        assert torch.equal(run["expert_bias"], reference["expert_bias"]), layout
    losses, reference_losses = torch.tensor(run["losses"]), torch.tensor(reference["losses"])
    torch.testing.assert_close(losses[:, :3], reference_losses[:, :3], rtol=1e-6, atol=0, msg=layout)
    torch.testing.assert_close(losses[:, 3], reference_losses[:, 3], rtol=5e-5, atol=0, msg=layout)
    if not math.isnan(run["grad_norms"][0]):  # none without clipping at ZeRO 0 (DeepSpeed keeps none there)
        torch.testing.assert_close(run["grad_norms"], reference["grad_norms"], rtol=5e-5, atol=0, msg=layout)


def assert_same_weights(run: dict, reference: dict, layout: str) -> None:
    assert run["weights"].keys() == reference["weights"].keys()
    for name, tensor in reference["weights"].items():
        torch.testing.assert_close(run["weights"][name], tensor, rtol=1e-4, atol=5e-5, msg=f"{layout}: {name}")


@pytest.mark.parametrize("balance", ["global", "bias"])
def test_expert_parallel_layouts_agree(layout_runs, balance):
    reference = layout_runs(1)[f"deepspeed:{balance}:2:1"]
    losses = torch.tensor(reference["losses"])  # [step, (loss, lm_loss, aux_loss, z_loss)]
    assert losses[-4:, 0].sum() < losses[:4, 0].sum(), "the runs must train for their agreement to mean anything"
    assert min(reference["grad_norms"]) > 0.05, "clipping must be active for the comparison to cover it"
    if balance == "global":
        assert (losses[:, 2] > 1.0).all(), "the balancing loss must be in the loss (1.0 only when balanced)"
    else:
        bias_SLE = reference["expert_bias"]  # after each step; zero before the first
        moves_SL = (bias_SLE.diff(dim=0, prepend=torch.zeros_like(bias_SLE[:1])) != 0).any(dim=-1)
        assert moves_SL.all(), "the bias must move every step, in every layer"
    for world, spec in LAYOUTS[balance]:
        run, layout = layout_runs(world)[spec], f"world {world}, {spec}"
        assert_same_training(run, reference, layout)
        assert_same_weights(run, reference, layout)


def test_zero0_expert_parallel_layout_agrees_without_clipping(layout_runs):
    reference, run = layout_runs(1)["deepspeed:global:2:1:noclip"], layout_runs(4)["deepspeed:global:0:2:noclip"]
    assert_same_training(run, reference, "world 4, deepspeed:global:0:2:noclip")
    assert_same_weights(run, reference, "world 4, deepspeed:global:0:2:noclip")


def test_zero0_expert_parallel_layout_agrees_with_clipping(layout_runs):
    """At ZeRO 0 the recipe clips by the norm of the whole gradient itself (engine.clip_grad_norm): DeepSpeed 0.19.8's
    clip_grad_norm_ averages the ranks' norms, each over its own experts, and its clip factor depends on ep_size."""
    reference, run = layout_runs(1)["deepspeed:global:2:1"], layout_runs(4)["deepspeed:global:0:2"]
    assert min(run["grad_norms"]) > 0.05, "clipping must be active for the comparison to cover it"
    assert_same_training(run, reference, "world 4, deepspeed:global:0:2")
    assert_same_weights(run, reference, "world 4, deepspeed:global:0:2")


def test_expert_bias_changes_the_routes(layout_runs):
    """Without this, layouts that all ignored the bias would agree as well. Step 1 trains alike with and without
    the bias (it is still zero, and 'bias' has no loss); step 2 routes with the bias that step 1's load set."""
    runs = layout_runs(1)
    for backend, zero_stage in (("deepspeed", 2), ("autoep", 0)):
        with_bias, without = runs[f"{backend}:bias:{zero_stage}:1"], runs[f"{backend}:none:{zero_stage}:1:2"]
        assert with_bias["losses"][0] == without["losses"][0], backend
        assert not torch.equal(with_bias["router_demand"][1], without["router_demand"][1]), backend
        assert with_bias["losses"][1][1] != without["losses"][1][1], backend


def test_deepspeed_aux_loss_depends_on_the_layout(layout_runs):
    """DeepSpeed's aux loss (router_balance 'aux') is computed per rank on its local tokens, so the first step's
    loss, from the same weights and tokens, differs between EP 1 and EP 2 x DP 2 in the balancing term alone."""
    one = torch.tensor(layout_runs(1)["deepspeed:aux:2:1:1"]["losses"][0])
    four = torch.tensor(layout_runs(4)["deepspeed:aux:2:2:1"]["losses"][0])
    torch.testing.assert_close(four[[1, 3]], one[[1, 3]], rtol=1e-6, atol=0)  # lm loss, z loss
    assert abs(four[2] - one[2]) > 1e-3, (four[2], one[2])
    assert abs(four[0] - one[0]) > 1e-4, (four[0], one[0])
