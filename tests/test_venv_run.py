"""``scripts/venv-run`` called by two processes at once on a fresh machine: one builds, the other waits and reuses.

This runs the real script, copied into a throw-away project (a two-package ``requirements.lock`` and a minimal
``pyproject.toml``, so the editable install of "the project" is real too) against a throw-away venv cache
(``HARMONIZE_VENV_ROOT``): ``python3 -m venv`` and pip from the registry, as on a fresh machine. The project's own
venv is never touched. Marked slow because it needs the package registry (or pip's cache): 6 s here with a warm
pip cache, longer on a fresh machine.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# Small and pure Python, pinned as in the project's own lock (whose setuptools pin is what the editable install needs:
# the setuptools that python3 -m venv brings cannot build an editable wheel on its own).
LOCK = "six==1.17.0\nsetuptools==84.2.1\n"
PYPROJECT = """[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "venv-run-probe"
version = "0.0.1"

[tool.setuptools]
py-modules = ["probe"]
"""
PROBE = "import sys, six, probe; print(sys.prefix, six.__version__, probe.NAME)"


@pytest.fixture
def project(tmp_path):
    """A minimal project with a copy of scripts/venv-run, and an empty venv cache; returns (root, cache, env)."""
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "venv-run", root / "scripts" / "venv-run")
    (root / "requirements.lock").write_text(LOCK)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "probe.py").write_text('NAME = "probe"\n')
    cache = tmp_path / "venvs"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["HARMONIZE_VENV_ROOT"] = str(cache)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if "painterly-harmonization" not in p)
    return root, cache, env


def start(root: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(root / "scripts" / "venv-run"), "python", "-c", PROBE], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_first_uses_at_once_build_one_venv_and_keep_one_in_use(project):
    root, cache, env = project
    cache.mkdir()
    busy, idle = cache / "venv-00000000busy0000", cache / "venv-00000000idle0000"  # older venvs of the project
    for old in (busy, idle):
        (old / "bin").mkdir(parents=True)
        (old / ".complete").touch()
    with open(f"{busy}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_SH)  # what a command running in the old venv holds through venv-run

        runs = [start(root, env), start(root, env)]
        outcomes = [run.communicate(timeout=600) for run in runs]
        assert [run.returncode for run in runs] == [0, 0], outcomes
        assert busy.is_dir(), "a venv in use was deleted"

    venvs = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(venvs) == 2 and busy.name in venvs and idle.name not in venvs, venvs
    built = cache / next(name for name in venvs if name != busy.name)
    assert (built / ".complete").is_file() and (built / ".project").read_text().strip() == str(root)
    assert [out.split() for out, _ in outcomes] == [[str(built), "1.17.0", "probe"]] * 2
    errors = [err for _, err in outcomes]
    assert sum(err.count("[venv-run] creating") for err in errors) == 1, errors  # built once
    assert sum(err.count("[venv-run] waiting for another venv-run") for err in errors) == 1, errors  # they raced
    assert sum(err.count(f"[venv-run] keeping {busy}: in use") for err in errors) == 1, errors

    again = start(root, env)  # a later call reuses it at once
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and out.split()[0] == str(built) and "[venv-run]" not in err, err
