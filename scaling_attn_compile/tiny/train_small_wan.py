"""Train small-wan (rectified flow on camera moves over photographs), resumable, and write its card.

    python -m scaling_attn_compile.tiny.train_small_wan --out DIR --device cuda --minutes 7 [--resume DIR]
    python -m scaling_attn_compile.tiny.train_small_wan --out /tmp/sw --device cpu --steps 3 \\
        --res 2x16x16 --batch 2 --num-layers 1          # smoke run

Objective, noise-level sampling, caption dropout, LR schedule and EMA are train_tiny's (imported,
not copied): ``x_t = (1 - t) x0 + t noise``, predict ``noise - x0``, MSE; t logit-normal (80%) /
uniform (20%); captions dropped to ``""`` 10%; AdamW, linear warm-up then cosine to 10% over this
run's ``--minutes`` (or ``--steps``); grad clip 1; EMA of the weights is what is saved.

On CUDA: bf16 autocast, and each ``WanTransformerBlock`` is compiled in place (regional
compilation: one block's graph per input shape instead of the whole model's, so three
resolutions cost three short compiles; the state-dict keys stay plain). On the CPU: eager fp32.

``--minutes`` counts from the process start (compile included); the final stage (reload the saved
fp16 weights, validation, samples at the native grid, attention structure, card) adds < 1 min on
a GPU. Every ``--ckpt-minutes`` the EMA weights (fp16) and ``train_log.json`` (step/loss history)
are written to ``--out``, so a killed run leaves a loadable model. ``--resume DIR_OR_FILE`` starts
from saved weights (model and EMA both), takes the config and caption encoder from that folder,
continues the global step count and appends to its loss history.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from ..models.wan import transformer_blocks
from . import photo_video as pv
from .small_wan import (
    SMALL_WAN_GRID,
    SmallCaptionEncoder,
    caption_encoder,
    load_small_wan,
    make_small_wan,
    save_small_wan,
    token_grid,
)
from .tiny_wan import WEIGHTS_NAME, flops_per_token, initial_noise, param_count
from .train_tiny import (
    add_shared_args,
    device_name,
    fixed_t_loss,
    lr_at,
    parse_grid,
    resolve_args,
    start,
    train_step,
)

LOG_NAME = "train_log.json"
GRID_LIKE = "16x128x128"  # the example of --res the error gives

# Per device: pixel grids cycled per step, tokens per step. On CUDA 6 of 8 steps are the native
# 16x128x128 (16,384 tokens, 128 blocks; 8 videos = 131,072 tokens a step); 16x64x64 (32 blocks)
# and 8x96x128 (48 blocks, another aspect) teach other grids for the resolution-transfer study.
# Only three shapes, because each compiles once (~20-40 s for one block's forward + backward).
DEFAULTS = {
    "cuda": dict(res="16x128x128,16x128x128,16x128x128,16x64x64,16x128x128,16x128x128,16x128x128,8x96x128",
                 batch_tokens=131072, lr=5e-4, warmup=100, sample_steps=30),
    # CPU (2 shared cores): 2-frame 16x16 clips (32 tokens); for tests and smoke runs only.
    "cpu": dict(res="2x16x16", batch_tokens=64, lr=1e-3, warmup=5, sample_steps=4),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train small-wan (rectified flow, photo videos).")
    ap.add_argument("--out", required=True, help="output directory (weights, card, plots, log)")
    ap.add_argument("--resume", default=None, help="a small-wan folder (or its weights file) to continue from")
    ap.add_argument("--steps", type=int, default=1_000_000, help="max optimizer steps in this run")
    ap.add_argument("--minutes", type=float, default=None,
                    help="end the training loop this many minutes after start (compile included)")
    ap.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (a resumed run uses a fifth)")
    ap.add_argument("--ema", type=float, default=0.998, help="EMA decay (0.998: a ~500-step horizon, "
                    "a third of a 7-minute H200 run)")
    ap.add_argument("--ckpt-minutes", type=float, default=1.5)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--card-grid", default=None, help="FxHxW for samples and stats (default: native 16x128x128 "
                    "on CUDA, the first --res on the CPU)")
    ap.add_argument("--no-compile", action="store_true", help="eager on CUDA too")
    add_shared_args(ap)
    a = resolve_args(ap.parse_args(argv), argv, "train_small_wan", DEFAULTS, token_grid, GRID_LIKE)
    cuda = a.device.startswith("cuda")
    a.card_grid = parse_grid(a.card_grid, token_grid, GRID_LIKE) if a.card_grid else (
        SMALL_WAN_GRID if cuda else a.grids[0])
    return a


def resume_dir(path: str) -> Path:
    p = Path(path)
    d = p.parent if p.is_file() else p
    if not (d / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"--resume: no {WEIGHTS_NAME} in {d}; pass a folder written by train_small_wan "
                                f"(or omit --resume to start from scratch)")
    return d


def read_log(d: Path) -> dict:
    f = d / LOG_NAME
    return json.loads(f.read_text()) if f.exists() else {"history": [], "runs": []}


@torch.no_grad()
def val_loss(model, grid, device, encoder, n: int = 4, seed: int = 99_999,
             ts=(0.1, 0.3, 0.5, 0.7, 0.9)) -> float:
    """Flow loss on a fixed held-out batch (held-out photos and motions) at fixed t."""
    x0, caps = pv.sample_batch(seed, n, grid, device, held_out=True)
    return fixed_t_loss(model, x0, caps, initial_noise(n, grid, seed), encoder, ts, autocast=True)


def train(a) -> dict:
    t_start = time.time()
    out, device = start(a)
    cuda = device.type == "cuda"
    if a.resume:
        src = resume_dir(a.resume)
        model = load_small_wan(device, torch.float32, path=src).train().requires_grad_(True)
        encoder = caption_encoder(src)
        log = read_log(src)
        warmup = max(1, a.warmup // 5)  # weights are trained; a short ramp protects Adam's fresh moments
    else:
        model = make_small_wan(a.seed, **a.overrides).to(device).train()
        encoder, log, warmup = SmallCaptionEncoder.default(), {"history": [], "runs": []}, a.warmup
    history, runs = log["history"], log["runs"]
    step0 = history[-1]["step"] if history else 0
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_params = list(ema.parameters())
    cfg = dict(model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=a.weight_decay, fused=cuda)
    if cuda and not a.no_compile:
        # One graph per (grid, batch) shape, shared by the 8 block instances (Dynamo inlines
        # nn.Module parameters as inputs); room for 3 shapes x 8 instances if it did not.
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        for block in transformer_blocks(model):
            block.compile(dynamic=False)  # in place: parameter names unchanged
    g = torch.Generator(device="cpu").manual_seed(a.seed + step0)  # caption dropout
    gd = torch.Generator(device=device).manual_seed(a.seed + step0)  # t and noise
    budget = a.minutes * 60 if a.minutes else None
    run = dict(index=len(runs), start_step=step0, device=device_name(device),
               resumed_from=str(a.resume) if a.resume else None, command=a.command, torch=torch.__version__)
    runs.append(run)

    def checkpoint():
        save_small_wan(ema, out, encoder)
        run.update(steps=step, end_step=step0 + step, loop_seconds=time.time() - t_loop)
        (out / LOG_NAME).write_text(json.dumps({"history": history, "runs": runs}, default=str))

    tokens_seen, flops, step = 0, 0.0, 0
    t_loop = last_ckpt = time.time()
    while step < a.steps:
        elapsed = time.time() - t_start
        if budget and elapsed >= budget:
            break
        progress = max(step / a.steps, elapsed / budget if budget else 0.0)
        grid = a.grids[step % len(a.grids)]
        S = math.prod(token_grid(grid))
        n = a.batch or max(1, a.batch_tokens // S)
        x0, caps = pv.sample_batch(a.seed * 1_000_003 + step0 + step, n, grid, device)
        lr = lr_at(step, progress, argparse.Namespace(lr=a.lr, warmup=warmup))
        # The EMA's warm-up counts global steps: a resumed EMA already holds trained weights.
        loss, gnorm = train_step(model, model, opt, ema_params, x0, caps, encoder, a, g=g, gd=gd,
                                 lr=lr, ema_step=step0 + step)
        step += 1
        tokens_seen += n * S
        flops += 3 * n * S * flops_per_token(cfg, S)
        if step % a.log_every == 0 or step == 1:
            lv = loss.item()  # the only host sync
            history.append(dict(step=step0 + step, run=run["index"], loss=lv, lr=lr, grad_norm=float(gnorm),
                                time_s=time.time() - t_loop, grid="x".join(map(str, grid)), batch=n))
            print(f"step {step0 + step} loss {lv:.4f} lr {lr:.2e} grid {history[-1]['grid']} "
                  f"{time.time() - t_start:.0f}s", flush=True)
        if time.time() - last_ckpt > a.ckpt_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    train_s = time.time() - t_loop
    checkpoint()
    run.update(tokens_seen=tokens_seen, train_tflops_per_s=flops / max(train_s, 1e-9) / 1e12,
               setup_seconds=t_loop - t_start)
    summary = dict(steps=step, total_steps=step0 + step, train_seconds=train_s, tokens_seen=tokens_seen,
                   params=param_count(model), device=run["device"], torch=torch.__version__,
                   args={k: v for k, v in vars(a).items() if k != "grids"},
                   final_train_loss=sum(h["loss"] for h in history[-8:]) / max(len(history[-8:]), 1))
    from .small_wan_card import finish

    del model, opt  # the card reloads what shipped (ema is the checkpoint closure's)
    finish(out, a, summary, history, runs, encoder, device, val_loss)
    summary["total_seconds"] = run["total_seconds"] = time.time() - t_start
    (out / LOG_NAME).write_text(json.dumps({"summary": summary, "history": history, "runs": runs}, default=str))
    return summary


def main(argv=None) -> dict:
    a = parse_args(argv)
    s = train(a)
    print(json.dumps({k: s.get(k) for k in ("steps", "total_steps", "train_seconds", "final_train_loss",
                                            "val_loss", "params", "total_seconds")}, indent=1))
    return s


if __name__ == "__main__":
    main()
