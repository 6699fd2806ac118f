"""What every benchmark shares: the environment block of a record (GPU, versions, git SHA), the
GPU's name in a file name, and where a record goes (merged with what is already there for the
same GPU). Imported as ``from _common import ...``: a script's own folder is on ``sys.path``
when it runs as ``python benchmarks/<script>.py``."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_sha() -> str:
    """The short SHA of HEAD. The device's copy of the tree may have no .git: the launcher can
    pass it as ``GIT_SHA``."""
    return os.environ.get("GIT_SHA") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"


def gpu_name(device=None, *, cpu: str = "cpu") -> str:
    """``torch.cuda.get_device_name()`` on a CUDA device (``device`` None: whenever CUDA is
    there), else ``cpu``."""
    kind = getattr(device, "type", device)
    cuda = torch.cuda.is_available() if kind is None else kind == "cuda"
    return torch.cuda.get_device_name() if cuda else cpu


def gpu_slug(gpu: str) -> str:
    """A GPU name as it goes into a record's file name: ``NVIDIA H200`` -> ``nvidia-h200``."""
    return gpu.replace(" ", "-").lower()


def environment(gpu: str, **extra) -> dict:
    """The ``env`` block of a record: GPU, torch, Triton, git SHA, CUDA, and ``extra``."""
    import triton

    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "git_sha": git_sha(), "cuda": torch.version.cuda, **extra}


def record_file(args, env: dict, question: str) -> tuple[str, dict]:
    """The JSON record's path (``--out``; a temp file for ``--tiny``, whose CPU timings are no
    record; else ``results/<question>-<gpu>.json``) and what it already holds for this GPU, so
    runs split over several device calls merge into one record (``{}`` for another GPU)."""
    if args.out:
        path = args.out
    elif args.tiny:
        path = os.path.join(tempfile.gettempdir(), f"{question}-cpu-tiny.json")
    else:
        path = os.path.join(RESULTS, f"{question}-{gpu_slug(env['gpu'])}.json")
    stored = {}
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("env", {}).get("gpu") != env["gpu"]:
            stored = {}
    return path, stored
