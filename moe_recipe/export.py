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
--format mixtral: transformers' own MixtralForCausalLM, in the original Mixtral file layout
(block_sparse_moe.experts.N.w1/w2/w3), loadable without this project. Only where the model is a Mixtral: every
layer MoE, no shared experts, no residual MoE, and Mixtral's routing (softmax scores, the top-k weights renormalised,
no expert bias, no groups, no scaling; so top-1 only with router_norm_topk_prob=true). Neither model drops tokens
at inference (capacity dropping is a training device), so the export's logits equal this model's.

The folder holds JSON and safetensors files only: no pickles.
"""

import argparse
import logging
import re
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from transformers import AutoTokenizer, GenerationConfig, MixtralConfig

from moe_model import MoeConfig

from .checkpoint import INCOMPLETE, MANIFEST, list_checkpoints, read_manifest
from .errors import check_output_folder, refuse_bad_input
from .reshard import read_weights

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_MIXTRAL_NAMES = [  # (our global name, Mixtral's name in its original checkpoint layout)
    (r"(model\.layers\.\d+)\.mlp\.moe\.deepspeed_moe\.gate\.wg\.weight", r"\1.block_sparse_moe.gate.weight"),
    (r"(model\.layers\.\d+)\.mlp\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.gate_proj\.weight",
     r"\1.block_sparse_moe.experts.\2.w1.weight"),
    (r"(model\.layers\.\d+)\.mlp\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.up_proj\.weight",
     r"\1.block_sparse_moe.experts.\2.w3.weight"),
    (r"(model\.layers\.\d+)\.mlp\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.down_proj\.weight",
     r"\1.block_sparse_moe.experts.\2.w2.weight"),
    (r"(model\.layers\.\d+\.(self_attn\.[qkvo]_proj|input_layernorm|post_attention_layernorm)\.weight)", r"\1"),
    (r"(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight)", r"\1"),
]


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


def mixtral_blockers(config: MoeConfig) -> list[str]:
    """What keeps this model from being a MixtralForCausalLM (empty: it is one): its architecture, or routing that
    Mixtral's router (softmax over all experts, top-k, weights divided by their sum) does not compute."""
    blockers = []
    if config.num_shared_experts:
        blockers.append(f"shared experts (num_shared_experts={config.num_shared_experts})")
    if config.use_residual:
        blockers.append("residual MoE (use_residual=true)")
    if len(config.moe_layer_indices) != config.num_hidden_layers:
        blockers.append(f"dense layers (first_k_dense_replace={config.first_k_dense_replace}, "
                        f"moe_layer_freq={config.moe_layer_freq})")
    if config.router_score_func != "softmax":
        blockers.append(f"router_score_func={config.router_score_func!r} (Mixtral's scores are a softmax)")
    if config.uses_expert_bias:
        blockers.append("the expert bias (router_expert_bias=True; Mixtral's router has none)")
    if config.router_n_group is not None:
        blockers.append(f"group-limited routing (router_n_group={config.router_n_group}, router_topk_group="
                        f"{config.router_topk_group})")
    if config.router_scaling_factor != 1.0:
        blockers.append(f"router_scaling_factor={config.router_scaling_factor} (Mixtral's is 1)")
    if not config.norm_topk:
        blockers.append("top-1 routing (the weight is the softmax probability, Mixtral's is 1; "
                        "router_norm_topk_prob=true would match)" if config.num_experts_per_tok == 1 else
                        "router_norm_topk_prob=false (Mixtral divides the top-k weights by their sum)")
    if not config.backend_support.mixtral_export:
        blockers.append(f"moe_backend={config.moe_backend!r}")
    return blockers


def to_mixtral(config: MoeConfig, weights: dict[str, torch.Tensor]) -> tuple[MixtralConfig, dict[str, torch.Tensor]]:
    blockers = mixtral_blockers(config)
    if blockers:
        raise ValueError(f"--format mixtral needs Mixtral's architecture; this model has {', '.join(blockers)}. "
                         "Export it with --format hf.")
    mixtral = MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.moe_intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, use_cache=config.use_cache, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        num_local_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
        router_aux_loss_coef=config.router_aux_loss_coef, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
    )
    renamed = {}
    for name, tensor in weights.items():
        for pattern, target in _MIXTRAL_NAMES:
            if re.fullmatch(pattern, name):
                renamed[re.sub(pattern, target, name)] = tensor
                break
        else:
            raise ValueError(f"{name} has no place in MixtralForCausalLM; export with --format hf.")
    return mixtral, renamed


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
    if fmt == "mixtral":
        config, weights = to_mixtral(config, weights)
        config.architectures = ["MixtralForCausalLM"]
    else:
        config.architectures = ["MoeForCausalLM"]
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
    parser.add_argument("--format", choices=("hf", "mixtral"), default="hf",
                        help="hf: this project's MoeForCausalLM; mixtral: transformers' MixtralForCausalLM")
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
