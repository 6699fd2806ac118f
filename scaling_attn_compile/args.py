"""Argument types and helpers shared by the ``scaling-attn`` commands (``cli.py``) and the demo
(``tiny/demo.py``): each raises argparse's one-line error naming the value and the fix."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .errors import CliError


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: ``"0,2,3"`` -> ``[0, 2, 3]`` non-negative ints."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = [-1]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated indices like 0,1,3, got "
                                         f"{text!r}")
    return values


def check_output_path(path: Path, flag: str) -> None:
    """Fail now, not after a long run, if ``path`` cannot be written: make its folder and write
    (then remove) a probe file there. Permissions alone do not tell (root, read-only mounts)."""
    if path.is_dir():
        raise CliError(f"{flag} {path} is a folder; expected a file path such as "
                       f"{path / 'plan.safetensors'}")
    folder = next((a for a in path.absolute().parents if a.exists()), None)
    if folder is not None and not folder.is_dir():
        raise CliError(f"{flag} {path} is not writable: {folder} is a file, not a folder; pass "
                       f"a path in a folder you can write to")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".scaling-attn-probe-"):
            pass
    except OSError as e:
        raise CliError(f"{flag} {path} is not writable ({e.strerror or e}); pass a path in a "
                       f"folder you can write to") from None


def check_input_file(path: Path | None, flag: str) -> None:
    """Fail before loading a model if an input file given on the command line is missing."""
    if path is not None and not path.is_file():
        raise CliError(f"{flag} {path}: no such file")


def parse_triple(text: str) -> tuple[int, int, int]:
    """``"F,H,W"`` -> ``(F, H, W)`` positive ints (argparse type)."""
    try:
        vals = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive ints like 21,30,52, got {text!r}")
    return vals


def resolve_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device):
    import torch
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    return table[name]


def add_token_order_argument(p: argparse.ArgumentParser) -> None:
    from .contract.token_order import NEW_PLAN_ORDER

    p.add_argument("--token-order", default=NEW_PLAN_ORDER,
                   metavar="auto|raster|tile|tile:FxHxW",
                   help="which tokens share a 128-token mask block: 'tile' (3D tiles of the "
                        "latent grid, shape chosen per grid), 'tile:2x8x8' (a fixed tile), "
                        "'raster' (strips of token rows; what sequence parallelism needs), or "
                        "'auto': tile where the model family supports it (Wan), else raster; "
                        f"default {NEW_PLAN_ORDER}")


def levels_arg(text: str) -> list[float]:
    """argparse type: ``"0.1,0.3,1.0"`` -> ``[0.1, 0.3, 1.0]`` (``fast --levels``)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated thresholds like 0.1,0.3,1.0, "
                                         f"got {text!r}") from None


def plan_model(calib: dict) -> str:
    """The ``--model`` a plan was calibrated with: recorded since issue 18, else parsed from
    its source line (``scaling-attn west --model X``)."""
    if calib.get("model"):
        return str(calib["model"])
    source = str(calib.get("source") or "")
    if source.startswith("scaling-attn west --model "):
        return source.removeprefix("scaling-attn west --model ")
    raise CliError(f"--model: the plan records no model (its source is {source or 'empty'!r}); "
                   f"pass --model, the folder or name the plan was calibrated on")


def save_west_plan(plan, args: argparse.Namespace, t0: float) -> int:
    """The end of ``scaling-attn west``, bare transformer or pipeline folder: the plan records
    ``--model`` as given, is saved to ``--out`` and summarised; the exit code (0)."""
    import time

    plan.meta.calibration["model"] = args.model
    path = plan.save(args.out)
    print(plan.summary())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


def check_probe_steps(probe_steps: int, profiled_steps: int) -> None:
    """``--probe-steps``: the video objective's probes weigh one gain per profiled step, so
    they need at least that many steps (``scaling-attn fast``, built-in and pipeline paths)."""
    if probe_steps < profiled_steps:
        raise CliError(f"--probe-steps {probe_steps}: the probes weight {profiled_steps} "
                       f"profiled steps, so they need at least {profiled_steps} steps")
