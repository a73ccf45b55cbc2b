"""Export a training checkpoint, saved at any layout, to a Hugging Face folder: safetensors weights, config, tokenizer.

    python -m moe_recipe.export runs/default/checkpoints/step_00000200 exports/default
    python -m moe_recipe.export runs/default exports/default-mixtral --format mixtral --dtype bfloat16

CHECKPOINT is a checkpoint folder (step_XXXXXXXX), a checkpoints folder or a run folder (their newest complete
checkpoint). The weights come from the checkpoint's layout-independent fp32 state (see reshard.py), so no engine,
process group or GPU is needed, and the layout it was trained at does not matter.

--format hf (default): this project's MoeForCausalLM, every expert under its global name, with the expert bias
(`...gate.e_score_correction_bias`, kept in fp32 whatever --dtype) where the model routes with one. Load it with
    import moe_model  # registers model_type "deepspeed_moe" with the Auto classes
    model = AutoModelForCausalLM.from_pretrained(folder)
--format mixtral | qwen3_moe | qwen2_moe | deepseek_v3: transformers' own MixtralForCausalLM, Qwen3MoeForCausalLM,
Qwen2MoeForCausalLM or DeepseekV3ForCausalLM in its original file layout, loadable without this project, where that
class computes this model (stock_export.py: what each needs, and the reasons it refuses otherwise). Neither side drops
tokens at inference (capacity dropping is a training device), so the export's logits equal this model's.

The folder holds JSON and safetensors files only: no pickles.
"""

import argparse
import logging
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from transformers import AutoTokenizer, GenerationConfig

from moe_model import MoeConfig

from .checkpoint import INCOMPLETE, MANIFEST, list_checkpoints, read_manifest
from .errors import check_output_folder, refuse_bad_input
from .reshard import read_weights
from .stock_export import STOCK_FORMATS, to_stock

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder itself, or the newest complete checkpoint of a checkpoints folder or a run folder."""
    if (path / MANIFEST).is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = list_checkpoints(folder)
        if found:
            return found[-1]
    raise ValueError(f"{path}: no complete checkpoint there (a step_XXXXXXXX folder with a {MANIFEST}, or a "
                     "checkpoints or run folder holding one).")


def find_tokenizer(checkpoint: Path, tokenizer: Path | None) -> Path:
    """--tokenizer, else the run's saved tokenizer (run_dir/tokenizer), else the run config's data.tokenizer."""
    if tokenizer is not None:
        candidates = [tokenizer]
    else:
        run_dir = checkpoint.parent.parent
        candidates = [run_dir / "tokenizer"]
        if (run_dir / "config.yaml").is_file():
            from omegaconf import OmegaConf

            from .data import DataConfig, tokenizer_path

            configured = OmegaConf.load(run_dir / "config.yaml").get("data", {}).get("tokenizer")
            if configured:
                candidates.append(tokenizer_path(DataConfig(tokenizer=configured)))
    for candidate in candidates:
        if (candidate / "tokenizer.json").is_file():
            return candidate
    raise ValueError(f"no tokenizer found (looked in {', '.join(map(str, candidates))}); pass --tokenizer FOLDER.")


def export(checkpoint: Path, output: Path, fmt: str = "hf", dtype: str = "float32",
           tokenizer: Path | None = None) -> Path:
    """Write the HF folder; it appears under its final name only once complete. Returns the checkpoint used."""
    checkpoint = resolve_checkpoint(checkpoint)
    manifest = read_manifest(checkpoint)
    if manifest["tensors"] is None:
        raise ValueError(f"checkpoint {checkpoint} holds no layout-independent weights to export.")
    check_output_folder(output, "output")
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"{output} exists and is not empty; export into a new folder.")
    tokenizer = AutoTokenizer.from_pretrained(str(find_tokenizer(checkpoint, tokenizer)))
    config = MoeConfig.from_dict(manifest["model"])
    # Buffers (the expert bias) keep their fp32: a bias rounded to bf16 would change which experts a token picks.
    weights = {name: tensor if manifest["tensors"][name].get("buffer") else tensor.to(DTYPES[dtype])
               for name, tensor in read_weights(checkpoint, manifest["tensors"]).items()}
    if fmt == "hf":
        config.architectures = ["MoeForCausalLM"]
    else:
        config, weights = to_stock(fmt, config, weights)
    config.dtype = dtype

    partial = output.with_name(output.name + INCOMPLETE)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_torch_state_dict(weights, str(partial), max_shard_size="5GB", safe_serialization=True)
    config.save_pretrained(partial)
    GenerationConfig.from_model_config(config).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if output.exists():
        output.rmdir()  # empty, checked above
    partial.rename(output)
    log.info("exported %s (step %d, %s) to %s", checkpoint, manifest["step"], fmt, output)
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moe-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint (step_XXXXXXXX), checkpoints or run folder")
    parser.add_argument("output", type=Path, help="the folder to create")
    parser.add_argument("--format", choices=("hf", *STOCK_FORMATS), default="hf",
                        help="hf: this project's MoeForCausalLM; the others: transformers' own class ("
                        + ", ".join(f"{name}: {f.architecture}" for name, f in STOCK_FORMATS.items())
                        + "), where the model fits it")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the saved weights")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer folder (default: the run's tokenizer/, else its config's data.tokenizer)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with refuse_bad_input("moe-export: error"):
        used = export(args.checkpoint, args.output, args.format, args.dtype, args.tokenizer)
    print(f"exported {used} to {args.output}")


if __name__ == "__main__":
    main()
