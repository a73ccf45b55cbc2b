"""The export command turns a checkpoint trained at EP 2 into HF folders whose logits are the training model's.

One run of recipes/train.py (2 ranks, EP 2, ZeRO-1, a capacity small enough that training drops tokens) makes the
checkpoint; the training model's own eval logits come from the recipe's engine at that layout with the checkpoint
loaded (tests/distributed/resume_worker.py), which also trains a model that routes with the expert bias (DeepSeek-V3's
routing). The exports are then loaded here, in a process without DeepSpeed engine or process group, and (hf) in a
subprocess where neither moe_model nor DeepSpeed can be imported, through transformers' remote code.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from moe_model import MoeConfig, MoeForCausalLM
from moe_recipe.export import export, to_autoep
from moe_recipe.stock_export import mixtral_blockers
from tests.helpers import REPO, overrides, run_command, torchrun, train_rows

TRAIN = REPO / "recipes" / "train.py"
WORKER = REPO / "tests" / "distributed" / "resume_worker.py"
pytestmark = pytest.mark.e2e
STEPS = 6  # overrides() trains 6 steps; resume_worker.py, loading a step-6 checkpoint, trains no further
BIAS_ROUTING = {"router": {"balance": "none", "expert_bias": True, "score_func": "sigmoid", "norm_topk_prob": True,
                           "scaling_factor": 2.5, "n_group": 2, "topk_group": 1}, "router_aux_loss_coef": 0.0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict, Path, dict]:
    """(run folder, its eval logits, the expert-bias run folder, its eval logits)."""
    root = tmp_path_factory.mktemp("export")
    run_dir = root / "run"
    # Capacity 0.5 x the even share: training drops routes in every layer; eval and the exports never drop.
    torchrun(TRAIN, 2, overrides(run_dir, "parallel.ep_size=2", "zero=stage1", "model.capacity_factor=0.5"))
    assert all(row[f"routing/layer_{layer}/dropped_fraction"] > 0.1 for row in train_rows(run_dir).values()
               for layer in (0, 1))
    model = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    reload = {"run_dir": str(root / "reload"), "ep_size": 2, "zero_stage": 1, "model": model,
              "resume": str(run_dir / "checkpoints"), "logits": str(root / "logits.pt")}
    bias = {"run_dir": str(root / "bias"), "ep_size": 2, "zero_stage": 1, "model": BIAS_ROUTING,
            "logits": str(root / "bias_logits.pt")}
    torchrun(WORKER, 2, ["--jobs", json.dumps([reload, bias])])
    return run_dir, torch.load(root / "logits.pt"), root / "bias", torch.load(root / "bias_logits.pt")


MODEL_CODE = {"configuration_moe.py", "modeling_moe.py", "moe_blocks.py", "routing.py"}
# Run in a subprocess: transformers and torch only. sys.modules[name] = None makes `import name` fail and
# importlib.util.find_spec(name) answer None, as where the package is not installed (transformers asks find_spec).
LOAD_WITHOUT_THE_PROJECT = """
import sys
for name in ("moe_model", "moe_recipe", "deepspeed"):
    sys.modules[name] = None
import torch
from transformers import AutoModelForCausalLM

results = {}
for folder, input_ids in torch.load(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    tokens = model.generate(input_ids[:, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
    results[folder] = {"logits": logits, "tokens": tokens}
results["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("moe_model", "moe_recipe", "deepspeed")
                             and sys.modules[m] is not None)
torch.save(results, sys.argv[2])
"""


def assert_pickle_free(folder: Path) -> None:
    for file in folder.iterdir():
        assert file.suffix in (".json", ".safetensors", ".py"), file
        head = file.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{file} looks like a pickle / torch.save archive"


def test_hf_export_loads_without_deepspeed_and_gives_the_training_logits(trained, tmp_path):
    run_dir, reference, _, _ = trained
    out = tmp_path / "hf"
    proc = run_command([sys.executable, "-m", "moe_recipe.export", str(run_dir), str(out)])
    assert f"step_{STEPS:08d}" in proc.stdout
    assert_pickle_free(out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", *MODEL_CODE} <= {
        f.name for f in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepspeed_moe" and "ep_size" not in config and config["num_experts"] == 8
    assert config["auto_map"] == {"AutoConfig": "configuration_moe.MoeConfig", "AutoModel": "modeling_moe.MoeModel",
                                  "AutoModelForCausalLM": "modeling_moe.MoeForCausalLM"}
    assert config["moe_backend"] == "autoep" and not config["drop_tokens"]  # the block that needs no DeepSpeed

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not dist.is_initialized()
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"]).logits
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)


def test_hf_export_carries_the_expert_bias(trained, tmp_path):
    """from_pretrained routes with the trained bias: without it (a zero bias) the logits differ."""
    _, _, bias_run, reference = trained
    out = tmp_path / "hf-bias"
    export(bias_run, out, tokenizer=REPO / "assets" / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    bias_LE = model.expert_bias()
    assert bias_LE.shape == (2, 4) and bias_LE.abs().max() > 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as reader:
        assert reader.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"]).logits
        torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)
        for layer in model.moe_layers():
            layer.expert_bias_owner().e_score_correction_bias.zero_()
        assert not torch.allclose(model(input_ids=reference["input_ids"]).logits, reference["logits"], atol=1e-3)
    with pytest.raises(ValueError, match="the expert bias"):
        export(bias_run, tmp_path / "mixtral-bias", fmt="mixtral", tokenizer=REPO / "assets" / "tokenizer")


def test_hf_export_runs_with_transformers_and_torch_alone(trained, tmp_path):
    """Both exports (softmax top-2; sigmoid, groups, scaling and the expert bias) load through trust_remote_code in a
    process where moe_model and DeepSpeed cannot be imported: the training model's logits within 1e-4 (fp32), and
    generate() (with the KV cache) gives the tokens of the project's model."""
    run_dir, reference, bias_run, bias_reference = trained
    exports = {tmp_path / "hf": (run_dir, reference), tmp_path / "hf-bias": (bias_run, bias_reference)}
    for out, (run, _) in exports.items():
        export(run, out, tokenizer=REPO / "assets" / "tokenizer")
    torch.save({str(out): ref["input_ids"] for out, (_, ref) in exports.items()}, tmp_path / "inputs.pt")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")  # where transformers copies the remote code
    run_command([sys.executable, "-c", LOAD_WITHOUT_THE_PROJECT, str(tmp_path / "inputs.pt"),
                 str(tmp_path / "results.pt")], cwd=tmp_path, env=env)
    results = torch.load(tmp_path / "results.pt")
    assert results.pop("imported") == []
    for out, (_, ref) in exports.items():
        remote = results[str(out)]
        assert (remote["logits"] - ref["logits"]).abs().max() < 1e-4
        project = AutoModelForCausalLM.from_pretrained(out).eval()  # moe_model's own code, imported here
        tokens = project.generate(ref["input_ids"][:, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(remote["tokens"], tokens)
    assert {path.name for path in (tmp_path / "hf_modules").rglob("*.py")} >= MODEL_CODE


@pytest.mark.parametrize("overrides", [
    {},
    {"num_shared_experts": 1, "first_k_dense_replace": 1, "num_hidden_layers": 3},
    {"num_experts_per_tok": 1, "noisy_gate_policy": "RSample"},
    {"router_balance": "sequence", "router_expert_bias": True, "router_score_func": "sigmoid", "router_n_group": 2,
     "router_topk_group": 1, "router_scaling_factor": 2.5},
], ids=["top2", "shared-dense", "top1-noisy", "bias-groups"])
def test_the_autoep_layout_computes_the_native_model(tiny_model, overrides):
    """What --format hf writes: the native weights in the autoep block's layout load strictly into the autoep model,
    which gives the native model's logits (in eval: no drops, no noise)."""
    native = tiny_model(initializer_range=0.2, **overrides)
    if native.config.uses_expert_bias:
        for layer in native.moe_layers():
            layer.expert_bias_owner().e_score_correction_bias.normal_(0, 0.1)
    config, weights = to_autoep(native.config, native.state_dict())
    assert config.moe_backend == "autoep" and config.noisy_gate_policy is None and not config.drop_tokens
    autoep = MoeForCausalLM(config).eval()
    autoep.load_state_dict(weights, strict=True)
    input_ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(autoep(input_ids).logits, native(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_mixtral_export_gives_the_training_logits(trained, tmp_path):
    """Trained with drops (capacity 0.5): Mixtral, which never drops, matches the training model's eval logits."""
    run_dir, reference, _, _ = trained
    out = tmp_path / "mixtral"
    export(run_dir / "checkpoints" / f"step_{STEPS:08d}", out, fmt="mixtral")
    assert_pickle_free(out)
    model = MixtralForCausalLM.from_pretrained(out).eval()
    assert model.config.num_local_experts == 8 and model.config.num_experts_per_tok == 2
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"]).logits
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-4, atol=1e-4)
    # bf16 weights: half the size, same model up to bf16 rounding.
    half = tmp_path / "mixtral-bf16"
    export(run_dir, half, fmt="mixtral", dtype="bfloat16")
    assert (half / "model.safetensors").stat().st_size < 0.6 * (out / "model.safetensors").stat().st_size


def test_export_refuses_a_non_empty_folder_and_a_missing_checkpoint(trained, tmp_path):
    run_dir, _, _, _ = trained
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    proc = run_command([sys.executable, "-m", "moe_recipe.export", str(run_dir), str(tmp_path / "taken")], check=False)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="no complete checkpoint there"):
        export(tmp_path / "nowhere", tmp_path / "out")


@pytest.mark.parametrize("fmt, reason", [
    ("qwen3_moe", "qk_norm=False (Qwen3-MoE normalises each head of q and k"),
    ("qwen2_moe", "no shared expert (Qwen2-MoE always has one"),
    ("deepseek_v3", "attention='gqa' (DeepSeek-V3 has Multi-head Latent Attention"),
])
def test_stock_formats_the_model_does_not_fit_are_refused_with_the_reason(trained, tmp_path, fmt, reason):
    """The tiny model (GQA without q/k norm, no shared expert) is a Mixtral only; the other formats say why not,
    as every refused input does (exit 2, one line, nothing written). tests/unit/test_stock_export.py checks their
    logits on the models they fit."""
    run_dir, _, _, _ = trained
    proc = run_command([sys.executable, "-m", "moe_recipe.export", str(run_dir), str(tmp_path / fmt), "--format", fmt],
                       check=False)
    assert proc.returncode == 2 and reason in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize(
    "overrides, blocker",
    [
        ({"num_shared_experts": 1}, "shared experts"),
        ({"use_residual": True}, "residual MoE"),
        ({"first_k_dense_replace": 1}, "dense layers"),
        ({"num_experts_per_tok": 1}, "top-1 routing"),
        ({"router_score_func": "sigmoid"}, "router_score_func='sigmoid'"),
        ({"router_balance": "sequence", "router_expert_bias": True}, "the expert bias (router_expert_bias=True"),
        ({"router_n_group": 2, "router_topk_group": 1}, "group-limited routing (router_n_group=2"),
        ({"router_scaling_factor": 2.5}, "router_scaling_factor=2.5"),
        ({"router_norm_topk_prob": False}, "router_norm_topk_prob=false"),
    ],
)
def test_mixtral_format_needs_mixtral_architecture(overrides, blocker):
    assert mixtral_blockers(MoeConfig(num_experts=4)) == []
    # Mixtral's top-1 divides the weight by itself (1.0): the same as router_norm_topk_prob=true.
    assert mixtral_blockers(MoeConfig(num_experts=4, num_experts_per_tok=1, router_norm_topk_prob=True)) == []
    assert any(blocker in b for b in mixtral_blockers(MoeConfig(num_experts=4, **overrides)))
