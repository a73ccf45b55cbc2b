"""The planner's pure parts: activation bytes against what autograd really saves, capacity and ZeRO partitioning
against DeepSpeed's own functions, active parameters against the real model, and the command's verdicts, exit codes,
units and fixes.

The engine-level checks (parameter, optimizer-state and all-to-all bytes on several ranks) are in
tests/distributed/test_plan_vs_engine.py; the GPU peak-memory check is marked `gpu` there.
"""

import json
import re
import subprocess
import sys
import weakref

import pytest
import torch
from deepspeed.moe.sharded_moe import _capacity
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from moe_model import MoeConfig, MoeForCausalLM
from moe_model.routing import route_tokens
from moe_recipe.config import CONF_DIR
from moe_recipe.flops import flops_per_token
from moe_recipe.plan import (
    DTYPE_BYTES,
    EXIT_DOES_NOT_FIT,
    EXIT_FITS,
    EXIT_INVALID,
    EXIT_NOT_MODELED,
    EXIT_USAGE,
    ClusterSpec,
    OptimizerGroup,
    activation_memory,
    build_plan,
    expert_capacity,
    format_bytes,
    format_count,
    main,
    optimizer_groups,
    zero2_grad_numel,
    zero_flat_numel,
)
from moe_recipe.plan.communication import expected_destination_ranks, max_destination_ranks
from moe_recipe.recipe import load_recipe


def saved_tensor_bytes(model, input_ids) -> int:
    """Bytes of the distinct storages autograd holds for backward after one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    packed = []

    def pack(t):
        packed.append(weakref.ref(t))  # a node dropped during the forward frees what it saved: count only the living
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=input_ids, labels=input_ids)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in packed)
                if t is not None}
    del out
    return sum(nbytes for ptr, nbytes in storages.items() if ptr not in params)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("overrides", [
    {},
    {"num_shared_experts": 1, "first_k_dense_replace": 1, "num_hidden_layers": 3},
    {"num_experts_per_tok": 1, "capacity_factor": 1.0, "min_capacity": 50},  # top-1; min_capacity sets C
    {"num_experts_per_tok": 3, "num_experts": 6},  # the top-k gate
    {"qk_norm": True},
    # Multi-head Latent Attention, queries projected directly or through a bottleneck. v_head_dim equals the q/k
    # head dim (8 + 8): CPU's fused SDPA needs that, and falls back to the math kernel, which keeps the attention
    # probabilities, otherwise (GPUs' memory-efficient kernel takes another v_head_dim, as the plan assumes).
    {"attention": "mla", "num_key_value_heads": 4, "qk_nope_head_dim": 8},
    {"attention": "mla", "num_key_value_heads": 4, "qk_nope_head_dim": 8, "q_lora_rank": 24},
])
def test_activation_bytes_equal_what_autograd_saves(tiny_config, precision, checkpointing, overrides):
    B, S = 3, 20
    config = tiny_config(**{"capacity_factor": 1.25, **overrides})
    torch.manual_seed(0)
    model = MoeForCausalLM(config).to(torch.float32 if precision == "fp32" else torch.bfloat16).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(0, config.vocab_size, (B, S))
    planned = activation_memory(config, B, S, precision)
    expected = planned.saved_checkpointed if checkpointing else planned.saved
    # Within a few scalars (losses, counts) the plan leaves out.
    assert saved_tensor_bytes(model, input_ids) == pytest.approx(expected, abs=64)


def test_capacity_is_deepspeeds(tiny_config):
    for tokens in (1, 7, 60, 128, 1000, 4096):
        for factor in (0.1, 1.0, 1.1, 1.25, 2.0):
            for k, experts, min_capacity in ((1, 4, 4), (2, 8, 4), (4, 16, 0), (2, 64, 8)):
                config = tiny_config(num_experts=experts, num_experts_per_tok=k, capacity_factor=factor,
                                     min_capacity=min_capacity)
                gates = torch.empty(tokens, experts)
                # The model caps min_capacity at the token count before DeepSpeed's gate sees it.
                expected = int(_capacity(gates, torch.tensor(factor * k), torch.tensor(min(min_capacity, tokens))))
                assert expert_capacity(config, tokens) == expected, (tokens, factor, k, experts)
    assert expert_capacity(tiny_config(drop_tokens=False), 100) == 100  # dropless: the busiest expert, at most T


def test_zero_partitions_are_deepspeeds():
    numels = (1000, 7, 4096, 333, 1, 64 * 64)
    group = OptimizerGroup(numels, is_expert=False)
    tensors = [torch.empty(n, device="meta") for n in numels]
    for dp in (1, 2, 3, 4, 8):
        flat = zero_flat_numel(group.numel, dp)
        assert flat % (2 * dp) == 0 and 0 <= flat - group.numel < 2 * dp
        size = flat // dp
        for partition_id in range(dp):
            # DeepSpeed's own bookkeeping: which parameters' gradients a ZeRO-2 rank keeps.
            in_partition, _, _ = DeepSpeedZeroOptimizer.get_partition_info(None, tensors, size, partition_id)
            assert zero2_grad_numel(group, dp, partition_id) == sum(t.numel() for t in in_partition)


def test_optimizer_groups_come_from_the_recipes_param_groups():
    recipe = load_recipe(["parallel.ep_size=2"], world_size=2)
    groups = optimizer_groups(recipe.model, recipe.config.parallel.ep_size, recipe.config.optim.weight_decay)
    torch.manual_seed(0)
    full = MoeForCausalLM(load_recipe([], world_size=1).model)  # ep_size=1: every expert
    dense = sum(p.numel() for n, p in full.named_parameters() if "deepspeed_experts" not in n)
    expert = sum(p.numel() for n, p in full.named_parameters() if "deepspeed_experts" in n)
    assert sum(g.numel for g in groups if not g.is_expert) == dense
    assert sum(g.numel for g in groups if g.is_expert) == expert // 2  # half the experts per rank at ep_size=2


def test_known_model_sizes():
    cfg = load_recipe(["model=mixtral_8x7b", "parallel.ep_size=8", "zero=stage2", "data.seq_len=4096",
                       "trainer.micro_batch_size=1", "trainer.activation_checkpointing=true"], world_size=32).config
    plan = build_plan(cfg, ClusterSpec.from_preset("h100", nodes=4))
    assert 46e9 < plan.total_params < 47.5e9  # Mixtral-8x7B: 46.7B
    assert plan.memory.num_params.expert * 8 == plan.expert_params_total
    b = DTYPE_BYTES["bf16"]
    # ZeRO-2: bf16 parameters whole, fp32 master and Adam states split over DP (dense: 32 ranks, experts: 4).
    assert plan.memory.params.total == pytest.approx(b * plan.memory.num_params.total, rel=1e-6)
    assert plan.memory.optimizer_states.dense == pytest.approx(8 * plan.memory.num_params.dense / 32, rel=1e-4)
    assert plan.memory.optimizer_states.expert == pytest.approx(8 * plan.memory.num_params.expert / 4, rel=1e-4)
    # The EP formula: E x C x D x b per call, C = 4096 / 8 * 1.25 * 2 = 1280 slots per expert.
    assert plan.comm.capacity == 1280
    assert plan.comm.all_to_all_buffer == 8 * 1280 * 4096 * b
    assert plan.comm.all_to_all_total == 32 * 6 * plan.comm.all_to_all_buffer  # 32 MoE layers, 6 calls with recompute
    assert plan.fits


def test_checkpointing_trades_memory_for_all_to_all():
    cfg_off = load_recipe(["model=small", "parallel.ep_size=8", "data.seq_len=1024"], world_size=8).config
    cfg_on = load_recipe(["model=small", "parallel.ep_size=8", "data.seq_len=1024",
                          "trainer.activation_checkpointing=true"], world_size=8).config
    cluster = ClusterSpec.from_preset("h100")
    off, on = build_plan(cfg_off, cluster), build_plan(cfg_on, cluster)
    assert on.activations.saved_checkpointed < off.activations.saved / 3
    assert on.peak_bytes < off.peak_bytes and on.peak_bytes == off.peak_bytes_other
    assert on.comm.all_to_all_total == off.comm.all_to_all_total * 6 // 4


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_command_reports_a_fitting_layout(capsys):
    code, out, _ = run_main(capsys, "+experiment=small_ep8", "--gpus-per-node", "8", "--gpu", "h100")
    assert code == EXIT_FITS
    for text in ("Memory per GPU", "optimizer states", "expert buffers", "all-to-all per MoE layer",
                 "gradient reduction", "tokens/s", "fits"):
        assert text in out, text


def test_command_json(capsys):
    code, out, _ = run_main(capsys, "model=small", "parallel.ep_size=4", "zero=stage1", "--gpus-per-node", "4",
                            "--gpu", "a100-80gb", "--json")
    plan = json.loads(out)
    assert code == EXIT_FITS and plan["valid"] and plan["fits"]
    assert plan["world_size"] == 4 and plan["ep_size"] == 4 and plan["zero_stage"] == 1
    assert plan["memory"]["params"]["expert"] > 0 and plan["comm"]["all_to_all_total"] > 0
    assert plan["cluster"]["memory_gib"] == 80.0


def test_json_is_alone_on_stdout():
    """DeepSpeed logs to stdout when first imported (e.g. on a host without a GPU): the command keeps it off."""
    proc = subprocess.run([sys.executable, "-m", "moe_recipe.plan", "model=small", "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == EXIT_FITS, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["fits"]


def test_layout_that_does_not_fit_exits_1_with_fixes_that_fit(capsys):
    overrides = ["model=mixtral_8x7b", "parallel.ep_size=8", "data.seq_len=4096", "trainer.micro_batch_size=1"]
    code, out, _ = run_main(capsys, *overrides, "--nodes", "4", "--json")
    plan = json.loads(out)
    assert code == EXIT_DOES_NOT_FIT and not plan["fits"] and plan["fixes"]
    for fix in plan["fixes"]:  # every suggested fix, applied as the user would, fits
        cfg = load_recipe(overrides + fix, world_size=32).config
        assert build_plan(cfg, ClusterSpec.from_preset("h100", nodes=4)).fits, fix
    code, out, _ = run_main(capsys, *overrides, "--nodes", "4")
    assert "DOES NOT FIT" in out and "Fixes, one per line" in out


@pytest.mark.parametrize("args, message", [
    (["parallel.ep_size=3", "--gpus-per-node", "3"], "num_experts=8 is not divisible by ep_size=3"),
    (["parallel.ep_size=4", "--gpus-per-node", "2"], "does not divide the world size 2"),
    (["zero.stage=3"], "zero.stage=3 is not supported"),
    (["--gpu", "tpu"], "--gpu 'tpu' is not a preset"),
    (["model=nope"], "Could not find 'model/nope'"),  # Hydra's errors are invalid configurations too
    (["trainer.no_such_key=1"], "trainer.no_such_key is not a setting"),  # the schema's words, not Hydra's
])
def test_invalid_layouts_exit_2_with_the_fix(capsys, args, message):
    code, _, err = run_main(capsys, *args)
    assert code == EXIT_INVALID and message in err and "Invalid configuration" in err


def test_autoep_is_not_modeled(capsys):
    code, _, err = run_main(capsys, "model.moe_backend=autoep", "model.drop_tokens=false", "parallel.ep_size=2")
    assert code == EXIT_NOT_MODELED and "not modeled" in err


def test_ep_group_across_nodes_is_flagged():
    cfg = load_recipe(["model=olmoe_1b_7b", "parallel.ep_size=16", "zero=stage2",
                       "trainer.activation_checkpointing=true"], world_size=16).config
    plan = build_plan(cfg, ClusterSpec.from_preset("h100", nodes=2, gpus_per_node=8))
    assert plan.comm.ep_peers_other_nodes == 8 and plan.comm.ep_peers_same_node == 7
    assert any("network speed" in w for w in plan.warnings)


def test_gpu_auto_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        assert ClusterSpec.from_preset("auto").memory_gib > 10
    else:
        code, _, err = run_main(capsys, "--gpu", "auto")
        assert code == EXIT_INVALID and "no GPU visible here" in err


def test_overrides_work_anywhere_on_the_command_line(capsys):
    first = run_main(capsys, "model=tiny", "parallel.ep_size=2", "zero=stage1", "--gpu", "a100-80gb", "--json")
    mixed = run_main(capsys, "model=tiny", "--gpu", "a100-80gb", "parallel.ep_size=2", "--json", "zero=stage1")
    assert first[0] == mixed[0] == EXIT_FITS
    plan = json.loads(mixed[1])
    assert plan["ep_size"] == 2 and plan["zero_stage"] == 1 and plan["cluster"]["gpu"] == "a100-80gb"
    assert plan == json.loads(first[1])


@pytest.mark.parametrize("args", [["--no-such-option"], ["--nodes", "two"], ["--gpu"]])
def test_usage_errors_exit_64(args):
    """Not 2, which says "invalid configuration" (argparse's own code); run as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "moe_recipe.plan", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == EXIT_USAGE, proc.stderr[-2000:]
    assert "moe-plan: error:" in proc.stderr and proc.stdout == ""


def test_help_documents_every_exit_status(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    documented = {int(code) for code in re.findall(r"^\s+(\d+)\s+\S", capsys.readouterr().out.split("exit status:")[1],
                                                   flags=re.MULTILINE)}
    assert documented == {EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_INVALID, EXIT_NOT_MODELED, EXIT_USAGE}


def test_human_units():
    assert [format_count(n) for n in (512, 943_104, 1_610_612_736, 46_702_792_704)] == ["512", "943K", "1.61B",
                                                                                         "46.7B"]
    assert [format_bytes(n) for n in (512, 1536, 3 * 2**30)] == ["512 B", "1.50 KiB", "3.00 GiB"]


def test_tiny_model_report_in_readable_units(capsys):
    code, out, _ = run_main(capsys, "model=tiny", "--json")
    plan = json.loads(out)
    code, out, _ = run_main(capsys, "model=tiny")
    assert code == EXIT_FITS
    params_line = next(line for line in out.splitlines() if line.startswith("Parameters:"))
    assert params_line.startswith(f"Parameters: {format_count(plan['total_params'])} total, ")
    assert f"{format_count(plan['expert_params_total'])} in experts" in params_line
    # Every figure is at least 1 of its unit: no "0.000 B in experts", no "0.00 GiB".
    figures = re.findall(r"(\d+(?:\.\d+)?) ?(KiB|MiB|GiB|TiB|[KMBT]\b)", out)
    assert figures and all(float(value) >= 1 for value, _ in figures), figures


def test_active_params_per_token_are_what_a_token_passes_through(capsys):
    overrides = ["model=tiny", "model.num_shared_experts=1", "model.first_k_dense_replace=1",
                 "model.num_hidden_layers=3"]
    code, out, _ = run_main(capsys, *overrides, "--json")
    planned = json.loads(out)["active_params_per_token"]
    # Counted on the real model: every weight a token's matmuls use; of the routed experts, k of E.
    config = load_recipe(overrides, world_size=1).model
    expected = 0.0
    for name, p in MoeForCausalLM(config).named_parameters():
        if "embed_tokens" in name or "norm" in name:  # a lookup and elementwise scales, no matmul
            continue
        share = config.num_experts_per_tok / config.num_experts if "deepspeed_experts" in name else 1
        expected += p.numel() * share
    assert planned == expected
    code, out, _ = run_main(capsys, *overrides)
    assert f"{format_count(expected)} active per token" in out


@pytest.mark.parametrize("attention", [
    {"model.qk_norm": "true"},
    {"model.attention": "mla", "model.num_key_value_heads": "4"},
    {"model.attention": "mla", "model.num_key_value_heads": "4", "model.q_lora_rank": "24", "model.v_head_dim": "8"},
])
def test_planned_parameters_are_the_real_models_with_either_attention(capsys, attention):
    """Total parameters (from the model built on the meta device) and the active ones (flops.py's formula) against
    the real tiny model, and MLA's attention FLOPs: the score and value dims per head."""
    overrides = ["model=tiny", "model.first_k_dense_replace=1", "model.num_hidden_layers=3",
                 *(f"{key}={value}" for key, value in attention.items())]
    plan = json.loads(run_main(capsys, *overrides, "--json")[1])
    config = load_recipe(overrides, world_size=1).model
    model = MoeForCausalLM(config)
    assert plan["total_params"] == sum(p.numel() for p in model.parameters())
    expected = sum(p.numel() * (config.num_experts_per_tok / config.num_experts if "deepspeed_experts" in name else 1)
                   for name, p in model.named_parameters() if "embed_tokens" not in name and "norm" not in name)
    assert plan["active_params_per_token"] == expected
    dims = (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim if config.attention == "mla"
            else 2 * config.head_dim)
    assert flops_per_token(config, 64) == 6 * expected + 6 * 3 * config.num_attention_heads * dims * 64


def test_fixes_are_listed_one_per_line(capsys):
    # 0.05 GiB: the tiny model's 46.5 MiB peak misses 46.1 MiB usable; several single changes fix it.
    args = ["model=tiny", "--gpu-memory-gib", "0.05"]
    code, out, _ = run_main(capsys, *args, "--json")
    fixes = json.loads(out)["fixes"]
    assert code == EXIT_DOES_NOT_FIT and len(fixes) > 1
    code, out, _ = run_main(capsys, *args)
    listed = out.split("Fixes, one per line")[1].splitlines()[1:]
    assert listed == [f"  {' '.join(fix)}" for fix in fixes]
    for fix in fixes:
        assert run_main(capsys, *args, *fix)[0] == EXIT_FITS, fix



@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_every_shipped_model_is_planned(model):
    cfg = load_recipe([f"model={model}", "parallel.ep_size=8", "zero=stage2", "trainer.micro_batch_size=1",
                       "data.seq_len=256", "trainer.activation_checkpointing=true"], world_size=64).config
    plan = build_plan(cfg, ClusterSpec.from_preset("h100", nodes=8))
    assert plan.total_params > 0 and plan.comm.all_to_all_total > 0 and plan.comm.token_dispatch is not None


def test_deepseek_v3_and_qwen3_sizes():
    def plan(model: str):
        cfg = load_recipe([f"model={model}", "parallel.ep_size=8", "zero=stage2"], world_size=64).config
        return build_plan(cfg, ClusterSpec.from_preset("h100", nodes=8))

    v3 = plan("deepseek_v3")  # DeepSeek-V3's report: 671B total, 37B active (with MLA; the MTP module not counted)
    assert 670.5e9 < v3.total_params < 671.5e9 and 36.5e9 < v3.active_params_per_token < 37.5e9
    qwen3 = plan("qwen3_moe")  # Qwen3-30B-A3B: 30.5B total, 3.3B active with the embeddings (0.31B) counted
    assert 30e9 < qwen3.total_params < 31e9 and 2.9e9 < qwen3.active_params_per_token < 3.1e9


def test_destination_ranks_hand_computed():
    """E = 8 experts, k = 2. Plain top-k at G = 4 ranks of 2 experts: a rank is missed by C(6,2)/C(8,2) = 15/28
    of the tokens, so 4 x 13/28 = 13/7 ranks per token."""
    assert expected_destination_ranks(8, 2, 4) == pytest.approx(13 / 7)
    assert expected_destination_ranks(8, 2, 2) == pytest.approx(2 * (1 - 6 / 28))
    # Groups = ranks (4 groups of 2), one group per token: both experts on one rank.
    assert expected_destination_ranks(8, 2, 4, n_group=4, topk_group=1) == pytest.approx(1.0)
    # Groups = ranks, two groups per token: a rank is missed if its group is not eligible (1/2) or, eligible, its 2
    # experts are not among the 2 of 4 eligible ones (1/6): 4 x (1 - 1/2 - 1/12) = 5/3.
    assert expected_destination_ranks(8, 2, 4, n_group=4, topk_group=2) == pytest.approx(5 / 3)
    # A group spans 2 ranks (2 groups of 4 at G = 4), one group per token: the same 1/2 and 1/6.
    assert expected_destination_ranks(8, 2, 4, n_group=2, topk_group=1) == pytest.approx(5 / 3)
    # Two groups per rank (4 groups of 2 at G = 2), two groups per token: a rank has 0, 1 or 2 of its groups
    # eligible with probability 1/6, 4/6, 1/6 and is then missed with probability 1, 1/6, 0: 2 x (1 - 10/36) = 13/9.
    assert expected_destination_ranks(8, 2, 2, n_group=4, topk_group=2) == pytest.approx(13 / 9)
    # Every group eligible is plain top-k; groups that straddle ranks are not modeled.
    assert expected_destination_ranks(8, 2, 4, n_group=4, topk_group=4) == pytest.approx(13 / 7)
    assert expected_destination_ranks(12, 2, 4, n_group=3, topk_group=1) is None
    # The bounds: k, G, and the ranks topk_group groups cover (12 experts on 4 ranks of 3, groups of 4 span 2 ranks).
    assert max_destination_ranks(8, 2, 4) == 2 and max_destination_ranks(256, 8, 8) == 8
    assert max_destination_ranks(8, 2, 4, n_group=4, topk_group=1) == 1
    assert max_destination_ranks(256, 8, 8, n_group=8, topk_group=4) == 4  # DeepSeek-V3, one group per rank
    assert max_destination_ranks(12, 4, 4, n_group=3, topk_group=1) == 2
    assert max_destination_ranks(64, 8, 16, n_group=4, topk_group=1) == 4  # a group spans 4 ranks


def test_destination_ranks_follow_the_models_routing():
    """The plain formula is what route_tokens does with random logits (the top-k of i.i.d. scores is a uniform
    k-subset); with the group limit no token exceeds the bound, and some reach it."""
    torch.manual_seed(0)
    E, k, G, T = 8, 2, 4, 20_000
    logits_TE = torch.randn(T, E)
    ranks = lambda experts_Tk: torch.zeros(T, G).scatter_(1, experts_Tk // (E // G), 1).sum(1)  # noqa: E731
    plain = route_tokens(logits_TE, MoeConfig(num_experts=E, num_experts_per_tok=k)).experts_Tk
    assert ranks(plain).mean().item() == pytest.approx(expected_destination_ranks(E, k, G), abs=0.02)
    for n_group, topk_group in ((4, 1), (4, 2), (2, 1)):
        config = MoeConfig(num_experts=E, num_experts_per_tok=k, router_n_group=n_group, router_topk_group=topk_group,
                           router_score_func="sigmoid")
        reached = ranks(route_tokens(logits_TE, config).experts_Tk)
        assert reached.max().item() == max_destination_ranks(E, k, G, n_group, topk_group)


def test_plan_counts_the_dispatch_volume_group_limits_save(capsys):
    """tiny at EP 4: T = 4 x 128 = 512 tokens per rank, D = 64, bf16, 4 all-to-alls per MoE layer, 2 MoE layers."""
    overrides = ["model=tiny", "parallel.ep_size=4", "model.router.n_group=4", "model.router.topk_group=2"]
    plan = build_plan(load_recipe(overrides, world_size=4).config, ClusterSpec.from_preset("h100", gpus_per_node=4))
    dispatch = plan.comm.token_dispatch
    per_rank_reached = 512 * 64 * 2 * 4 * 2
    assert dispatch.bytes_per_step == pytest.approx(13 / 7 * per_rank_reached)
    assert dispatch.bytes_per_step_limited == pytest.approx(5 / 3 * per_rank_reached)
    assert dispatch.saving == pytest.approx(1 - (5 / 3) / (13 / 7))  # 4/39
    assert dispatch.max_ranks == 2 and dispatch.max_ranks_limited == 2
    code, out, _ = run_main(capsys, *overrides, "--gpus-per-node", "4")
    assert code == EXIT_FITS and "1.67 on average" in out and "10% less" in out
    assert "does not shrink it" in out
    code, out, _ = run_main(capsys, *overrides, "--gpus-per-node", "4", "--json")
    assert json.loads(out)["comm"]["token_dispatch"]["saving"] == pytest.approx(4 / 39)
    # Groups that straddle ranks: a warning, the bound, no expected volume.
    code, out, _ = run_main(capsys, "model=tiny", "model.num_experts=12", "parallel.ep_size=4", "model.router.n_group=3",
                            "model.router.topk_group=1", "--gpus-per-node", "4")
    assert "groups straddle EP ranks" in out and "the expected volume is not modeled" in out
