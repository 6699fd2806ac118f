"""The kernels live in `scaling_attn_compile/kernels/`, never in a top-level `kernels` (that name is
Hugging Face's package, which transformers >= 5 requires and diffusers probes and imports)."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inside_repo(path: str) -> bool:
    """Is ``path`` under the repo (a path prefix, not a string prefix: /tmp/ci vs /tmp/civenv)?"""
    return Path(path).resolve().is_relative_to(Path(ROOT).resolve())


def _run(code: str, cwd: str, env=None) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_installed_package_imports_kernels_from_the_package(tmp_path):
    code = ("import importlib.util, scaling_attn_compile.kernels.block_sparse_attention as m;"
            "s = importlib.util.find_spec('kernels'); print(m.__name__); "
            "print(s.origin if s else None)")
    name, top = _run(code, cwd=str(tmp_path)).splitlines()
    assert name == "scaling_attn_compile.kernels.block_sparse_attention"
    # Hugging Face's `kernels` (a transformers dependency) may be installed; ours never is.
    assert top == "None" or not _inside_repo(top), f"our kernels/ is importable as 'kernels': {top}"


def test_diffusers_does_not_mistake_our_kernels_for_hf_kernels():
    out = _run("from diffusers.utils import is_kernels_available as f; print(f())", cwd=ROOT)
    spec = importlib.util.find_spec("kernels")
    hf_kernels = spec is not None and not _inside_repo(str(spec.origin))
    assert out == str(hf_kernels)


def test_wan_imports_from_the_repo_root():
    """A Python started in the repo root (``python -m pytest`` puts it on sys.path) must not see
    a top-level ``kernels``: transformers >= 5 imports Hugging Face's ``kernels`` package, and
    when a ``kernels/`` folder shadowed it, diffusers' Wan import failed."""
    assert not os.path.exists(os.path.join(ROOT, "kernels")), "a top-level kernels/ is back"
    out = _run("import diffusers.models.transformers.transformer_wan as m; print(m.__name__)",
               cwd=ROOT)
    assert out == "diffusers.models.transformers.transformer_wan"


@pytest.mark.slow
def test_built_wheel_maps_kernels_into_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), ROOT], check=True, capture_output=True)
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert "scaling_attn_compile/kernels/block_sparse_attention.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "wheel ships a top-level kernels/"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(tmp_path / wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import scaling_attn_compile.kernels.block_sparse_attention as m; print(m.__file__)")
    assert _run(code, cwd=str(tmp_path), env=env).startswith(str(site))


def test_backend_is_registered_by_name():
    """`torch.compile(m, backend="scaling_attn", options={"plan": plan})` finds us by entry point."""
    from importlib.metadata import entry_points

    import torch._dynamo

    (ep,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "scaling_attn"]
    assert ep.value == "scaling_attn_compile.compile.backend:dynamo_backend"
    assert "scaling_attn" in torch._dynamo.list_backends(exclude_tags=())
