"""The plan as text for people, in units that read at any scale (K/M/B parameters, KiB..TiB, us..s)."""

from __future__ import annotations

from .build import Plan
from .hardware import GiB


def _three_digits(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def format_count(n: float) -> str:
    """Parameters, tokens: 46.7B, 1.61M, 830K, 512."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{_three_digits(n / size)}{unit}"
    return f"{n:.0f}"


def format_bytes(n: float) -> str:
    """Bytes in binary units: 1.50 GiB, 12.0 KiB, 512 B."""
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_seconds(seconds: float) -> str:
    """1.64 s, 26.1 ms, 310 us."""
    if seconds == 0:
        return "0 s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{_three_digits(seconds * 1e3)} ms"
    return f"{_three_digits(seconds * 1e6)} us"


def format_token_dispatch(p: Plan) -> list[str]:
    """How many EP ranks a token reaches, and the volume of a once-per-rank dispatcher, with and without groups."""
    d = p.comm.token_dispatch
    lines = [f"  a token's k={d.num_experts_per_tok} experts reach {d.expected_ranks:.2f} of {p.ep_size} EP ranks on "
             f"average (uniform routing), at most {d.max_ranks}; a dispatcher sending each token once per "
             f"destination rank would hand over {format_bytes(d.bytes_per_step)} per step"]
    if d.max_ranks_limited is None:
        return lines
    groups = f"model.router.n_group={d.n_group}, topk_group={d.topk_group}"
    if d.expected_ranks_limited is None:
        lines.append(f"  group-limited routing ({groups}; groups straddle EP ranks): at most {d.max_ranks_limited} "
                     "ranks per token; the expected volume is not modeled")
    else:
        lines.append(f"  group-limited routing ({groups}): at most {d.max_ranks_limited} ranks per token, "
                     f"{d.expected_ranks_limited:.2f} on average: {format_bytes(d.bytes_per_step_limited)} per step, "
                     f"{d.saving:.0%} less")
    lines.append("  (DeepSpeed's all-to-all above sends the whole E x C buffer whatever the routing: the group limit "
                 "does not shrink it)")
    return lines


def format_plan(p: Plan, fixes: list[list[str]] = ()) -> str:
    """The report `moe-plan` prints; `fixes` (from search.find_fixes) are listed, one per line, if it does not fit."""
    m, a, comm, cl = p.memory, p.activations, p.comm, p.cluster

    def row(label: str, total: float, dense: float | None = None, expert: float | None = None) -> str:
        split = f"{format_bytes(dense):>12}{format_bytes(expert):>12}" if dense is not None else " " * 24
        return f"  {label:<44}{split}{format_bytes(total):>12}"

    lines = [
        f"Cluster: {cl.nodes} node(s) x {cl.gpus_per_node} {cl.gpu} = {p.world_size} GPUs, {cl.memory_gib:g} GiB each; "
        f"NVLink/PCIe {cl.intra_node_gbps:g} GB/s, network {cl.inter_node_gbps:g} GB/s per GPU",
        f"Layout: EP {p.ep_size} x expert-DP {p.expert_dp_size}; dense DP {p.world_size}; ZeRO {p.zero_stage}"
        f"{' + offload' if p.offload_optimizer else ''}; {p.precision}; micro-batch {p.micro_batch_size} x "
        f"{p.seq_len} tokens, grad_accum {p.grad_accum}, global batch {p.global_batch_size} sequences",
        f"Parameters: {format_count(p.total_params)} total, {format_count(m.num_params.dense)} dense (on every GPU), "
        f"{format_count(p.expert_params_total)} in experts ({format_count(m.num_params.expert)} per GPU); "
        f"{format_count(p.active_params_per_token)} active per token (embeddings and norms excluded)",
        "",
        f"Memory per GPU{'':<32}{'dense':>12}{'expert':>12}{'total':>12}",
    ]
    for label, split in (("parameters", m.params), ("gradients", m.grads), ("fp32 master weights", m.master_weights),
                         ("optimizer states (Adam m, v)", m.optimizer_states)):
        lines.append(row(label, split.total, split.dense, split.expert))
    if m.grad_buckets:
        lines.append(row("ZeRO gradient buckets", m.grad_buckets))
    if m.host:
        lines.append(row("host memory (offloaded optimizer)", m.host))
    if m.step_transient:
        lines.append(row("extra inside optimizer.step()", m.step_transient))
    other = "off" if p.activation_checkpointing else "on"
    lines += [
        row("activations, checkpointing off", a.saved),
        row(f"  of which expert buffers (E x C, C={comm.capacity})", a.expert_buffers),
        row("activations, checkpointing on", a.saved_checkpointed),
        row("logits and loss backward", a.logits + a.loss_backward),
        row(f"estimated peak (checkpointing {'on' if p.activation_checkpointing else 'off'})", p.peak_bytes)
        + f"  of {format_bytes(p.usable_bytes)} usable: {'fits' if p.fits else 'DOES NOT FIT'}",
        row(f"estimated peak (checkpointing {other})", p.peak_bytes_other),
        "",
        "Communication per step per GPU (bytes handed to the collectives)",
    ]
    if p.ep_size > 1:
        moe_layers = comm.all_to_all_total // max(comm.all_to_all_per_moe_layer, 1)
        lines += [
            f"  all-to-all buffer E x C x D x b = {comm.all_to_all_buffer:,} B "
            f"({format_bytes(comm.all_to_all_buffer)}); "
            f"{comm.all_to_all_calls_per_moe_layer} calls per MoE layer per micro-batch "
            f"(dispatch + combine, forward + backward{' + recompute' if p.activation_checkpointing else ''})",
            f"  all-to-all per MoE layer: {format_bytes(comm.all_to_all_per_moe_layer)}; "
            f"all {moe_layers} MoE layers: {format_bytes(comm.all_to_all_total)}, "
            f"of which {format_bytes(comm.all_to_all_sent)} leaves the GPU "
            f"({comm.ep_peers_same_node} EP peers on this node, {comm.ep_peers_other_nodes} on others)",
            *format_token_dispatch(p),
        ]
    else:
        lines.append("  all-to-all: none (ep_size=1)")
    expert_reduction = (f"experts {format_bytes(comm.expert_grad_reduction)} over {p.expert_dp_size} ranks"
                        if p.expert_dp_size > 1 else "experts none (expert-DP 1)")
    lines += [
        f"  gradient reduction: dense {format_bytes(comm.dense_grad_reduction)} over {p.world_size} ranks, "
        f"{expert_reduction}",
        "",
        f"Step time estimate (no overlap, {cl.mfu:.0%} of {cl.peak_flops / 1e12:.0f} TFLOP/s): compute "
        f"{format_seconds(p.compute_seconds)} + all-to-all {format_seconds(comm.all_to_all_seconds)} + gradient "
        f"reduction {format_seconds(comm.grad_reduction_seconds)} = {format_seconds(p.step_seconds)}; "
        f"{format_count(p.tokens_per_second)} tokens/s",
    ]
    lines += [f"warning: {warning}" for warning in p.warnings]
    if not p.fits:
        lines.append(f"\nDOES NOT FIT: estimated peak {format_bytes(p.peak_bytes)} > {format_bytes(p.usable_bytes)} "
                     f"usable ({cl.memory_gib:g} GiB minus {cl.headroom:.0%} headroom).")
        if fixes:
            lines.append("Fixes, one per line (add the overrides of any one line to the command):")
            lines += [f"  {' '.join(fix)}" for fix in fixes]
        else:
            lines.append("No change tried here fits: use more GPUs, a smaller model or a shorter sequence.")
    return "\n".join(lines)


__all__ = ["format_bytes", "format_count", "format_plan", "format_seconds"]
