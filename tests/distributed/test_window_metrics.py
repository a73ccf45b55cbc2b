"""The trainer's log window in two gloo processes: every metric is reduced in one all_reduce, and the reduced numbers
are the means (losses, drops) and sums (expert loads) of both ranks' micro steps, computed here by hand."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_recipe.metrics import WindowMetrics

pytestmark = pytest.mark.distributed
WORLD, MICRO_STEPS, L, E = 2, 3, 2, 3


def micro_output(rank: int, micro_step: int) -> SimpleNamespace:
    """A model output with numbers that differ per rank and micro step."""
    value = float(10 * rank + micro_step)
    return SimpleNamespace(
        loss=torch.tensor(value), lm_loss=torch.tensor(value / 2), aux_loss=torch.tensor(1.0), z_loss=torch.tensor(0.0),
        dropped_fraction=torch.tensor([value / 100, 0.0]),
        tokens_per_expert=torch.arange(L * E, dtype=torch.float32).view(L, E) + value,
        router_demand=torch.full((L, E), value),
        layer_aux_loss=torch.tensor([value, 2 * value]), layer_z_loss=torch.tensor([1.0, value / 4]),
    )


def reduce_in_process(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    calls = []
    all_reduce = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counted
    window = WindowMetrics(num_moe_layers=L, num_experts=E, device=torch.device("cpu"))
    for micro_step in range(MICRO_STEPS):
        window.add(micro_output(rank, micro_step))
    totals = window.reduce()
    torch.save({"calls": calls, "totals": totals}, f"{out}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_one_all_reduce_for_every_metric(tmp_path: Path):
    out = tmp_path / "window"
    mp.spawn(reduce_in_process, args=(str(tmp_path / "store"), str(out)), nprocs=WORLD)
    outputs = [micro_output(r, m) for r in range(WORLD) for m in range(MICRO_STEPS)]
    n = len(outputs)
    for rank in range(WORLD):
        result = torch.load(f"{out}.rank{rank}.pt", weights_only=False)
        assert len(result["calls"]) == 1, result["calls"]
        totals = result["totals"]
        assert totals.micro_steps == MICRO_STEPS
        assert totals.losses == pytest.approx({
            "loss": sum(o.loss.item() for o in outputs) / n, "lm_loss": sum(o.lm_loss.item() for o in outputs) / n,
            "aux_loss": 1.0, "z_loss": 0.0})
        torch.testing.assert_close(totals.dropped_L, sum(o.dropped_fraction for o in outputs) / n)
        # values 0, 1, 2 (rank 0) and 10, 11, 12 (rank 1): mean 6
        torch.testing.assert_close(totals.layer_aux_loss_L, torch.tensor([6.0, 12.0]))
        torch.testing.assert_close(totals.layer_z_loss_L, torch.tensor([1.0, 1.5]))
        torch.testing.assert_close(totals.received_LE, sum(o.tokens_per_expert for o in outputs))
        torch.testing.assert_close(totals.demand_LE, sum(o.router_demand for o in outputs))
