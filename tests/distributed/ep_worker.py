"""Train the model a few steps at one expert-parallel layout; save losses, grad norms and all weights by global name.

Run under torchrun by test_ep_equivalence.py. The global batch is fixed; each rank takes its slice of it.
"""

import argparse
import re

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import groups

from moe_model import MoeConfig
from moe_recipe.engine import build_model, build_param_groups

parser = argparse.ArgumentParser()
parser.add_argument("--ep-size", type=int, required=True)
parser.add_argument("--zero-stage", type=int, default=2)
parser.add_argument("--out", required=True)
args = parser.parse_args()

GLOBAL_BATCH, SEQ, STEPS, VOCAB = 8, 16, 4, 128

deepspeed.init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
config = MoeConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, num_experts=4, num_experts_per_tok=2,
    drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False, num_shared_experts=1,
    first_k_dense_replace=1,
    # DeepSpeed's aux loss is computed per rank on local tokens: not layout invariant, so it is left out here.
    router_aux_loss_coef=0.0, router_z_loss_coef=0.01,
)
model = build_model(config, args.ep_size)
optimizer = torch.optim.AdamW(build_param_groups(model, weight_decay=0.1), lr=1e-2, betas=(0.9, 0.95))
ds_config = {
    "train_batch_size": GLOBAL_BATCH,
    "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.05,  # small enough to clip every step: the expert grad norm must be right
    "zero_optimization": {"stage": args.zero_stage},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

data = torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
micro = GLOBAL_BATCH // world
losses, grad_norms = [], []
for step in range(STEPS):
    batch = data[step, rank * micro:(rank + 1) * micro]
    out = engine(input_ids=batch, labels=batch)
    engine.backward(out.loss)
    engine.step()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    losses.append(loss.item() / world)
    norm = engine.get_global_grad_norm()  # None at ZeRO stage 0: DeepSpeed does not keep it there
    grad_norms.append(float("nan") if norm is None else float(norm))

# Rename local expert i to its global id so every layout writes the same names.
ep_rank = groups._get_expert_parallel_rank(f"ep_size_{args.ep_size}")  # DeepSpeed's word, not the model's
num_local = config.num_experts // args.ep_size
weights = {}
for name, param in engine.module.named_parameters():
    match = re.search(r"deepspeed_experts\.(\d+)\.", name)
    if match:
        global_id = ep_rank * num_local + int(match.group(1))
        name = name.replace(match.group(0), f"deepspeed_experts.{global_id}.")
    weights[name] = param.detach().float().clone()
torch.save({"losses": losses, "grad_norms": grad_norms, "weights": weights}, f"{args.out}.rank{rank}.pt")
dist.barrier()
