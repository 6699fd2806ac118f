"""`scaling-attn west` -> `fast` -> `show` through the real loading code (issue #16, item 1).

Both used to crash: `from_pretrained` of a Wan folder needs `accelerate`, which was not a
declared dependency, so diffusers raised "low_cpu_mem_usage cannot be False when
keep_in_fp32_modules is True". One run on a folder written by `save_pretrained` (a model
config nobody built in), one on the default `--model`, and one in a fresh process through the
installed entry point's module.
"""

from __future__ import annotations

import subprocess
import sys

import torch

from scaling_attn_compile.cli import main
from scaling_attn_compile.plan.io import load_plan

# Latents (C, F, H, W) = (4, 2, 16, 48) -> token grid (2, 8, 24), S = 384: three 128-blocks, so
# masks can drop blocks and a FAST target below 1 is reachable.
LATENT = "2,16,48"


def _west_fast_show(tmp_path, capsys, model_args, latent=LATENT, target="0.9"):
    west_out = tmp_path / "w.plan.safetensors"
    assert main(["west", *model_args, "--latent", latent, "--num-prompts", "1", "--steps", "2",
                 "--capture-steps", "2", "--text-len", "8", "--out", str(west_out)]) == 0
    plan = load_plan(west_out)
    fast_out = tmp_path / "f.plan.safetensors"
    assert main(["fast", *model_args, "--plan", str(west_out), "--target-density", target,
                 "--capture-steps", "2", "--text-len", "8", "--rows-per-block", "4",
                 "--out", str(fast_out)]) == 0
    fast_plan = load_plan(fast_out)
    assert fast_plan.schedule is not None and torch.equal(fast_plan.codes, plan.codes)
    assert (tmp_path / "f.schedule.png").stat().st_size > 1000
    png = tmp_path / "layer1.png"
    assert main(["show", str(fast_out), "--layer", "1", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    captured = capsys.readouterr()
    text = captured.out
    assert "FAST schedule:" in text and "wrote" in text
    assert "levels [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0]" in text  # rounded
    assert "white = kept, black = dropped" in text  # show's legend
    assert "the FAST schedule that runs" in text and (tmp_path / "f.schedule.png").is_file()
    assert "FAST profile" in captured.err  # fast's progress bar, not "calibration"
    if "--model" not in model_args:
        assert "--model not given: profiling the plan's model tiny" in text
    return plan


def test_west_fast_show_on_a_save_pretrained_folder(tiny_wan_folder, tmp_path, capsys):
    plan = _west_fast_show(tmp_path, capsys, ["--model", str(tiny_wan_folder)])
    # The folder's own config, not a built-in one, is what the plan records.
    assert plan.meta.model_config["ffn_dim"] == 48 and plan.meta.model_config["text_dim"] == 24
    assert plan.calib_grid == (2, 8, 24) and plan.meta.weights_fingerprint is not None
    assert plan.meta.calibration["source"] == f"scaling-attn west --model {tiny_wan_folder}"
    assert plan.meta.token_order == "tile"  # --token-order auto: a Wan model is tiled


def test_west_fast_show_with_the_default_model(tmp_path, capsys):
    """No --model: the default ('tiny': the shipped model, else the tiny random config)."""
    from scaling_attn_compile.models.wan import load_transformer

    default = load_transformer("tiny").transformer
    plan = _west_fast_show(tmp_path, capsys, [])
    assert plan.meta.model_config["num_layers"] == default.config.num_layers


def test_fast_with_another_model_than_the_plans_is_one_line(tiny_wan_folder, tmp_path, capsys):
    out = tmp_path / "w.plan.safetensors"
    assert main(["west", "--model", str(tiny_wan_folder), "--latent", LATENT, "--num-prompts", "1",
                 "--steps", "2", "--capture-steps", "1", "--text-len", "8",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["fast", "--model", "tiny-random", "--plan", str(out), "--target-density",
                 "0.9", "--out", str(tmp_path / "f.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("scaling-attn fast: error: --model tiny-random")
    assert f"--model {tiny_wan_folder}" in err and "ffn_dim" in err


def test_entry_point_in_a_fresh_process(tiny_wan_folder, tmp_path):
    """The module the `scaling-attn` script runs, in its own interpreter: exit 0 on the folder,
    and exit 2 with one line on stderr for a user error."""
    out = tmp_path / "p.safetensors"
    cmd = [sys.executable, "-m", "scaling_attn_compile.cli"]
    ok = subprocess.run([*cmd, "west", "--model", str(tiny_wan_folder), "--latent", LATENT,
                         "--num-prompts", "1", "--steps", "1", "--capture-steps", "1",
                         "--text-len", "8", "--out", str(out)],
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert load_plan(out).calib_grid == (2, 8, 24)
    bad = subprocess.run([*cmd, "show", str(tmp_path / "missing.safetensors")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"scaling-attn show: error: load_plan: no plan file at {tmp_path / 'missing.safetensors'}"
        f"; create one with `scaling-attn west --out {tmp_path / 'missing.safetensors'}`"]
