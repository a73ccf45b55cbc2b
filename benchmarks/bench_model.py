"""Training-step throughput of this project's MoeForCausalLM against transformers' MixtralForCausalLM.

Both models get the same dimensions, the same batches, SDPA attention, the same dtype (the parameters are cast,
so no autocast: transformers' grouped_mm is not autocast-enabled and would run in fp32 under it) and the same
step: forward with labels (LM loss + load-balancing aux loss; ours adds the router z-loss), backward, torch AdamW
(fused on CUDA). One process, one device, every variant in turn; the median of the timed steps is reported.

Variants:
    ours             MoeForCausalLM, dropless (drop_tokens=False: every expert's buffer is padded to the
                     busiest expert's load, so max/mean tokens per expert is the padding overhead).
    ours-cf<X>       MoeForCausalLM dropping tokens at capacity_factor X (from --capacity-factors).
    hf-eager         MixtralForCausalLM, experts_implementation="eager" (Python loop over the hit experts).
    hf-grouped_mm    MixtralForCausalLM, experts_implementation="grouped_mm" (torch grouped GEMM, no padding).
    ours-autoep      with --backend autoep: MoeForCausalLM(moe_backend="autoep") whose MoE blocks DeepSpeed AutoEP
                     has swapped for its dropless grouped-GEMM layer (in process, ep_size 1: what
                     deepspeed.initialize does with an "expert_parallel" config).

A second table times one MoE block forward + backward (ours vs MixtralSparseMoeBlock) and reports the useful
FLOP/s, 6 * T * k * 3 * D * F / time, which counts only the routed tokens, not padding.

Run from the repository root:  python -m benchmarks.bench_model --preset cpu

Shape legend: B batch, S sequence, T tokens (B * S), D hidden, F expert intermediate, E experts, k top-k, L layers.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace

import deepspeed
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig
from transformers.integrations.moe import _can_use_grouped_mm
from deepspeed.module_inject.auto_ep import AutoEP
from deepspeed.module_inject.auto_ep_config import parse_autoep_config
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moe_model import MoeConfig, MoeForCausalLM
from moe_model.moe_blocks import MoeSparseBlock, autoep_layer_settings
from moe_model.routing import MoeRouterState


@dataclass(frozen=True)
class BenchShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    experts: int
    expert_size: int
    top_k: int
    seq: int
    batch: int
    vocab: int
    warmup: int
    steps: int


PRESETS = {
    # Under a minute for all variants on 2 CPU cores.
    "cpu": BenchShape(layers=4, hidden=256, heads=8, kv_heads=4, experts=8, expert_size=512, top_k=2,
                      seq=256, batch=4, vocab=4096, warmup=3, steps=10),
    # Mixtral-shaped, coarse experts.
    "h100": BenchShape(layers=8, hidden=1024, heads=16, kv_heads=8, experts=8, expert_size=2816, top_k=2,
                       seq=2048, batch=8, vocab=32000, warmup=3, steps=10),
    # Fine-grained experts (DeepSeekMoE / OLMoE style): h100's shape with 64 experts of 704, top-8, so the same
    # expert FLOPs per token (k * F = 5632) spread over 8x as many, 4x smaller experts. About a minute on an H100.
    "fine": BenchShape(layers=8, hidden=1024, heads=16, kv_heads=8, experts=64, expert_size=704, top_k=8,
                       seq=2048, batch=8, vocab=32000, warmup=3, steps=10),
}
HF_VARIANTS = {"hf-eager": "eager", "hf-grouped_mm": "grouped_mm"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Variant:
    name: str
    capacity_factor: float | None = None  # ours only; None = dropless
    experts_implementation: str | None = None  # HF only
    backend: str = "deepspeed"  # ours only: MoeConfig.moe_backend

    @property
    def is_ours(self) -> bool:
        return self.experts_implementation is None


def parse_variants(names: list[str], capacity_factors: list[float], backends: list[str]) -> list[Variant]:
    variants = []
    for name in names:
        if name == "ours" and "deepspeed" in backends:
            variants.append(Variant(name))
            variants += [Variant(f"ours-cf{cf}", capacity_factor=cf) for cf in capacity_factors]
        if name == "ours" and "autoep" in backends:  # dropless only: no capacity
            variants.append(Variant("ours-autoep", backend="autoep"))
        if name == "ours":
            continue
        elif name in HF_VARIANTS:
            variants.append(Variant(name, experts_implementation=HF_VARIANTS[name]))
        else:
            raise ValueError(f"Unknown variant {name!r}; choose among 'ours', {', '.join(map(repr, HF_VARIANTS))} "
                             "(token-dropping variants of ours come from --capacity-factors).")
    return variants


def ours_config(shape: BenchShape, capacity_factor: float | None, backend: str = "deepspeed") -> MoeConfig:
    return MoeConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.expert_size,
        moe_intermediate_size=shape.expert_size, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.seq,
        num_experts=shape.experts, num_experts_per_tok=shape.top_k, use_cache=False,
        drop_tokens=capacity_factor is not None, capacity_factor=capacity_factor or 1.0,
        moe_backend=backend, **({"top2_2nd_expert_sampling": False} if backend == "autoep" else {}),
    )


def swap_in_autoep(model: MoeForCausalLM) -> MoeForCausalLM:
    """What deepspeed.initialize does with an "expert_parallel" config, at ep_size 1 (no process group needed)."""
    settings = {"enabled": True, "autoep_size": 1, **autoep_layer_settings(model.config)}
    autoep = AutoEP(model, parse_autoep_config(settings))
    autoep.replace_moe_layers(autoep.ep_parser(), ep_size=1, ep_rank=0)
    return model


def hf_config(shape: BenchShape, experts_implementation: str) -> MixtralConfig:
    config = MixtralConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.expert_size,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.seq, num_local_experts=shape.experts, num_experts_per_tok=shape.top_k,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, use_cache=False,
        # Mixtral computes its aux loss only when asked; a training step pays for it, so ask, with our coefficient.
        output_router_logits=True, router_aux_loss_coef=MoeConfig().router_aux_loss_coef,
    )
    config._experts_implementation = experts_implementation
    config._attn_implementation = "sdpa"
    return config


def build_model(variant: Variant, shape: BenchShape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if variant.backend == "autoep":
        model = swap_in_autoep(MoeForCausalLM(ours_config(shape, None, "autoep")))
    elif variant.is_ours:
        model = MoeForCausalLM(ours_config(shape, variant.capacity_factor))
    else:
        model = AutoModelForCausalLM.from_config(
            hf_config(shape, variant.experts_implementation),
            attn_implementation="sdpa", experts_implementation=variant.experts_implementation,
        )
    return model.to(device=device, dtype=dtype).train()


def build_block(variant: Variant, shape: BenchShape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if variant.backend == "autoep":  # AutoEP's layer, taken from a one-layer model
        model = swap_in_autoep(MoeForCausalLM(ours_config(replace(shape, layers=1), None, "autoep")))
        block = model.model.layers[0].mlp
    elif variant.is_ours:
        config = ours_config(shape, variant.capacity_factor)
        block = MoeSparseBlock(config, MoeRouterState(config, bias_owner=lambda: None))
    else:
        block = MixtralSparseMoeBlock(hf_config(shape, variant.experts_implementation))
    with torch.no_grad():  # Mixtral's expert tensors are torch.empty until the model's init runs.
        for param in block.parameters():
            param.normal_(0.0, 0.02)
    return block.to(device=device, dtype=dtype).train()


def grouped_mm_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why hf-grouped_mm cannot run a native grouped GEMM here, or None when it can."""
    x_TD = torch.randn(8, 16, device=device, dtype=dtype, requires_grad=True)
    w_EDF = torch.randn(2, 16, 32, device=device, dtype=dtype, requires_grad=True)
    offsets_E = torch.tensor([3, 8], device=device, dtype=torch.int32)
    if not _can_use_grouped_mm(x_TD, w_EDF, offsets_E):
        return (f"transformers {transformers.__version__} would fall back to its per-expert loop on "
                f"{device.type}/{dtype} (torch {torch.__version__} has no usable grouped_mm kernel there)")
    try:
        F.grouped_mm(x_TD, w_EDF, offs=offsets_E).backward(torch.ones(8, 32, device=device, dtype=dtype))
    except (RuntimeError, NotImplementedError) as error:
        return f"torch.nn.functional.grouped_mm fails on {device.type}/{dtype}: {error}"
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    # On CPU there is no allocator peak to read, and RSS deltas mix in the previous variants' freed memory.
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_train_steps(variant: Variant, shape: BenchShape, device: torch.device, dtype: torch.dtype,
                     peak_flops: float, profile_steps: int = 0) -> dict:
    reset_memory(device)
    model = build_model(variant, shape, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(1)
    batches_BS = [torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator).to(device)
                  for _ in range(shape.warmup + shape.steps)]
    step_seconds, tokens_per_expert_LE, dropped_fraction_L = [], [], []
    for step, input_ids_BS in enumerate(batches_BS):
        synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=input_ids_BS, labels=input_ids_BS, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= shape.warmup:
            step_seconds.append(time.perf_counter() - start)
        if variant.is_ours:  # the routers' sums of this step (read after the timed region: a host sync)
            routing = model.routing_metrics(reset=True)
            if step >= shape.warmup:
                tokens_per_expert_LE.append(routing.received_LE)
                dropped_fraction_L.append(routing.dropped_L)
        del out
    kernels = profile_train_steps(model, optimizer, batches_BS[-profile_steps:], device) if profile_steps else None
    seconds = statistics.median(step_seconds)
    tokens = shape.batch * shape.seq
    result = {
        "variant": variant.name,
        "step_ms": 1e3 * seconds,
        "tokens_per_s": tokens / seconds,
        "peak_mem_gib": peak_memory_gib(device),
        "mfu_pct": 100 * 6 * active_params(shape) * tokens / seconds / peak_flops if device.type == "cuda" else None,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if variant.is_ours:
        result.update(routing_stats(torch.stack(tokens_per_expert_LE), torch.stack(dropped_fraction_L)))
    if kernels is not None:
        result["profile_table"], result["top_kernels"] = kernels
    del model, optimizer
    reset_memory(device)
    return result


def profile_train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches_BS: list[torch.Tensor],
                        device: torch.device, rows: int = 25) -> tuple[str, list[dict]]:
    """Untimed extra steps under torch.profiler: the key_averages table and its top rows by self time on the
    device (CUDA kernels; CPU ops on CPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for input_ids_BS in batches_BS:
            out = model(input_ids=input_ids_BS, labels=input_ids_BS, use_cache=False)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del out
        synchronize(device)
    averages = prof.key_averages()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(averages, key=lambda event: getattr(event, sort_by), reverse=True)
    total_us = sum(getattr(event, sort_by) for event in averages) or 1.0
    top = [{"name": event.key, "calls": event.count,
            "self_ms_per_step": getattr(event, sort_by) / 1e3 / len(batches_BS),
            "self_pct": 100 * getattr(event, sort_by) / total_us} for event in events[:rows]]
    return averages.table(sort_by=sort_by, row_limit=rows, max_name_column_width=60), top


def routing_stats(tokens_per_expert_NLE: torch.Tensor, dropped_fraction_NL: torch.Tensor) -> dict:
    """Max over experts / mean over experts of the tokens each expert received, per step and layer."""
    imbalance_NL = tokens_per_expert_NLE.amax(-1) / tokens_per_expert_NLE.mean(-1)
    return {
        "imbalance_mean": imbalance_NL.mean().item(),
        "imbalance_worst_layer": imbalance_NL.mean(0).max().item(),
        "imbalance_per_layer": imbalance_NL.mean(0).tolist(),
        "dropped_fraction": dropped_fraction_NL.mean().item(),
    }


def time_moe_block(variant: Variant, shape: BenchShape, device: torch.device, dtype: torch.dtype,
                   peak_flops: float) -> dict:
    block = build_block(variant, shape, device, dtype)
    generator = torch.Generator().manual_seed(2)
    x_BSD = torch.randn(shape.batch, shape.seq, shape.hidden, generator=generator).to(device, dtype)
    grad_BSD = torch.randn(x_BSD.shape, generator=generator).to(device, dtype)
    x_BSD.requires_grad_(True)
    seconds, tokens_per_expert_E = [], None
    for step in range(shape.warmup + shape.steps):
        synchronize(device)
        start = time.perf_counter()
        out = block(x_BSD)
        if isinstance(block, MoeSparseBlock):  # its router state holds what the experts received
            tokens_per_expert_E = block.router_state.pop().received_E
        out.backward(grad_BSD)
        synchronize(device)
        if step >= shape.warmup:
            seconds.append(time.perf_counter() - start)
        block.zero_grad(set_to_none=True)
        x_BSD.grad = None
    median = statistics.median(seconds)
    tokens = shape.batch * shape.seq
    useful_flops = 6 * tokens * shape.top_k * 3 * shape.hidden * shape.expert_size
    return {
        "variant": variant.name,
        "fwd_bwd_ms": 1e3 * median,
        "tflops": useful_flops / median / 1e12,
        "pct_peak": 100 * useful_flops / median / peak_flops if device.type == "cuda" else None,
        "imbalance": (tokens_per_expert_E.max() / tokens_per_expert_E.mean()).item()
        if tokens_per_expert_E is not None else None,
    }


def active_params(shape: BenchShape) -> int:
    """Parameters one token's forward multiplies by: all but the embedding, and k of the E experts per layer."""
    D, F, E, k, L = shape.hidden, shape.expert_size, shape.experts, shape.top_k, shape.layers
    head_dim = D // shape.heads
    attention = D * head_dim * (2 * shape.heads + 2 * shape.kv_heads)
    per_layer = attention + D * E + 3 * D * F * k + 2 * D
    return L * per_layer + D + shape.vocab * D  # final norm, lm_head


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                     platform.processor())
    return f"{model} ({torch.get_num_threads()} threads)"


def fmt(value: float | None, spec: str) -> str:
    """`spec` may end in a literal '%' (a unit suffix, not the percent format)."""
    if value is None:
        return "-"
    return format(value, spec.rstrip("%")) + "%" * spec.endswith("%")


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def speedup(tokens_per_s: float, reference: dict | None) -> str:
    return f"{tokens_per_s / reference['tokens_per_s']:.2f}x" if reference else "-"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=PRESETS, help="shape preset (default: h100 on CUDA, cpu otherwise)")
    run.add_argument("--variants", nargs="+", default=["ours", *HF_VARIANTS],
                     help="among ours, hf-eager, hf-grouped_mm")
    run.add_argument("--backend", nargs="+", choices=["deepspeed", "autoep"], default=["deepspeed"],
                     help="MoE backend(s) of 'ours': deepspeed (native MoE layer: ours, ours-cf<X>) and/or autoep "
                     "(AutoEP's dropless grouped-GEMM layer: ours-autoep)")
    run.add_argument("--capacity-factors", nargs="*", type=float, default=[1.0, 1.25],
                     help="with 'ours': also time token-dropping variants at these capacity factors (none: skip)")
    run.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    run.add_argument("--dtype", choices=DTYPES, help="parameter dtype for every model (default: bf16 on CUDA, "
                     "fp32 on CPU)")
    run.add_argument("--peak-tflops", type=float, default=989.0,
                     help="peak dense FLOP/s of the device in this dtype, for MFU (H100/H200 SXM bf16: 989)")
    run.add_argument("--no-block", action="store_true", help="skip the single MoE block micro-benchmark")
    run.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    run.add_argument("--profile", metavar="FILE", help="after timing, profile --profile-steps more training steps of "
                     "each of --profile-variants and write torch.profiler's top-kernel tables to FILE (and the top "
                     "rows to the JSON)")
    run.add_argument("--profile-variants", nargs="+", default=["ours", "ours-autoep", "hf-grouped_mm"],
                     help="variants to profile with --profile (those that run)")
    run.add_argument("--profile-steps", type=int, default=2, help="profiled steps per variant with --profile")
    shape = parser.add_argument_group("shape overrides (on top of the preset)")
    for flag, help_text in [("layers", "decoder layers, all MoE"), ("hidden", "hidden size D"),
                            ("heads", "attention heads"), ("kv-heads", "key/value heads"),
                            ("experts", "routed experts E"), ("expert-size", "expert intermediate size F"),
                            ("top-k", "experts per token k"), ("seq", "sequence length S"),
                            ("batch", "batch size B"), ("vocab", "vocabulary size"),
                            ("warmup", "untimed steps"), ("steps", "timed steps (median reported)")]:
        shape.add_argument(f"--{flag}", type=int, help=help_text)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    preset = args.preset or ("h100" if device.type == "cuda" else "cpu")
    overrides = {field: getattr(args, field) for field in BenchShape.__dataclass_fields__
                 if getattr(args, field) is not None}
    shape = replace(PRESETS[preset], **overrides)
    variants = parse_variants(args.variants, args.capacity_factors, args.backend)
    peak_flops = args.peak_tflops * 1e12

    env = {
        "device": device_name(device), "dtype": str(dtype).removeprefix("torch."), "preset": preset,
        "torch": torch.__version__, "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if device.type == "cpu":  # other processes on the machine skew CPU timings; the load average shows it
        env["loadavg_1min_start"] = os.getloadavg()[0]
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    print("shape: " + ", ".join(f"{k}={v}" for k, v in asdict(shape).items()))
    print(f"active params (non-embedding, k of E experts): {active_params(shape) / 1e6:.1f}M; "
          f"tokens per step: {shape.batch * shape.seq}")
    if any(v.experts_implementation == "grouped_mm" for v in variants):
        if reason := grouped_mm_unavailable(device, dtype):
            print(f"skipping hf-grouped_mm: {reason}")
            variants = [v for v in variants if v.experts_implementation != "grouped_mm"]

    profiled = set(args.profile_variants) if args.profile else set()
    steps = [time_train_steps(v, shape, device, dtype, peak_flops, args.profile_steps if v.name in profiled else 0)
             for v in variants]
    if len({r["params"] for r in steps}) > 1:
        raise RuntimeError(f"models differ in size, so the dimensions do not match: "
                           f"{ {r['variant']: r['params'] for r in steps} }")
    print(f"total params (every variant): {steps[0]['params'] / 1e6:.1f}M")
    reference = next((r for r in steps if r["variant"] == "hf-grouped_mm"), None)
    print_table(
        "Training step (forward + backward + AdamW), median",
        ["variant", "tokens/s", "vs hf-grouped_mm", "step ms", "peak mem GiB", "MFU",
         "max/mean tokens per expert (mean, worst layer)", "dropped"],
        [[r["variant"], f"{r['tokens_per_s']:,.0f}", speedup(r["tokens_per_s"], reference),
          f"{r['step_ms']:.1f}", fmt(r["peak_mem_gib"], ".2f"), fmt(r["mfu_pct"], ".1f%"),
          f"{r['imbalance_mean']:.2f}, {r['imbalance_worst_layer']:.2f}" if "imbalance_mean" in r else "-",
          f"{100 * r['dropped_fraction']:.1f}%" if "dropped_fraction" in r else "-"] for r in steps],
    )

    blocks = [] if args.no_block else [time_moe_block(v, shape, device, dtype, peak_flops) for v in variants]
    if blocks:
        block_reference = next((r for r in blocks if r["variant"] == "hf-grouped_mm"), None)
        print_table(
            f"One MoE block forward + backward (T={shape.batch * shape.seq}, D={shape.hidden}, F={shape.expert_size}, "
            f"E={shape.experts}, k={shape.top_k}), useful FLOP/s = 6*T*k*3*D*F / time",
            ["variant", "fwd+bwd ms", "vs hf-grouped_mm", "TFLOP/s", "% of peak", "max/mean tokens per expert"],
            [[r["variant"], f"{r['fwd_bwd_ms']:.2f}",
              f"{block_reference['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if block_reference else "-",
              f"{r['tflops']:.3f}", fmt(r["pct_peak"], ".1f%"), fmt(r["imbalance"], ".2f")] for r in blocks],
        )
    if device.type == "cpu":
        env["loadavg_1min_end"] = os.getloadavg()[0]
        print(f"\n1-minute load average: {env['loadavg_1min_start']:.2f} at start, {env['loadavg_1min_end']:.2f} at end "
              f"(this benchmark alone adds about {torch.get_num_threads()})")
    if args.profile:
        with open(args.profile, "w") as out:
            for r in steps:
                if "profile_table" in r:
                    out.write(f"## {r['variant']}: {args.profile_steps} training steps, {env['device']}, "
                              f"preset {preset}\n{r.pop('profile_table')}\n")
        print(f"\nwrote {args.profile}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"env": env, "shape": asdict(shape), "train_step": steps, "moe_block": blocks}, out, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
