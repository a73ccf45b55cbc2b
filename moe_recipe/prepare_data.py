"""Tokenize a corpus once into a token store that training reads by memory map.

    moe-prepare-data                                           # the embedded corpus, into its default store
    moe-prepare-data data=local_files 'data.data_files=[/data/web/*.jsonl]' data.store=/data/stores/web
    moe-prepare-data --from-tokens train.bin --val-tokens val.bin --output /data/stores/owt   # nanoGPT files

Everything after the options is a Hydra override of the training config, exactly as for recipes/train.py: the store
lands at data.store (or, unset, where training looks for the default store of that source), so
`moe-prepare-data X` followed by `moe-train X` trains on what was prepared. Exit codes: 0 done (or --if-missing
and the store exists), 2 bad input (one message, nothing written).
"""

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

from .data import (build_store, default_store_path, load_tokenizer, open_store, resolve_path, store_components,
                   store_from_tokens, tokenizer_fingerprint)
from .data.store import MANIFEST
from .errors import refuse_bad_input


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moe-prepare-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training config (data.*, +experiment=...)")
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)),
                        help="Tokenizer processes (default: every core this process may use, %(default)s here).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing store (kept until the new one "
                        "is complete).")
    parser.add_argument("--if-missing", action="store_true",
                        help="Do nothing if the store exists (the Slurm scripts run this before every job).")
    parser.add_argument("--output", help="Store folder; default data.store, else the default store of the source.")
    tokens = parser.add_argument_group("already tokenized files (nanoGPT .bin of raw tokens, or 1-D .npy)")
    tokens.add_argument("--from-tokens", nargs="+", type=Path, metavar="FILE",
                        help="Token files to use as the train split (left in place; a manifest is written).")
    tokens.add_argument("--val-tokens", nargs="+", type=Path, default=[], metavar="FILE",
                        help="Token files of the val split; default: the last data.val_fraction of the tokens.")
    tokens.add_argument("--dtype", choices=["uint16", "uint32"],
                        help="Token type of .bin files; default uint16 up to 65536 tokens, else uint32.")
    return parser.parse_args(argv)


def compose_data_config(overrides: list[str]):
    """The data section of the training config, composed and typed as recipes/train.py does (recipe.load_recipe)."""
    from .recipe import compose, typed_config

    return typed_config(compose(overrides))[0].data


def prepare(args: argparse.Namespace) -> None:
    cfg = compose_data_config(args.overrides)
    cfg.validate()
    if args.num_proc < 1:
        raise ValueError(f"--num-proc={args.num_proc} must be at least 1.")
    tokenizer = load_tokenizer(cfg)
    if args.output:
        target = resolve_path(args.output) if not args.from_tokens else Path(args.output).resolve()
    elif args.from_tokens:
        target = args.from_tokens[0].resolve().parent
    elif cfg.mixture:
        missing = [str(path) for _, _, path, _ in store_components(cfg) if not (path / MANIFEST).is_file()]
        if args.if_missing and not missing:
            return
        raise ValueError(f"data.mixture: the stores {missing} are missing; prepare each with its own source settings "
                         "and --output (a mixture names stores, not sources).")
    else:
        target = resolve_path(cfg.store) if cfg.store is not None else default_store_path(cfg)

    if args.if_missing and (target / MANIFEST).is_file():
        print(f"Token store {target} exists; nothing to do.", flush=True)
        return
    start = time.perf_counter()
    if args.from_tokens:
        manifest = store_from_tokens(args.from_tokens, args.val_tokens, tokenizer, cfg.tokenizer,
                                     tokenizer_fingerprint(cfg), target, val_fraction=cfg.val_fraction,
                                     dtype=args.dtype, overwrite=args.overwrite)
    else:
        manifest = build_store(cfg, tokenizer, target, num_proc=args.num_proc, overwrite=args.overwrite)
    open_store(target, "--output")  # what training will do: every file present and agreeing with the manifest
    seconds = time.perf_counter() - start
    splits = manifest["splits"]
    num_tokens = sum(s["num_tokens"] for s in splits.values())
    print(f"Token store {target}: {splits['train']['num_tokens']:,} train and {splits['val']['num_tokens']:,} val "
          f"tokens ({manifest['dtype']}), {splits['train']['num_documents']:,} + {splits['val']['num_documents']:,} "
          f"documents, in {seconds:.1f}s ({num_tokens / seconds:,.0f} tokens/s).", flush=True)
    if not args.output and not args.from_tokens and cfg.store is None:
        print("Training with the same data.* overrides reads it (data.store unset: the default store).", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with refuse_bad_input("moe-prepare-data: error"):
        prepare(args)


if __name__ == "__main__":
    main()
