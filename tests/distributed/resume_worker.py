"""Run the recipe's Trainer for a list of jobs in one process group: each job builds its model and engine at its own
layout (ep_size, ZeRO stage), optionally resumes from a checkpoint, trains, checkpoints and logs metrics.jsonl.

Run under torchrun by test_resume_layouts.py and test_export.py. Jobs of one world size share a launch (the
process start is most of the cost on CPU); state passes between jobs only through checkpoint files, as between
real jobs. The global batch is 8 sequences of 2 per rank and micro step at every world size (grad_accum makes up the
rest), so each micro batch holds the same sequences at every layout and the capacity limit drops the same tokens.
"""

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from moe_recipe.callbacks import Callback, build_callbacks
from moe_recipe.checkpoint import check_resume
from moe_recipe.config import (DataConfig, LoggingConfig, ModelConfig, OptimConfig, ParallelConfig, RecipeConfig,
                               RouterConfig, TrainerConfig, ZeroConfig)
from moe_recipe.data import TrainingData, load_tokenizer, open_store, store_from_tokens, tokenizer_fingerprint
from moe_recipe.data.sampler import Component
from moe_recipe.engine import build_model, initialize_engine, recipe_grad_clip
from moe_recipe.metrics import MetricsSink
from moe_recipe.recipe import build_recipe
from moe_recipe.trainer import Trainer

GLOBAL_BATCH, MICRO_BATCH, SEQ, VOCAB, STEPS = 8, 2, 16, 128, 6
MODEL = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, num_experts=4, num_experts_per_tok=2,
    capacity_factor=1.0, min_capacity=2, drop_tokens=True,
    # RTS and the sampled second expert draw from each rank's RNG: not layout invariant, so they are off.
    use_rts=False, top2_2nd_expert_sampling=False,
    num_shared_experts=1, first_k_dense_replace=1, router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
)



class SaveBiasAtStart(Callback):
    """Writes the expert bias the first step of a job starts from (after a resume: what the checkpoint restored)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def pre_train(self, trainer: Trainer) -> None:
        if not self.path.exists() and trainer.rank == 0:
            torch.save(trainer.engine.module.expert_bias().clone(), self.path)


def model_config(overrides: dict) -> ModelConfig:
    """MODEL with `overrides` (ModelConfig fields; `router` a dict of RouterConfig fields, as in a run's
    config.yaml)."""
    settings = {**MODEL, **overrides}
    settings["router"] = RouterConfig(**settings.get("router", {}))
    return ModelConfig(**settings)


parser = argparse.ArgumentParser()
parser.add_argument("--jobs", required=True,
                    help="JSON list of {run_dir, ep_size, zero_stage, and optionally offload, precision, resume, "
                         "checkpoint_interval, model (overrides of MODEL), optim (OptimConfig fields), logits (a file "
                         "to write)}; with the expert bias, the bias a job starts from goes to "
                         "run_dir/bias_at_start.pt")
args = parser.parse_args()

deepspeed.init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
blocks = torch.randint(0, VOCAB, (96, SEQ), generator=torch.Generator().manual_seed(1))
# A token store of 64 train and 32 val blocks, written by rank 0 as nanoGPT-style token files, read by every rank.
store_dir = Path(json.loads(args.jobs)[0]["run_dir"]).parent / "token-store"
if rank == 0:
    store_dir.mkdir(parents=True, exist_ok=True)
    blocks[:64].numpy().astype("uint16").tofile(store_dir / "train.bin")
    blocks[64:].numpy().astype("uint16").tofile(store_dir / "val.bin")
    tokenizer = load_tokenizer(DataConfig())
    store_from_tokens([store_dir / "train.bin"], [store_dir / "val.bin"], tokenizer, "assets/tokenizer",
                      tokenizer_fingerprint(DataConfig()), store_dir, val_fraction=0.05, overwrite=True)
dist.barrier()
data = TrainingData([Component("main", open_store(store_dir, "data.store"), 1.0)], SEQ, seed=0)

for job in json.loads(args.jobs):
    cfg = RecipeConfig(
        model=model_config(job.get("model", {})),
        parallel=ParallelConfig(ep_size=job["ep_size"]),
        zero=ZeroConfig(stage=job["zero_stage"], offload_optimizer=job.get("offload", False)),
        optim=OptimConfig(**{"lr": 1e-2, "warmup_steps": 2, **job.get("optim", {})}),
        data=DataConfig(seq_len=SEQ),
        trainer=TrainerConfig(micro_batch_size=MICRO_BATCH, grad_accum=GLOBAL_BATCH // (MICRO_BATCH * world),
                              max_steps=STEPS, precision=job.get("precision", "fp32"), eval_interval=100,
                              eval_batches=1, checkpoint_interval=job.get("checkpoint_interval", 100), log_interval=1,
                              run_dir=job["run_dir"], resume=job.get("resume", "auto")),
        logging=LoggingConfig(),
    )
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    # As recipes/train.py: one seed for the weights on every rank, then one per rank.
    torch.manual_seed(cfg.trainer.seed)
    recipe = build_recipe(cfg, world)  # random tokens: no tokenizer
    engine = initialize_engine(build_model(recipe.model, cfg.parallel.ep_size), cfg, recipe.deepspeed,
                               recipe.total_steps)
    torch.manual_seed(cfg.trainer.seed + rank)
    metrics = MetricsSink(run_dir, cfg.logging, "test", {}, enabled=rank == 0)
    callbacks = build_callbacks(recipe, data, metrics, run_dir)
    if recipe.model.uses_expert_bias:
        callbacks.append(SaveBiasAtStart(run_dir / "bias_at_start.pt"))
    resume_from = check_resume(cfg.trainer.resume, run_dir / "checkpoints", recipe.model)  # as the preflight does
    Trainer(engine, cfg.trainer, data, total_steps=recipe.total_steps, grad_clip=recipe_grad_clip(cfg),
            callbacks=callbacks, resume_from=resume_from).fit()
    metrics.close()
    if "logits" in job:  # the trained model's own logits, at its layout, on the same input on every rank
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=blocks[64:66]).logits
        if rank == 0:
            torch.save({"input_ids": blocks[64:66], "logits": logits}, job["logits"])
    dist.barrier()
