"""`moe-plan`: compose the recipe's config, plan it for a cluster, print the report (or JSON) and exit with its verdict.

Exit status (also in --help and docs/planner.md):
  0  the layout fits
  1  it does not fit; the report lists overrides that make it fit
  2  the configuration (or a cluster number) is invalid: the recipe's own message, as recipes/train.py would stop with
  3  valid, but not modeled (model.moe_backend=autoep): the launch scripts go on
  64 usage error: an unknown option or a malformed value (EX_USAGE; argparse's own 2 would read as "invalid config")
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from .build import NotModeledError, build_plan
from .hardware import GPU_PRESETS, ClusterSpec
from .report import format_plan
from .search import find_fixes

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_INVALID, EXIT_NOT_MODELED, EXIT_USAGE = 0, 1, 2, 3, 64
EXIT_STATUS_HELP = """exit status:
  0   the layout fits
  1   it does not fit (the report lists overrides that make it fit)
  2   invalid configuration or cluster numbers (the message says what to change)
  3   valid, but not modeled (model.moe_backend=autoep)
  64  usage error (unknown option, malformed value)"""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _ArgumentParser(
        prog="moe-plan", description="Memory, communication and step time per GPU for a recipe config, before a run.",
        epilog=EXIT_STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="Hydra overrides, as for recipes/train.py (model=small ...), anywhere on the line")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--nodes", type=int, default=1)
    cluster.add_argument("--gpus-per-node", type=int, default=8)
    cluster.add_argument("--gpu", default="h100", help=f"preset: {', '.join(GPU_PRESETS)}, or auto (this machine's)")
    cluster.add_argument("--gpu-memory-gib", type=float, help="overrides the preset")
    cluster.add_argument("--intra-node-gbps", type=float, help="GB/s per GPU and direction inside a node")
    cluster.add_argument("--inter-node-gbps", type=float, help="GB/s per GPU and direction between nodes")
    cluster.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s per GPU")
    cluster.add_argument("--mfu", type=float, help="share of peak FLOPs reached (default 0.4)")
    cluster.add_argument("--headroom", type=float, help="share of GPU memory kept free (default 0.1)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    # Intermixed: the launch scripts put the cluster options first and the user's overrides after them; people
    # also add an override after an option.
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    from ..errors import CONFIG_ERRORS, input_error_message

    args = parse_args(argv)
    try:
        # DeepSpeed logs to stdout (on import, and later): keep stdout for the report or the JSON document alone.
        with contextlib.redirect_stdout(sys.stderr):
            from ..recipe import load_recipe  # imports the model, hence DeepSpeed

            cluster = ClusterSpec.from_preset(
                args.gpu, nodes=args.nodes, gpus_per_node=args.gpus_per_node, memory_gib=args.gpu_memory_gib,
                intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
                peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None, mfu=args.mfu,
                headroom=args.headroom)
            # Composed, typed and validated as recipes/train.py does; the tokenizer is checked against the model
            # where it is present (a login node may lack the data).
            recipe = load_recipe(args.overrides, cluster.world_size, require_tokenizer=False)
            vocab_size = len(recipe.tokenizer) if recipe.tokenizer is not None else None
            plan = build_plan(recipe.config, cluster, vocab_size, overrides=args.overrides)
            fixes = [] if plan.fits else find_fixes(recipe.config, cluster, vocab_size)
    except (*CONFIG_ERRORS, ValueError) as err:
        message = input_error_message(err)
        if args.json:
            print(json.dumps({"valid": False, "error": message}))
        print(f"Invalid configuration: {message}", file=sys.stderr)
        return EXIT_INVALID
    except NotModeledError as err:
        if args.json:
            print(json.dumps({"valid": True, "modeled": False, "error": str(err)}))
        print(f"No plan: {err}", file=sys.stderr)
        return EXIT_NOT_MODELED
    if args.json:
        print(json.dumps({"valid": True, **plan.to_dict(), "fixes": fixes}, indent=2))
    else:
        print(format_plan(plan, fixes))
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT


__all__ = ["EXIT_DOES_NOT_FIT", "EXIT_FITS", "EXIT_INVALID", "EXIT_NOT_MODELED", "EXIT_USAGE",
           "main", "parse_args"]
