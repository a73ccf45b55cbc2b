"""Train an MoE language model with DeepSpeed expert parallelism.

    python recipes/train.py                                        # one process, the tiny default
    torchrun --nproc_per_node 2 recipes/train.py parallel.ep_size=2
    deepspeed --num_gpus 4 recipes/train.py parallel.ep_size=2 zero=stage2 logging=offline
    moe-train trainer.max_steps=50                                 # the installed console command

Any Hydra override works the same way under every launcher.
"""

import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerFast

from moe_recipe.checkpoint import check_resume
from moe_recipe.config import (
    CONF_DIR,
    RecipeConfig,
    global_batch_size,
    max_steps,
    recipe_config_from_dict,
    validate,
    world_size_from_env,
)
from moe_recipe.data import TrainingData, load_tokenizer, open_training_data

log = logging.getLogger("moe_recipe")


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N, which Hydra would reject as an override."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank"):
            skip_next = True
        else:
            kept.append(arg)
    return kept


def default_single_process_env() -> None:
    """`python recipes/train.py` without a launcher: a world of one (else DeepSpeed falls back to MPI discovery)."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def setup_logging(run_dir: Path, is_main: bool) -> None:
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def train(cfg: RecipeConfig, resolved: dict, tokenizer: PreTrainedTokenizerFast, data: TrainingData) -> None:
    import deepspeed
    import torch.distributed as dist

    from moe_recipe.engine import build_deepspeed_config, build_model, check_op_build_lock, initialize_engine
    from moe_recipe.metrics import MetricsSink
    from moe_recipe.trainer import Trainer

    default_single_process_env()
    check_op_build_lock()  # before init_distributed, which loads (and on first use builds) DeepSpeed's comm op
    deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    run_dir = Path(cfg.trainer.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, rank == 0)
    if rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        (run_dir / "ds_config.json").write_text(json.dumps(build_deepspeed_config(cfg, world_size), indent=2))

    # Same seed on every rank: identical dense weights, and each global expert identical for any ep_size.
    torch.manual_seed(cfg.trainer.seed)
    model_config = cfg.model_config(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)
    model = build_model(model_config, cfg.parallel.ep_size)
    if cfg.trainer.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = initialize_engine(model, cfg, world_size)
    torch.manual_seed(cfg.trainer.seed + rank)  # independent router noise per rank from here on

    metrics = MetricsSink(run_dir, cfg.logging, cfg.name, resolved, enabled=rank == 0)
    trainer = Trainer(engine, cfg, model_config, data, run_dir, metrics, max_steps(cfg, world_size))
    try:
        trainer.fit()
    finally:
        metrics.close()
    if rank == 0:
        tokenizer.save_pretrained(run_dir / "tokenizer")
    dist.barrier()
    dist.destroy_process_group()
    if trainer.preempted:
        sys.exit(int(os.environ.get("MOE_PREEMPT_EXIT_CODE", "0")))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(hydra_cfg: DictConfig) -> None:
    resolved = OmegaConf.to_container(hydra_cfg, resolve=True)
    # Every check runs before any process group exists: a bad config stops all ranks with one message.
    try:
        cfg = recipe_config_from_dict(resolved)
        tokenizer = load_tokenizer(cfg.data)
        model_config = validate(cfg, world_size_from_env(), tokenizer_vocab_size=len(tokenizer))
        check_resume(cfg.trainer.resume, Path(cfg.trainer.run_dir) / "checkpoints", model_config)
        # Memory-mapped token stores; the default store of a small source is built here on first use.
        world_size = world_size_from_env()
        data = open_training_data(cfg.data, tokenizer, global_batch_size=global_batch_size(cfg.trainer, world_size),
                                  eval_batch_size=cfg.trainer.micro_batch_size * world_size)
    except ValueError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"Invalid configuration: {err}", file=sys.stderr)
        else:
            time.sleep(3)  # a launcher kills the other ranks when one exits: let rank 0 print first
        sys.exit(2)
    train(cfg, resolved, tokenizer, data)


def main() -> None:
    sys.argv = strip_launcher_args(sys.argv)
    hydra_main()


if __name__ == "__main__":
    main()
