"""Routing insight as a user meets it: the heatmaps a training run writes (files and W&B), and the analysis command
on an exported model folder and on a training checkpoint."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from moe_model import MoeForCausalLM
from moe_model.routing import route_tokens
from moe_recipe import analyze_routing
from moe_recipe.recipe import load_recipe
from moe_recipe.export import export
from moe_recipe.metrics import read_metrics
from tests.helpers import REPO, run_command
from tests.wandb_records import history_and_config

pytestmark = pytest.mark.e2e
TEXT = ("def add(x, y):\n    return x + y\n\nThe for statement is used to iterate over the elements of a sequence "
        "(such as a string, tuple or list) or other iterable object.")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Four steps of the default tiny run, one process, W&B offline, a heatmap every 2 steps."""
    run_dir = tmp_path_factory.mktemp("routing") / "run"
    run_command([sys.executable, str(REPO / "recipes" / "train.py"), f"trainer.run_dir={run_dir}",
                 f"data.cache_dir={run_dir.parent / 'data-cache'}", "trainer.max_steps=4", "optim.warmup_steps=1",
                 "trainer.micro_batch_size=2", "trainer.log_interval=1", "trainer.eval_interval=100",
                 "trainer.checkpoint_interval=100", "trainer.heatmap_interval=2", "logging=offline"])
    return run_dir


def test_training_writes_expert_load_heatmaps(run_dir):
    routing = run_dir / "routing"
    assert sorted(p.name for p in routing.iterdir()) == [
        "expert_load_step_00000002.json", "expert_load_step_00000002.png",
        "expert_load_step_00000004.json", "expert_load_step_00000004.png",
    ]
    snapshot = json.loads((routing / "expert_load_step_00000004.json").read_text())
    assert snapshot["layers"] == [0, 1] and len(snapshot["received_share"][0]) == 8
    for row in snapshot["received_share"] + snapshot["demand_share"]:
        assert sum(row) == pytest.approx(1.0)
    assert all(0.0 <= d < 1.0 for d in snapshot["dropped_fraction"])
    rows = read_metrics(run_dir)
    assert all(row["routing/layer_1/max_demand"] >= 1.0 for row in rows if "train/loss" in row)

    history, _ = history_and_config(run_dir)
    images = {row["_step"]: row for row in history if "routing/expert_load/_type" in row}
    assert sorted(images) == [2, 4]
    assert all(row["routing/expert_load/_type"] == "image-file" for row in images.values())


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A model folder as an export writes it: weights, config and tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "model"
    recipe = load_recipe([], world_size=1)
    torch.manual_seed(0)
    MoeForCausalLM(recipe.model).save_pretrained(folder)
    recipe.tokenizer.save_pretrained(folder)
    return folder


def test_analysis_command_on_a_model_folder(hf_folder, tmp_path):
    out = tmp_path / "analysis"
    proc = run_command([sys.executable, "-m", "moe_recipe.analyze_routing", str(hf_folder), "--text", TEXT,
                        "--out", str(out)])
    assert "Consecutive tokens with the same expert" in proc.stdout and "chance: first choice 12.5%" in proc.stdout
    assert "MoE layer 1" in proc.stdout and "expert   0" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["routing_layers.png", "routing_summary.json",
                                                     "routing_tokens.csv", "routing_tokens.png"]
    summary = json.loads((out / "routing_summary.json").read_text())
    tokens = summary["num_tokens"]
    assert tokens > 20 and len(summary["layers"]) == 2 and summary["top_k"] == 2
    for layer in summary["layers"]:
        assert sum(layer["expert_share"]) == pytest.approx(1.0)
        assert 0.0 <= layer["repeat_first_choice"] <= layer["repeat_any_choice"] <= 1.0
    with (out / "routing_tokens.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["position", "token", "moe_layer_0", "moe_layer_1"] and len(rows) == tokens + 1
    assert rows[1][:2] == ["0", "def"] and len(rows[1][2].split()) == 2  # top-2 experts per layer
    assert (out / "routing_tokens.png").read_bytes().startswith(b"\x89PNG")


def test_analysis_routes_as_the_model_does(hf_folder):
    """The table's choices are the top-k of the router logits the model computes for each token."""
    model, tokenizer, _ = analyze_routing.load(hf_folder)
    input_ids = torch.tensor(tokenizer(TEXT)["input_ids"])
    experts_LTk = analyze_routing.route_tokens(model, input_ids)
    gate = model.model.layers[1].mlp.router_weight
    hidden = {}
    handle = model.model.layers[1].post_attention_layernorm.register_forward_hook(
        lambda module, args, output: hidden.setdefault("x", output))
    model(input_ids=input_ids[None])
    handle.remove()
    logits_TE = hidden["x"][0].float() @ gate.float().T
    torch.testing.assert_close(experts_LTk[1], logits_TE.topk(2, dim=-1).indices)


@pytest.fixture(scope="module")
def deepseek_v3_folder(tmp_path_factory) -> Path:
    """A tiny model with DeepSeek-V3's routing (sigmoid scores, 2 groups of 4 experts, 1 group per token, scaling,
    the expert bias), its bias set as training would have moved it."""
    folder = tmp_path_factory.mktemp("hf-v3") / "model"
    recipe = load_recipe(["model.router.balance=sequence", "model.router.expert_bias=true",
                          "model.router.score_func=sigmoid", "model.router.norm_topk_prob=true",
                          "model.router.scaling_factor=2.5", "model.router.n_group=2", "model.router.topk_group=1"],
                         world_size=1)
    torch.manual_seed(0)
    model = MoeForCausalLM(recipe.model)
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.expert_bias_owner().e_score_correction_bias.copy_(torch.randn(8) * 0.05)
    model.save_pretrained(folder)
    recipe.tokenizer.save_pretrained(folder)
    return folder


def test_analysis_routes_with_the_bias_and_the_group_limit(deepseek_v3_folder, capsys):
    model, tokenizer, _ = analyze_routing.load(deepseek_v3_folder)
    assert model.expert_bias().abs().max() > 0  # the folder's bias, not a fresh zero one
    input_ids = torch.tensor(tokenizer(TEXT)["input_ids"])
    experts_LTk = analyze_routing.route_tokens(model, input_ids)
    logits = {}  # each MoE layer's router logits, from its input as the model computes it

    def keep_logits(i: int, layer):
        def hook(module, args, output) -> None:
            logits[i] = output[0].float() @ layer.mlp.router_weight.float().T
        return hook

    for i, layer in enumerate(model.moe_layers()):
        layer.post_attention_layernorm.register_forward_hook(keep_logits(i, layer))
    model(input_ids=input_ids[None])
    for i, layer in enumerate(model.moe_layers()):
        bias_E = layer.expert_bias_owner().e_score_correction_bias
        torch.testing.assert_close(experts_LTk[i], route_tokens(logits[i], model.config, bias_E).experts_Tk)
        assert not torch.equal(experts_LTk[i], route_tokens(logits[i], model.config).experts_Tk)  # the bias counts
        assert torch.equal(experts_LTk[i][:, 0] // 4, experts_LTk[i][:, 1] // 4)  # both in the token's one group
    assert analyze_routing.main([str(deepseek_v3_folder), "--text", TEXT]) == analyze_routing.EXIT_OK
    assert "8 experts, top-2" in capsys.readouterr().out


def test_analysis_reads_the_training_checkpoint_and_its_export_alike(run_dir, tmp_path, capsys):
    # A run folder: its newest checkpoint, read like the export command reads it, with the run's tokenizer.
    assert analyze_routing.main([str(run_dir), "--text", TEXT]) == analyze_routing.EXIT_OK
    assert f"model: {run_dir / 'checkpoints' / 'step_00000004'}" in capsys.readouterr().out
    export(run_dir, tmp_path / "export")
    from_checkpoint, tokenizer, _ = analyze_routing.load(run_dir)
    from_export, _, _ = analyze_routing.load(tmp_path / "export")
    input_ids = torch.tensor(tokenizer(TEXT)["input_ids"])
    torch.testing.assert_close(analyze_routing.route_tokens(from_checkpoint, input_ids),
                               analyze_routing.route_tokens(from_export, input_ids))


def test_analysis_without_a_model_says_what_to_pass(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        analyze_routing.main([str(tmp_path), "--text", TEXT])
    assert exit_status.value.code == analyze_routing.EXIT_USAGE
    assert "no complete checkpoint there" in capsys.readouterr().err
