"""A non-editable install: build the wheel, install it into a fresh venv, run `moe-train` and `moe-plan` from an
empty folder. The project's own code, conf/ and default tokenizer must come from the wheel alone.

To stay fast the fresh venv borrows the heavy dependencies (torch, deepspeed, ...) from the test's own environment
through a .pth file; the wheel itself is installed with --no-deps.
"""

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest

from moe_recipe.metrics import read_metrics
from tests.helpers import REPO, process_env, run_command

pytestmark = pytest.mark.e2e

WHERE = """
import json, moe_model, moe_recipe, recipes
from moe_recipe.config import CONF_DIR
from moe_recipe.data import DataConfig, tokenizer_path
print(json.dumps({"modules": [moe_model.__file__, moe_recipe.__file__, recipes.__file__],
                  "conf": str(CONF_DIR), "tokenizer": str(tokenizer_path(DataConfig()))}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel; returns its bin/ folder."""
    root = tmp_path_factory.mktemp("install")
    run_command([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(REPO)],
                cwd=root)
    (wheel,) = (root / "dist").glob("moe_recipe-*.whl")
    venv = root / "venv"
    run_command([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    fresh_site = Path(run_command([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                  cwd=root).stdout.strip())
    # A plain path line: the test environment's packages, but not its own .pth files (its editable install).
    (fresh_site / "borrowed_dependencies.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    run_command([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                cwd=root)
    return venv / "bin"


def test_the_wheel_alone_provides_the_code_conf_and_tokenizer(installed, tmp_path):
    out = run_command([str(installed / "python"), "-c", WHERE], cwd=tmp_path).stdout
    where = json.loads(out.strip().splitlines()[-1])
    venv = installed.parent
    for path in [*where["modules"], where["conf"], where["tokenizer"]]:
        assert Path(path).is_relative_to(venv), path
        assert not Path(path).is_relative_to(REPO), path
    assert (Path(where["conf"]) / "config.yaml").is_file()
    assert (Path(where["tokenizer"]) / "tokenizer.json").is_file()


def test_moe_train_and_moe_plan_run_from_an_empty_folder(installed, tmp_path):
    env = process_env()
    run_command([str(installed / "moe-train"), "trainer.max_steps=3", "optim.warmup_steps=1",
                 "trainer.micro_batch_size=2", "trainer.log_interval=1", "trainer.eval_batches=1"],
                cwd=tmp_path, env=env)
    # Relative paths (trainer.run_dir, data.cache_dir) start at the working directory.
    run_dir = tmp_path / "runs" / "default"
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "step_00000003" / "checkpoint.json").is_file()
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / ".cache" / "data").is_dir()

    plan = subprocess.run([str(installed / "moe-plan"), "--gpu", "h100", "--gpus-per-node", "2",
                           "parallel.ep_size=2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "Memory per GPU" in plan.stdout
