"""Train a tiny model a few steps through the recipe's config, validation and engine wiring, once per run given
(moe_backend, ZeRO stage, ep_size); save each run's per-step losses, router statistics and grad norms.
Run under torchrun by test_autoep.py.

Every run starts from the same seed, so from the same weights (both backends draw their initial weights alike), and
trains on the same global batch; each rank takes its slice. No token is dropped, so all runs must agree.
"""

import argparse

import deepspeed
import torch
import torch.distributed as dist
from moe_model.modeling_moe import MoeAutoEPBlock
from moe_recipe.config import Recipe, build_recipe, compose, typed_config
from moe_recipe.engine import build_model, initialize_engine

parser = argparse.ArgumentParser()
parser.add_argument("--runs", nargs="+", required=True, help="moe_backend:zero_stage:ep_size, e.g. autoep:3:2")
parser.add_argument("--out", required=True)
args = parser.parse_args()

GLOBAL_BATCH, SEQ, STEPS, VOCAB = 8, 16, 4, 128

deepspeed.init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
batch = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
micro = GLOBAL_BATCH // world
batch = batch[rank * micro:(rank + 1) * micro]


def recipe(backend: str, zero_stage: int, ep_size: int) -> Recipe:
    overrides = [
        f"model.moe_backend={backend}", f"zero.stage={zero_stage}", f"parallel.ep_size={ep_size}",
        f"model.vocab_size={VOCAB}", "model.hidden_size=32", "model.intermediate_size=64",
        "model.moe_intermediate_size=48", "model.num_hidden_layers=3", "model.num_attention_heads=4",
        "model.num_key_value_heads=2", f"model.max_position_embeddings={SEQ}", "model.num_experts=4",
        "model.num_experts_per_tok=2", "model.num_shared_experts=1", "model.first_k_dense_replace=1",
        "model.drop_tokens=false", "model.use_rts=false", "model.top2_2nd_expert_sampling=false",
        # DeepSpeed's aux loss is per rank on local tokens, so not layout invariant: reported, left out of the loss.
        "model.router_aux_loss_coef=0.0", "model.router_z_loss_coef=0.01",
        f"data.seq_len={SEQ}", f"trainer.micro_batch_size={micro}", "trainer.grad_accum=1",
        f"trainer.max_steps={STEPS}", "trainer.precision=fp32", "optim.lr=1e-2", "optim.warmup_steps=1",
        "optim.grad_clip=0.05",  # small enough to clip every step: the expert grad norm must be right
    ]
    # Random tokens from a 128-token vocabulary: the recipe's tokenizer is not used, so not checked against it.
    return build_recipe(typed_config(compose(overrides))[0], world)


def train(backend: str, zero_stage: int, ep_size: int) -> dict:
    run = recipe(backend, zero_stage, ep_size)
    torch.manual_seed(0)
    engine = initialize_engine(build_model(run.model, ep_size), run.config, run.deepspeed, run.total_steps)
    layers = engine.module.model.layers
    replaced = [type(layer.mlp).__name__ for layer in layers if layer.is_moe]
    if backend == "autoep":  # the engine, not the model's own block, must have run the steps
        assert replaced == ["AutoEPMoELayer"] * 2 and not any(isinstance(m, MoeAutoEPBlock) for m in layers.modules())
    record = {"losses": [], "tokens_per_expert": [], "grad_norms": []}
    for _ in range(STEPS):
        out = engine(input_ids=batch, labels=batch)
        engine.backward(out.loss)
        engine.step()
        losses = torch.stack([out.loss, out.lm_loss, out.aux_loss, out.z_loss]).detach()
        dist.all_reduce(losses)
        tokens = out.tokens_per_expert.detach().clone()
        dist.all_reduce(tokens)
        record["losses"].append((losses / world).tolist())
        record["tokens_per_expert"].append(tokens)
        norm = engine.get_global_grad_norm()  # None at ZeRO stage 0
        record["grad_norms"].append(float("nan") if norm is None else float(norm))
    record["tokens_per_expert"] = torch.stack(record["tokens_per_expert"])
    engine.destroy()
    return record


results = {}
for run in args.runs:
    backend, zero_stage, ep_size = run.split(":")
    results[run] = train(backend, int(zero_stage), int(ep_size))
if rank == 0:
    torch.save(results, args.out)
dist.barrier()
