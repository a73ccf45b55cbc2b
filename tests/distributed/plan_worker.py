"""Build the recipe's real DeepSpeed engine at one layout, train one step, and record what each rank allocated.

Run under torchrun by test_plan_vs_engine.py. For every case it records, per rank: the bytes of parameters, fp32
master partitions, optimizer states and gradients DeepSpeed holds (dense and expert), the bytes handed to
torch.distributed.all_to_all_single during one optimizer step, and the planner's numbers for the same config.
"""

import argparse
import gc
import json

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param

from moe_recipe.engine import build_model, initialize_engine, recipe_grad_clip
from moe_recipe.plan import (
    ClusterSpec,
    build_plan,
    optimizer_groups,
    planned_precision,
    state_memory,
)
from moe_recipe.recipe import Recipe, load_recipe
from moe_recipe.train_step import train_step

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--case", action="append", required=True, help="Hydra overrides joined by commas")
parser.add_argument("--steps", type=int, default=1, help="optimizer steps (the peak needs the Adam states in place)")
parser.add_argument("--cpu-peak", action="store_true", help="measure the CPU allocator's peak with the profiler")
args = parser.parse_args()

deepspeed.init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()

# Count what every all-to-all is handed (DeepSpeed's comm layer calls torch.distributed.all_to_all_single).
a2a = {"calls": 0, "bytes": 0}
_all_to_all_single = dist.all_to_all_single


def counting_all_to_all_single(output, input, *rest, **kwargs):
    a2a["calls"] += 1
    a2a["bytes"] += input.numel() * input.element_size()
    return _all_to_all_single(output, input, *rest, **kwargs)


dist.all_to_all_single = counting_all_to_all_single


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def split(pairs) -> dict[str, int]:
    out = {"dense": 0, "expert": 0}
    for is_expert, value in pairs:
        out["expert" if is_expert else "dense"] += value
    return out


def measure(engine, grads_after_backward) -> dict:
    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO 1/2: flat groups, fp32 partitions
        moe = opt.is_moe_param_group
        params = split((moe[i], nbytes(flat)) for i, flat in enumerate(opt.bit16_groups_flat))
        masters = [(moe[i], p) for i, p in enumerate(opt.single_partition_of_fp32_groups)]
        basic = opt.optimizer
    elif hasattr(opt, "fp32_groups"):  # stage 0 in bf16/fp16: DeepSpeed's unfused optimizer, fp32 copies
        params = split((is_moe_param(p), nbytes(p)) for p in engine.module.parameters())
        masters = [(is_moe_param(low), p) for lows, highs in zip(opt.fp16_groups, opt.fp32_groups)
                   for low, p in zip(lows, highs)]
        basic = opt.optimizer
    else:  # stage 0 in fp32: the torch optimizer on the model's own parameters
        params = split((is_moe_param(p), nbytes(p)) for p in engine.module.parameters())
        masters = [(is_moe_param(p), p) for p in engine.module.parameters()]
        basic = opt
    owner = {id(p): is_expert for is_expert, p in masters}
    master = split((is_expert, nbytes(p)) for is_expert, p in masters) if basic is not opt else split([])
    states = split((owner[id(p)], sum(nbytes(v) for v in state.values() if torch.is_tensor(v)))
                   for p, state in basic.state.items())
    return {"params": params, "master_weights": master, "optimizer_states": states, "grads": grads_after_backward}


def grads_now(engine) -> dict:
    """Gradient storage after a backward that is not at the accumulation boundary: what is held across micro steps.

    Stages 0 and 1 keep every parameter's .grad; ZeRO-2 has reduced them into the gradients of the parameters in this
    rank's partition (`all_grad_tensors`, one list per optimizer group; a parameter cut by a partition edge counts
    whole).
    """
    opt = engine.optimizer
    pairs = [(is_moe_param(p), nbytes(p.grad)) for p in engine.module.parameters()]
    for i, grads in getattr(opt, "all_grad_tensors", {}).items():
        pairs += [(opt.is_moe_param_group[i], nbytes(g)) for g in grads or []]
    return split(pairs)


def cpu_peak(prof) -> int:
    """Peak live bytes of the CPU allocator over a profiled region: each op event's own allocations (its self
    memory) and the [memory] events' frees, in time order."""
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def train(recipe: Recipe):
    """Build the engine from nothing and run `args.steps` optimizer steps; (engine, grads held, peak bytes)."""
    cfg = recipe.config
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(recipe.model, cfg.parallel.ep_size)
    if cfg.trainer.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = initialize_engine(model, cfg, recipe.deepspeed, recipe.total_steps)
    t = cfg.trainer
    data = torch.randint(0, recipe.model.vocab_size, (t.grad_accum, t.micro_batch_size, cfg.data.seq_len),
                         generator=torch.Generator().manual_seed(rank)).to(engine.device)
    grads = {}

    def micro_batches(step: int):
        for micro in range(t.grad_accum):
            if step == 0 and micro == 1:  # after the first micro step's backward, before the boundary
                grads.update(grads_now(engine))
            yield data[micro]

    for step in range(args.steps):
        a2a.update(calls=0, bytes=0)
        train_step(engine, micro_batches(step), recipe_grad_clip(cfg))  # one optimizer step, as the Trainer runs it
    return engine, grads or None, torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


results = []
for case in args.case:
    recipe = load_recipe(case.split(","), world)
    cfg = recipe.config
    if args.cpu_peak:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            engine, grads, _ = train(recipe)
        peak = cpu_peak(prof)
    else:
        engine, grads, peak = train(recipe)
    t = cfg.trainer
    measured = measure(engine, grads)
    measured["all_to_all"] = dict(a2a)  # the last step's
    measured["peak"] = peak
    plan = build_plan(cfg, ClusterSpec.from_preset(nodes=1, gpus_per_node=world))
    planned = {
        key: {"dense": getattr(plan.memory, key).dense, "expert": getattr(plan.memory, key).expert}
        for key in ("params", "master_weights", "optimizer_states", "grads")
    }
    # ZeRO-2's gradients differ between ranks; the plan shows the largest, this rank's is asked for here.
    z = cfg.zero
    groups = optimizer_groups(recipe.model, cfg.parallel.ep_size, cfg.optim.weight_decay)
    this_rank = state_memory(groups, z.stage, planned_precision(cfg), world, cfg.parallel.ep_size, rank=rank)
    planned["grads"] = {"dense": this_rank.grads.dense, "expert": this_rank.grads.expert}
    planned["grads_largest_rank"] = plan.memory.grads.total
    planned["peak"] = plan.peak_bytes
    planned["all_to_all"] = {"bytes": plan.comm.all_to_all_total,
                             "calls": plan.comm.all_to_all_calls_per_moe_layer * t.grad_accum
                             * len(recipe.model.moe_layer_indices)}
    results.append({"case": case, "rank": rank, "measured": measured, "planned": planned})
    del engine
    gc.collect()  # the engine holds reference cycles: free it now, not inside the next case's measurement
    dist.barrier()

with open(f"{args.out}.rank{rank}.json", "w") as f:
    json.dump(results, f, indent=1)
dist.barrier()
