"""`layout_runs`: one torchrun per world size trains every setting that the layout tests (test_ep_equivalence.py,
test_autoep.py) compare, once per session: a process launch costs more than a tiny model's 20 steps."""

from pathlib import Path

import pytest
import torch

from tests.helpers import torchrun

WORKER = Path(__file__).with_name("ep_worker.py")

# backend:balance:zero_stage:ep_size[:steps][:noclip] (ep_worker.py). World 4 with ep_size 2 is EP 2 x DP 2, world 2
# with ep_size 1 AutoEP's replicated experts under ZeRO-3. "none" runs two steps: up to the first step that routes
# with the expert bias. "noclip": ZeRO 0 is also run without clipping (the recipe clips there itself,
# test_ep_equivalence.py).
RUNS = {
    1: ["deepspeed:global:2:1", "deepspeed:bias:2:1", "deepspeed:global:2:1:noclip", "deepspeed:aux:2:1:1",
        "deepspeed:none:2:1:2", "autoep:global:0:1", "autoep:bias:0:1", "autoep:none:0:1:2"],
    2: ["deepspeed:global:2:2", "deepspeed:bias:2:2",
        "autoep:global:2:2", "autoep:global:3:2", "autoep:global:3:1",
        "autoep:bias:2:2", "autoep:bias:3:2", "autoep:bias:3:1"],
    4: ["deepspeed:global:2:4", "deepspeed:global:2:2", "deepspeed:global:1:2", "deepspeed:global:0:2",
        "deepspeed:global:0:2:noclip", "deepspeed:bias:2:4", "deepspeed:bias:2:2", "deepspeed:aux:2:2:1",
        "autoep:global:2:4", "autoep:global:2:2", "autoep:bias:2:4", "autoep:bias:2:2"],
}


def merge_ranks(ranks: list[dict]) -> dict:
    """One record per run: rank 0's (the losses and routes are already reduced), with each rank's share of the
    weights joined; what several ranks hold (replicas, the expert bias) must be the same on all of them."""
    merged = {}
    for spec, record in ranks[0].items():
        weights = {}
        for rank, result in enumerate(ranks):
            other = result[spec]
            if record["expert_bias"] is not None:
                assert torch.equal(other["expert_bias"], record["expert_bias"]), f"{spec}: rank {rank}'s expert bias"
            for name, tensor in (other["weights"] or {}).items():
                if name in weights:  # replicas (data parallel) must hold the same values
                    torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0,
                                               msg=f"{spec}: replicas differ: {name}")
                weights[name] = tensor
        merged[spec] = {**record, "weights": weights or None}
    return merged


@pytest.fixture(scope="session")
def layout_runs(tmp_path_factory):
    """`layout_runs(world)` -> {run spec: record} for RUNS[world], trained on first use."""
    done = {}

    def runs(world: int) -> dict[str, dict]:
        if world not in done:
            out = tmp_path_factory.mktemp(f"world{world}") / "runs"
            torchrun(WORKER, world, ["--runs", *RUNS[world], "--out", str(out)], timeout=1200)
            done[world] = merge_ranks([torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(world)])
        return done[world]

    return runs
