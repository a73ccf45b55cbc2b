"""Train a tiny model at several settings in one torchrun, each through the recipe's config, validation, engine wiring
and training step (`train_step`, what the Trainer runs); save per step the losses, grad norm, routes per expert (the
routers' metrics) and expert bias, and the final weights.

Run under torchrun by the layout tests (conftest.py's `layout_runs`). A run is `backend:balance:zero_stage:ep_size`,
then optionally a number of steps to stop after (the learning-rate schedule is always that of --steps) and `noclip`
(no gradient clipping), e.g. `deepspeed:bias:2:2`, `autoep:global:3:1`, `deepspeed:aux:2:1:1`. Every run starts from
the same seed, so from the same weights (both backends draw their initial weights alike), and trains on the same
global batches (four, in turn: the loss falls), of which each rank takes its slice. Dropless, fp32: all layouts must
agree.
"""

import argparse
import re

import deepspeed
import torch
import torch.distributed as dist

from moe_recipe.engine import build_model, expert_parallel_rank, initialize_engine, recipe_grad_clip
from moe_recipe.recipe import Recipe, build_recipe, compose, typed_config
from moe_recipe.train_step import train_step

parser = argparse.ArgumentParser()
parser.add_argument("--runs", nargs="+", required=True, help="backend:balance:zero_stage:ep_size[:steps][:noclip]")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--out", required=True, help="each rank writes <out>.rank<r>.pt")
args = parser.parse_args()

GLOBAL_BATCH, SEQ, VOCAB, BATCHES = 8, 16, 128, 4
# model.router_aux_loss_coef is large enough for the balancing loss to move the router; the expert bias moves by
# 0.01 per step, so it changes (and changes routes) every step.
BALANCE = {
    "none": ["model.router.balance=none", "model.router_aux_loss_coef=0.0"],
    "aux": ["model.router.balance=aux", "model.router_aux_loss_coef=0.1"],  # DeepSpeed's per-rank loss
    "global": ["model.router.balance=global", "model.router_aux_loss_coef=0.1"],
    "bias": ["model.router.balance=none", "model.router.expert_bias=true", "model.router_aux_loss_coef=0.0",
             "model.router.bias_update_rate=0.01"],
}

deepspeed.init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
micro = GLOBAL_BATCH // world
data = torch.randint(0, VOCAB, (BATCHES, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
data = data[:, rank * micro:(rank + 1) * micro]


def recipe(backend: str, balance: str, zero_stage: int, ep_size: int, grad_clip: float) -> Recipe:
    overrides = [
        f"model.moe_backend={backend}", f"zero.stage={zero_stage}", f"parallel.ep_size={ep_size}",
        f"model.vocab_size={VOCAB}", "model.hidden_size=32", "model.intermediate_size=64",
        "model.moe_intermediate_size=48", "model.num_hidden_layers=3", "model.num_attention_heads=4",
        "model.num_key_value_heads=2", f"model.max_position_embeddings={SEQ}", "model.num_experts=4",
        "model.num_experts_per_tok=2", "model.num_shared_experts=1", "model.first_k_dense_replace=1",
        "model.drop_tokens=false", "model.use_rts=false", "model.top2_2nd_expert_sampling=false",
        "model.router_z_loss_coef=0.01", *BALANCE[balance],
        f"data.seq_len={SEQ}", f"trainer.micro_batch_size={micro}", "trainer.grad_accum=1",
        f"trainer.max_steps={args.steps}", "trainer.precision=fp32", "optim.lr=1e-2", "optim.warmup_steps=1",
        f"optim.grad_clip={grad_clip}",
    ]
    # Random tokens from a 128-token vocabulary: the recipe's tokenizer is not used, so not checked against it.
    return build_recipe(typed_config(compose(overrides))[0], world)


def global_weights(module: torch.nn.Module, ep_size: int) -> dict[str, torch.Tensor]:
    """The native model's parameters, local expert i renamed to its global id, so every layout writes the same names."""
    ep_rank, num_local = expert_parallel_rank(rank, ep_size), module.config.num_experts // ep_size
    weights = {}
    for name, param in module.named_parameters():
        match = re.search(r"deepspeed_experts\.(\d+)\.", name)
        if match:
            name = name.replace(match.group(0), f"deepspeed_experts.{ep_rank * num_local + int(match.group(1))}.")
        weights[name] = param.detach().float().clone()
    return weights


def train(backend: str, balance: str, zero_stage: int, ep_size: int, steps: int, grad_clip: float) -> dict:
    run = recipe(backend, balance, zero_stage, ep_size, grad_clip)
    torch.manual_seed(0)
    engine = initialize_engine(build_model(run.model, ep_size), run.config, run.deepspeed, run.total_steps)
    model = engine.module
    if backend == "autoep":  # the engine, not the model's own block, must have run the steps
        assert [type(layer.mlp).__name__ for layer in model.moe_layers()] == ["AutoEPMoELayer"] * 2
    record = {"losses": [], "grad_norms": [], "router_demand": [], "tokens_per_expert": [], "expert_bias": []}
    for step in range(steps):
        result = train_step(engine, [data[step % BATCHES]], recipe_grad_clip(run.config))
        if model.config.uses_expert_bias:
            record["expert_bias"].append(model.expert_bias().clone())
        losses = result.losses[0].clone()
        dist.all_reduce(losses)
        routing = model.routing_metrics(reset=True)  # summed over the ranks
        record["losses"].append((losses / world).tolist())
        record["router_demand"].append(routing.demand_LE)
        record["tokens_per_expert"].append(routing.received_LE)
        record["grad_norms"].append(float("nan") if result.grad_norm is None else float(result.grad_norm))
    for key in ("router_demand", "tokens_per_expert", "expert_bias"):
        record[key] = torch.stack(record[key]) if record[key] else None
    # AutoEP's experts are stacked per rank (and partitioned under ZeRO-3): its runs are compared by their losses.
    record["weights"] = global_weights(model, ep_size) if backend == "deepspeed" else None
    engine.destroy()
    return record


results = {}
for spec in args.runs:
    backend, balance, zero_stage, ep_size, *options = spec.split(":")
    steps = next((int(option) for option in options if option.isdigit()), args.steps)
    grad_clip = 0.0 if "noclip" in options else 0.05  # 0.05 clips every step: the expert grad norm must be right
    results[spec] = train(backend, balance, int(zero_stage), int(ep_size), steps, grad_clip)
torch.save(results, f"{args.out}.rank{rank}.pt")
dist.barrier()
