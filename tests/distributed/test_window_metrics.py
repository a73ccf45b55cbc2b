"""The trainer's log window in two gloo processes: the step losses (`LossWindow`) and the routers' numbers
(`MoeRoutingMetrics.reduce`) are each reduced in one all_reduce, and the reduced numbers are the means (losses, drops)
and sums (expert loads) of both ranks' forwards, computed here by hand."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_model import MoeConfig
from moe_model.routing import MoeRoute, MoeRouterState, MoeRoutingMetrics
from moe_recipe.metrics import LossWindow

pytestmark = pytest.mark.distributed
WORLD, MICRO_STEPS, L, E, T, K = 2, 3, 2, 3, 4, 2
CONFIG = MoeConfig(num_experts=E, num_experts_per_tok=K, router_balance="none", router_aux_loss_coef=0.0)


def step_losses(rank: int, micro_step: int) -> torch.Tensor:
    """[1, 4] loss, lm_loss, aux_loss, z_loss of one micro step, different per rank and micro step."""
    value = float(10 * rank + micro_step)
    return torch.tensor([[value, value / 2, 1.0, 0.0]])


def router_inputs(rank: int, micro_step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [T, E], the chosen experts [T, k] and the kept routes [k, T] (-1: dropped) of one forward."""
    generator = torch.Generator().manual_seed(100 * rank + 10 * micro_step + layer)
    logits_TE = torch.randn(T, E, generator=generator)
    experts_Tk = torch.randint(0, E, (T, K), generator=generator)
    kept_kT = experts_Tk.t().clone()
    kept_kT[1, : (rank + micro_step) % T] = -1  # some second choices dropped
    return logits_TE, experts_Tk, kept_kT


def reduce_in_process(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    calls = []
    all_reduce = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counted
    window = LossWindow(torch.device("cpu"))
    routers = [MoeRouterState(CONFIG, bias_owner=lambda: None) for _ in range(L)]
    for micro_step in range(MICRO_STEPS):
        window.add(step_losses(rank, micro_step))
        for layer, router in enumerate(routers):
            logits_TE, experts_Tk, kept_kT = router_inputs(rank, micro_step, layer)
            route = MoeRoute(torch.softmax(logits_TE, -1), torch.ones(T, K) / K, experts_Tk)
            router.record(logits_TE, training=True, route=route, kept_routes=kept_kT)
            router.pop()
    router = routers[0]  # an eval forward counts for nothing
    router.record(*router_inputs(rank, 0, 0)[:1], training=False)
    router.pop()
    losses = window.reduce()
    loss_calls = len(calls)
    routing = MoeRoutingMetrics.reduce(routers)
    torch.save({"calls": (loss_calls, len(calls) - loss_calls), "losses": losses, "routing": routing},
               f"{out}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def count(experts: torch.Tensor) -> torch.Tensor:
    return torch.tensor([(experts == e).sum().item() for e in range(E)], dtype=torch.float32)


def test_one_all_reduce_for_the_losses_and_one_for_the_routers(tmp_path: Path):
    out = tmp_path / "window"
    mp.spawn(reduce_in_process, args=(str(tmp_path / "store"), str(out)), nprocs=WORLD)
    forwards = [(r, m) for r in range(WORLD) for m in range(MICRO_STEPS)]
    n = len(forwards)
    for rank in range(WORLD):
        result = torch.load(f"{out}.rank{rank}.pt", weights_only=False)
        assert result["calls"] == (1, 1)
        assert result["losses"] == pytest.approx({
            "loss": sum(step_losses(r, m)[0, 0].item() for r, m in forwards) / n,
            "lm_loss": sum(step_losses(r, m)[0, 1].item() for r, m in forwards) / n, "aux_loss": 1.0, "z_loss": 0.0})
        routing = result["routing"]
        assert routing.forwards == MICRO_STEPS
        for layer in range(L):
            inputs = [router_inputs(r, m, layer) for r, m in forwards]
            torch.testing.assert_close(routing.demand_LE[layer], sum(count(experts) for _, experts, _ in inputs))
            torch.testing.assert_close(routing.received_LE[layer], sum(count(kept) for _, _, kept in inputs))
            dropped = [(kept < 0).sum().item() / (T * K) for _, _, kept in inputs]
            assert routing.dropped_L[layer].item() == pytest.approx(sum(dropped) / n)
            z = [(torch.logsumexp(logits, -1) ** 2).mean().item() for logits, _, _ in inputs]
            assert routing.z_loss_L[layer].item() == pytest.approx(sum(z) / n, rel=1e-6)
            assert routing.aux_loss_L[layer].item() == 0.0  # router_balance none
