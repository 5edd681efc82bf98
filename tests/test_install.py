"""The package as a user installs it: a regular (non-editable) install into a temporary folder, used
from a directory outside the checkout. Checks what the checkout hides: which top-level packages land in
site-packages, the QnA-ViT models, timm's registry, the autotuner's entry point and where it writes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what the wheel may put at the top level of site-packages (besides *.dist-info)
EXPECTED_TOP_LEVEL = {"qna_triton", "qna_vit"}


def _build_isolation_flags() -> list:
    """Build with the running interpreter's setuptools when it has a recent enough one (no network), else
    let pip fetch the build requirements."""
    try:
        import setuptools
    except ImportError:
        return []
    major, minor = (int(v) for v in setuptools.__version__.split(".")[:2])
    # bdist_wheel is part of setuptools from 70.1; before it, the separate wheel package provides it
    if (major, minor) >= (70, 1) or (major >= 64 and importlib.util.find_spec("wheel") is not None):
        return ["--no-build-isolation"]
    return []


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-compile",
            "--quiet",
            "--target",
            str(target),
            *_build_isolation_flags(),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path_factory.getbasetemp(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def _run(code: str, site: Path, cwd: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QNA_TRITON_CONFIG_DIR")}
    env.update(PYTHONPATH=str(site), **env_extra)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_only_our_packages_are_installed_at_the_top_level(installed):
    top = {p.name for p in installed.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
    top.discard("__pycache__")
    assert top == EXPECTED_TOP_LEVEL, f"unexpected top-level entries in site-packages: {sorted(top)}"
    assert (installed / "qna_vit" / "training" / "engine.py").is_file()
    assert (installed / "qna_triton" / "autotune" / "cli.py").is_file()


def test_library_and_models_import_from_outside_the_checkout(installed, tmp_path):
    proc = _run(
        """
        import qna_triton, qna_vit
        from qna_vit.training.engine import build_scheduler
        print(qna_triton.__file__)
        print(qna_vit.__file__)
        model = qna_vit.create_model("qna_vit_tiny")
        print(sum(p.numel() for p in model.parameters()))
    """,
        installed,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lib, models, n_params = proc.stdout.split()
    assert Path(lib).is_relative_to(installed) and Path(models).is_relative_to(installed), proc.stdout
    assert int(n_params) == 15_715_560


def test_timm_creates_the_models_after_importing_them(installed, tmp_path):
    proc = _run(
        """
        import timm, qna_vit
        model = timm.create_model("qna_vit_tiny", num_classes=7)
        print(type(model).__module__, model.num_classes)
    """,
        installed,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["qna_vit.model", "7"]


def test_autotuner_runs_as_a_module_and_writes_to_the_user_folder(installed, tmp_path):
    cache = tmp_path / "cache"
    proc = _run(
        """
        from qna_triton import tuning
        print(tuning.user_config_dir())
        print(tuning.SHIPPED_CONFIG_DIR)
    """,
        installed,
        tmp_path,
        XDG_CACHE_HOME=str(cache),
    )
    assert proc.returncode == 0, proc.stderr
    user, shipped = (Path(line) for line in proc.stdout.split())
    assert user == cache / "qna_triton" / "configs"
    assert shipped.is_relative_to(installed)  # shipped configs are read from the package

    before = sorted(installed.rglob("*"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QNA_TRITON_CONFIG_DIR")}
    env.update(PYTHONPATH=str(installed), XDG_CACHE_HOME=str(cache), PYTHONDONTWRITEBYTECODE="1")
    for argv in (
        ["--dry-run", "--quick", "--gpu-name", "Some GPU"],
        ["--dry-run", "--model", "qna_vit_tiny", "--batch", "2", "--gpu-name", "Some GPU"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "qna_triton.autotune", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"output: {cache / 'qna_triton' / 'configs' / 'some_gpu.json'}" in proc.stdout, proc.stdout
    assert sorted(installed.rglob("*")) == before, "the autotuner must never write into site-packages"
