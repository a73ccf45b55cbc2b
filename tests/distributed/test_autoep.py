"""moe_backend=autoep trains like moe_backend=deepspeed: DeepSpeed AutoEP (dropless, grouped GEMM) at EP 1, 2 and 4
and EP 2 x DP 2, with ZeRO 0, 2 and 3, gives the losses, routes, clipped grad norms and expert bias of the native MoE
layer over 20 steps, with the global balancing loss and with the expert bias, through the recipe's config and engine
wiring.
Gloo on CPU: AutoEP has CPU paths for everything it does here. Runs: conftest.py's RUNS."""

import pytest

from tests.distributed.test_ep_equivalence import assert_same_training

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("balance", ["global", "bias"])
def test_autoep_trains_like_the_native_backend(layout_runs, balance):
    reference = layout_runs(1)[f"deepspeed:{balance}:2:1"]  # its own test: it trains, clips, balances
    # backend:balance:zero_stage:ep_size; world 2 with ep_size 1 is AutoEP's replicated experts under ZeRO-3, world 4
    # with ep_size 2 is EP 2 x DP 2.
    for world, spec in ((1, f"autoep:{balance}:0:1"), (2, f"autoep:{balance}:2:2"), (2, f"autoep:{balance}:3:2"),
                        (2, f"autoep:{balance}:3:1"), (4, f"autoep:{balance}:2:4"), (4, f"autoep:{balance}:2:2")):
        assert_same_training(layout_runs(world)[spec], reference, f"world {world}, {spec}")
