"""Evaluate freshly initialised models (the same weights at every layout: one seed, each global expert drawn alike)
with the recipe's evaluation (callbacks.evaluate, what the Trainer's Evaluator runs), once per job given
(moe_backend, ep_size), and write rank 0's eval metrics.
Run under torchrun by test_eval_layouts.py.

The val split holds 13 blocks; eval reads the first EVAL_BATCHES x MICRO_BATCH = 6 of them at every world size, so
at world 2 one rank's second pass is half padding and at world 4 the last rank evaluates padding only. Training
would drop tokens (capacity factor 0.5); evaluation never does.
"""

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from moe_recipe.callbacks import evaluate
from moe_recipe.config import DataConfig, LoggingConfig, ModelConfig, ParallelConfig, RecipeConfig, TrainerConfig
from moe_recipe.data import TrainingData, load_tokenizer, open_store, store_from_tokens, tokenizer_fingerprint
from moe_recipe.data.sampler import Component
from moe_recipe.engine import build_model, initialize_engine
from moe_recipe.recipe import build_recipe

MICRO_BATCH, EVAL_BATCHES, SEQ, VOCAB = 2, 3, 16, 128
MODEL = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, num_experts=4, num_experts_per_tok=2,
    capacity_factor=0.5, min_capacity=1, use_rts=False, top2_2nd_expert_sampling=False, num_shared_experts=1,
    first_k_dense_replace=1, router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
)

parser = argparse.ArgumentParser()
parser.add_argument("--jobs", required=True, help="JSON list of {ep_size, moe_backend, out}")
parser.add_argument("--store", required=True, help="where rank 0 writes the token store")
args = parser.parse_args()

deepspeed.init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
store_dir = Path(args.store)
if rank == 0:
    blocks = torch.randint(0, VOCAB, (16 + 13, SEQ), generator=torch.Generator().manual_seed(1))
    store_dir.mkdir(parents=True, exist_ok=True)
    blocks[:16].numpy().astype("uint16").tofile(store_dir / "train.bin")
    blocks[16:].numpy().astype("uint16").tofile(store_dir / "val.bin")
    store_from_tokens([store_dir / "train.bin"], [store_dir / "val.bin"], load_tokenizer(DataConfig()),
                      "assets/tokenizer", tokenizer_fingerprint(DataConfig()), store_dir, val_fraction=0.05,
                      overwrite=True)
dist.barrier()
data = TrainingData([Component("main", open_store(store_dir, "data.store"), 1.0)], SEQ, seed=0)

for job in json.loads(args.jobs):
    drop_tokens = job["moe_backend"] == "deepspeed"  # AutoEP is dropless and warns about drop_tokens
    cfg = RecipeConfig(
        model=ModelConfig(**MODEL, drop_tokens=drop_tokens, moe_backend=job["moe_backend"]),
        parallel=ParallelConfig(ep_size=job["ep_size"]),
        data=DataConfig(seq_len=SEQ),
        trainer=TrainerConfig(micro_batch_size=MICRO_BATCH, eval_batches=EVAL_BATCHES,
                              precision="fp32", run_dir=str(Path(job["out"]).parent / "run")),
        logging=LoggingConfig(),
    )
    torch.manual_seed(cfg.trainer.seed)
    recipe = build_recipe(cfg, world)  # random tokens: no tokenizer
    engine = initialize_engine(build_model(recipe.model, cfg.parallel.ep_size), cfg, recipe.deepspeed,
                               recipe.total_steps)
    result = evaluate(engine, data, micro_batch_size=MICRO_BATCH, eval_batches=EVAL_BATCHES)
    if rank == 0:
        Path(job["out"]).write_text(json.dumps(result))
    dist.barrier()
