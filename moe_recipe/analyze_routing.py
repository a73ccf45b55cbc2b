"""Which tokens go to which experts: run a trained model over a text and show its routing, layer by layer.

    python -m moe_recipe.analyze_routing runs/tiny_ep2 --text "def f(x): return x + 1" --out routing/
    moe-analyze-routing path/to/hf_export --text-file notes.txt --layers 0 5 11

MODEL is a Hugging Face folder (an export: `moe-export`, or any folder from_pretrained reads) or a training
checkpoint: a step_XXXXXXXX folder, or a run or checkpoints folder (its newest complete checkpoint), whatever layout
it was trained at. The tokenizer comes from the model folder, or for a checkpoint from the run's tokenizer/, else
--tokenizer.

It prints, per MoE layer, each expert's share of the tokens (first choice), how often consecutive tokens keep the
same expert compared with chance (the "expert assignment repetitions" of the Mixtral paper, Table 5) and the tokens
each expert sees most; with --out it also writes routing_tokens.png (the text coloured by first-choice expert, one
panel per layer: the Mixtral paper's Figure 8), routing_layers.png (expert shares per layer), routing_tokens.csv
(every token's top-k experts in every layer) and routing_summary.json.

The routing shown is the model's own, in eval mode: each token's top-k experts by router score plus the expert bias
where the model balances with one (the bias only chooses; the weights come from the unbiased scores), within the top
groups where routing is group-limited. Inference never drops tokens, so every token reaches the experts listed.
Shape legend: L MoE layers, T tokens, k experts per token, E experts.
"""

import argparse
import csv
import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch

from .errors import EXIT_INVALID_INPUT, check_output_folder, refuse_bad_input

EXIT_OK, EXIT_USAGE = 0, EXIT_INVALID_INPUT


def load(path: Path, tokenizer: str | None = None):
    """(model in eval mode, tokenizer, where the weights came from) for a Hugging Face folder or a training
    checkpoint (a step_XXXXXXXX folder, or a run / checkpoints folder: its newest complete checkpoint)."""
    import moe_model  # noqa: F401  registers the model with the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tokenizer_dir = Path(tokenizer) if tokenizer else path
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise ValueError(f"no tokenizer.json in {tokenizer_dir}; pass --tokenizer FOLDER.")
        return model.eval(), AutoTokenizer.from_pretrained(str(tokenizer_dir)), path
    # The training checkpoint's layout-independent weights, read as the export command reads them.
    from moe_model import MoeConfig, MoeForCausalLM

    from .checkpoint import read_manifest
    from .export import find_tokenizer, resolve_checkpoint
    from .reshard import read_weights

    checkpoint = resolve_checkpoint(path)
    manifest = read_manifest(checkpoint)
    if manifest["tensors"] is None:
        raise ValueError(f"checkpoint {checkpoint} holds no layout-independent weights to read.")
    model = MoeForCausalLM(MoeConfig.from_dict(manifest["model"]))
    model.load_state_dict(read_weights(checkpoint, manifest["tensors"]))
    tokenizer_dir = find_tokenizer(checkpoint, Path(tokenizer) if tokenizer else None)
    return model.float().eval(), AutoTokenizer.from_pretrained(str(tokenizer_dir)), checkpoint


@torch.no_grad()
def route_tokens(model, input_ids_T: torch.Tensor) -> torch.Tensor:
    """[L, T, k] experts each token's router picks in each MoE layer, best first (by biased score where the model
    has an expert bias): the model's routing (`moe_model.routing.route_tokens`) of its router logits; long texts run
    in windows."""
    from moe_model.routing import route_tokens as route

    window = model.config.max_position_embeddings
    chunks = []
    for start in range(0, input_ids_T.numel(), window):
        out = model(input_ids=input_ids_T[None, start:start + window], use_cache=False, output_router_logits=True)
        chunks.append(torch.stack([route(logits_TE, model.config, router.expert_bias).experts_Tk
                                   for logits_TE, router in zip(out.router_logits, model.routers())]))
    return torch.cat(chunks, dim=1)


def repetition_baselines(num_experts: int, k: int) -> tuple[float, float]:
    """Chance that two tokens routed uniformly at random share their first choice, and share any of their k."""
    overlap = 1.0 if num_experts - k < k else 1 - math.comb(num_experts - k, k) / math.comb(num_experts, k)
    return 1 / num_experts, overlap


def summarize(experts_LTk: torch.Tensor, tokens: list[str], num_experts: int, top_tokens: int = 5) -> dict:
    from moe_model.routing import count_routes

    L, T, k = experts_LTk.shape
    first_LT = experts_LTk[..., 0]
    layers = []
    for layer in range(L):
        share_E = count_routes(first_LT[layer], num_experts) / T
        same_first = (first_LT[layer, 1:] == first_LT[layer, :-1]).float().mean().item() if T > 1 else 0.0
        chosen_TE = torch.zeros(T, num_experts, dtype=torch.bool).scatter_(1, experts_LTk[layer], True)
        overlap = (chosen_TE[1:] & chosen_TE[:-1]).any(dim=1).float().mean().item() if T > 1 else 0.0
        seen = [Counter() for _ in range(num_experts)]
        for token, expert in zip(tokens, first_LT[layer].tolist()):
            seen[expert][token] += 1
        layers.append({
            "layer": layer,
            "expert_share": share_E.tolist(),
            "repeat_first_choice": same_first,
            "repeat_any_choice": overlap,
            "top_tokens": [[token for token, _ in counts.most_common(top_tokens)] for counts in seen],
        })
    chance_first, chance_any = repetition_baselines(num_experts, k)
    return {"num_tokens": T, "num_experts": num_experts, "top_k": k, "chance_first_choice": chance_first,
            "chance_any_choice": chance_any, "layers": layers}


def format_summary(summary: dict) -> str:
    k = summary["top_k"]
    lines = [
        f"{summary['num_tokens']} tokens, {summary['num_experts']} experts, top-{k}",
        "",
        f"Consecutive tokens with the same expert (Mixtral, Table 5); chance: first choice "
        f"{summary['chance_first_choice']:.1%}, any of top-{k} {summary['chance_any_choice']:.1%}",
        f"  {'MoE layer':>9}  {'first choice':>12}  {f'any of top-{k}':>12}  busiest expert (share of tokens)",
    ]
    for row in summary["layers"]:
        busiest = max(range(summary["num_experts"]), key=row["expert_share"].__getitem__)
        lines.append(f"  {row['layer']:>9}  {row['repeat_first_choice']:>12.1%}  {row['repeat_any_choice']:>12.1%}  "
                     f"expert {busiest} ({row['expert_share'][busiest]:.1%})")
    lines += ["", "Tokens each expert sees most (first choice)"]
    for row in summary["layers"]:
        lines.append(f"  MoE layer {row['layer']}")
        for expert, tokens in enumerate(row["top_tokens"]):
            if tokens:
                shown = ", ".join(repr(t) for t in tokens)
                lines.append(f"    expert {expert:>3} ({row['expert_share'][expert]:5.1%}): {shown}")
    return "\n".join(lines)


def write_csv(path: Path, tokens: list[str], experts_LTk: torch.Tensor) -> None:
    L = experts_LTk.shape[0]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["position", "token", *[f"moe_layer_{layer}" for layer in range(L)]])
        for t, token in enumerate(tokens):
            writer.writerow([t, token, *[" ".join(map(str, experts_LTk[layer, t].tolist())) for layer in range(L)]])


def plot_tokens(path: Path, tokens: list[str], experts_LTk: torch.Tensor, layers: list[int], num_experts: int,
                per_row: int = 16, max_tokens: int = 256) -> None:
    """The text, one panel per layer, each token on the colour of its first-choice expert (Mixtral, Figure 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = tokens[:max_tokens]
    rows = math.ceil(len(tokens) / per_row)
    colors = plt.get_cmap("tab20" if num_experts > 10 else "tab10")
    fig, axes = plt.subplots(len(layers), 1, figsize=(per_row * 0.9, 0.32 * rows * len(layers) + 0.6 * len(layers)),
                             squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        for t, token in enumerate(tokens):
            expert = int(experts_LTk[layer, t, 0])
            x, y = t % per_row, rows - 1 - t // per_row
            ax.add_patch(plt.Rectangle((x, y), 0.96, 0.9, color=colors(expert % colors.N)))
            shown = token.replace("\n", "\\n").strip() or repr(token)
            ax.text(x + 0.48, y + 0.45, shown[:9], ha="center", va="center", fontsize=6, family="monospace")
        ax.set_xlim(0, per_row)
        ax.set_ylim(0, rows)
        ax.set_axis_off()
        ax.set_title(f"MoE layer {layer}: first-choice expert of each token", fontsize=8, loc="left")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(e % colors.N)) for e in range(num_experts)]
    fig.legend(handles, [f"expert {e}" for e in range(num_experts)], loc="lower center",
               ncol=min(num_experts, 8), fontsize=6, frameon=False)
    fig.subplots_adjust(hspace=0.35)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_layer_shares(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share_LE = [row["expert_share"] for row in summary["layers"]]
    L, E = len(share_LE), summary["num_experts"]
    fig, ax = plt.subplots(figsize=(3 + 0.35 * E, 1.5 + 0.35 * L))
    image = ax.imshow(share_LE, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(E))
    ax.set_yticks(range(L))
    ax.set_title(f"share of {summary['num_tokens']} tokens (first choice)", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moe-analyze-routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="Hugging Face model folder, or a training checkpoint / run folder")
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--text")
    text.add_argument("--text-file", type=Path)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model folder's, or the run's tokenizer/)")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, nargs="*", help="MoE layers to plot (default: first, middle, last)")
    parser.add_argument("--out", type=Path, help="folder for the plots, the CSV and the JSON summary")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with refuse_bad_input("moe-analyze-routing: error"):
        try:
            model, tokenizer, source = load(args.model, args.tokenizer)
            text = args.text if args.text is not None else args.text_file.read_text()
        except (OSError, UnicodeDecodeError) as err:  # a folder from_pretrained cannot read, a bad --text-file
            raise ValueError(str(err)) from None
        input_ids = torch.tensor(tokenizer(text)["input_ids"][: args.max_tokens], dtype=torch.long)
        if input_ids.numel() == 0:
            raise ValueError("the text has no tokens; pass a non-empty --text or --text-file.")
        L = len(model.config.moe_layer_indices)
        layers = args.layers if args.layers else sorted({0, L // 2, L - 1})
        bad = [layer for layer in layers if not 0 <= layer < L]
        if bad:
            raise ValueError(f"--layers {bad} out of range; the model has MoE layers 0..{L - 1}.")
        if args.out:
            check_output_folder(args.out, "--out")
    tokens = [tokenizer.decode([i]) for i in input_ids.tolist()]
    experts_LTk = route_tokens(model, input_ids)
    num_experts = model.config.num_experts
    summary = summarize(experts_LTk, tokens, num_experts)
    summary["model"] = str(source)
    print(f"model: {source}")
    print(format_summary(summary))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(args.out / "routing_tokens.csv", tokens, experts_LTk)
        (args.out / "routing_summary.json").write_text(json.dumps(summary, indent=1))
        plot_tokens(args.out / "routing_tokens.png", tokens, experts_LTk, layers, num_experts)
        plot_layer_shares(args.out / "routing_layers.png", summary)
        print(f"\nwrote {args.out}/routing_tokens.png, routing_layers.png, routing_tokens.csv, routing_summary.json")
    return EXIT_OK


__all__ = ["load", "main", "repetition_baselines", "route_tokens", "summarize"]

if __name__ == "__main__":
    sys.exit(main())
