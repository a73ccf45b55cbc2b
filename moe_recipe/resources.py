"""The files the commands need besides code: the Hydra config groups (conf/) and the default tokenizer.

In a clone, and an editable install of one, they are the repository's own `conf/` and `assets/tokenizer/`. A wheel
(`pip install .`) carries copies under `moe_recipe/_bundled/`, mapped there at build time (pyproject.toml,
`[tool.hatch.build.targets.wheel.force-include]`), so the installed `moe-train` and `moe-plan` work from any folder.
"""

from pathlib import Path

_BUNDLED = Path(__file__).resolve().parent / "_bundled"
_REPO = Path(__file__).resolve().parents[1]


def project_path(relative: str) -> Path:
    """`conf` or `assets/tokenizer`: the wheel's bundled copy when there is one, else the repository's folder."""
    return (_BUNDLED if _BUNDLED.is_dir() else _REPO) / relative


CONF_DIR = project_path("conf")

__all__ = ["CONF_DIR", "project_path"]
