"""Export a training checkpoint, saved at any layout, to a Hugging Face folder: safetensors weights, config, tokenizer.

    python -m moe_recipe.export runs/default/checkpoints/step_00000200 exports/default
    python -m moe_recipe.export runs/default exports/default-mixtral --format mixtral --dtype bfloat16

CHECKPOINT is a checkpoint folder (step_XXXXXXXX), a checkpoints folder or a run folder (their newest complete
checkpoint). The weights come from the checkpoint's layout-independent fp32 state (see reshard.py), so no engine,
process group or GPU is needed, and the layout it was trained at does not matter.

--format hf (default): this project's MoeForCausalLM, self-contained: the model code (configuration_moe.py,
modeling_moe.py and every module they import) lies beside the weights and config.json's `auto_map` names it, so
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
loads it with transformers and torch alone (no moe_model, no DeepSpeed); with moe_model imported, from_pretrained
without trust_remote_code uses the installed code. The MoE layers are the autoep backend's block (`MoeAutoEPBlock`:
router `gate`, all experts stacked in `experts.gate_up_proj` / `experts.down_proj`, Mixtral's layout in transformers),
which is plain PyTorch outside DeepSpeed and computes what the native layer computes at inference; the config is the
trained one with moe_backend="autoep" and the training-only settings off (no capacity, no gate noise). The expert
bias (`...gate.e_score_correction_bias`) stays fp32 whatever --dtype. A model with residual MoE (use_residual), which
the autoep block does not implement, keeps DeepSpeed's layers, and loading it needs DeepSpeed.
--format mixtral | qwen3_moe | qwen2_moe | deepseek_v3: transformers' own MixtralForCausalLM, Qwen3MoeForCausalLM,
Qwen2MoeForCausalLM or DeepseekV3ForCausalLM in its original file layout, loadable without this project, where that
class computes this model (stock_export.py: what each needs, and the reasons it refuses otherwise). Neither side drops
tokens at inference (capacity dropping is a training device), so the export's logits equal this model's.

The folder holds JSON, safetensors and (hf) the model's Python source: no pickles.
"""

import argparse
import logging
import re
import shutil
import sys
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from transformers import AutoTokenizer, GenerationConfig
from transformers.dynamic_module_utils import get_relative_import_files

from moe_model import MoeConfig, MoeForCausalLM, MoeModel
from moe_model.routing import EXPERT_BIAS

from .checkpoint import INCOMPLETE, MANIFEST, list_checkpoints, read_manifest
from .errors import check_output_folder, refuse_bad_input
from .reshard import read_weights
from .stock_export import STOCK_FORMATS, to_stock

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The classes an `--format hf` folder's auto_map names; their modules, and what those import, are copied beside it.
AUTO_CLASSES = {"AutoConfig": MoeConfig, "AutoModel": MoeModel, "AutoModelForCausalLM": MoeForCausalLM}
# What the autoep block needs of a trained native config: dropless, no gate noise (training devices both).
_AUTOEP_INFERENCE = {"moe_backend": "autoep", "drop_tokens": False, "noisy_gate_policy": None, "use_rts": False,
                     "top2_2nd_expert_sampling": False}
_NATIVE_BLOCK = re.compile(r"(model\.layers\.\d+\.mlp)\.moe\.deepspeed_moe\.(.+)")
_ROUTER_NAMES = {"gate.wg.weight": "gate.weight", f"gate.{EXPERT_BIAS}": f"gate.{EXPERT_BIAS}"}  # native -> autoep
_NATIVE_EXPERT = re.compile(r"experts\.deepspeed_experts\.(\d+)\.(gate|up|down)_proj\.weight")


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


def to_autoep(config: MoeConfig, weights: dict[str, torch.Tensor]) -> tuple[MoeConfig, dict[str, torch.Tensor]]:
    """The native (DeepSpeed) model as the autoep backend's model, which runs without DeepSpeed: the config with
    _AUTOEP_INFERENCE, the router `...mlp.gate.weight` (and its expert bias), expert e's gate and up projections as
    `...mlp.experts.gate_up_proj[e]` ([2F, D], gate on top) and its down projection as `...mlp.experts.down_proj[e]`."""
    autoep = MoeConfig.from_dict({**config.to_dict(), **_AUTOEP_INFERENCE})
    converted, experts = {}, {}
    for name, tensor in weights.items():
        native = _NATIVE_BLOCK.fullmatch(name)
        if native is None:  # attention, norms, embeddings, dense MLPs and the shared experts keep their names
            converted[name] = tensor
            continue
        block, rest = native.groups()
        if rest in _ROUTER_NAMES:
            converted[f"{block}.{_ROUTER_NAMES[rest]}"] = tensor
        elif expert := _NATIVE_EXPERT.fullmatch(rest):
            experts.setdefault(block, {})[int(expert[1]), expert[2]] = tensor
        else:
            raise ValueError(f"{name}: a native MoE weight with no place in the autoep block.")
    for block, projections in experts.items():
        E = config.num_experts
        converted[f"{block}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([projections[e, "gate"], projections[e, "up"]]) for e in range(E)])
        converted[f"{block}.experts.down_proj"] = torch.stack([projections[e, "down"] for e in range(E)])
    return autoep, converted


def save_model_code(folder: Path, config: MoeConfig) -> list[str]:
    """Copy the modules of AUTO_CLASSES into `folder`, with every module they import relatively, found as transformers'
    remote-code loader will look for them (so a new file of moe_model/ comes along once the model imports it), and
    name the classes in `config.auto_map`. Returns the file names."""
    modules = {Path(sys.modules[cls.__module__].__file__) for cls in AUTO_CLASSES.values()}
    for module in list(modules):
        modules.update(Path(file) for file in get_relative_import_files(module))
    for module in modules:
        shutil.copyfile(module, folder / module.name)
    config.auto_map = {auto: f"{cls.__module__.rpartition('.')[2]}.{cls.__name__}"
                       for auto, cls in AUTO_CLASSES.items()}
    return sorted(module.name for module in modules)


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
    if fmt != "hf":
        config, weights = to_stock(fmt, config, weights)
    else:
        if config.use_residual:
            log.warning("residual MoE (use_residual=true) has no autoep block: the export keeps DeepSpeed's MoE "
                        "layers, so loading it needs DeepSpeed installed.")
        else:
            config, weights = to_autoep(config, weights)
        config.architectures = ["MoeForCausalLM"]
    config.dtype = dtype

    partial = output.with_name(output.name + INCOMPLETE)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if fmt == "hf":
        save_model_code(partial, config)
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
                        help="hf: this project's MoeForCausalLM, its code beside the weights (trust_remote_code); "
                        "the others: transformers' own class ("
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
