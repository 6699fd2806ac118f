"""Train the tiny Wan with rectified flow on procedural toy videos, and write its model card.

    python -m scaling_attn_compile.tiny.train_tiny --out DIR --device cuda --minutes 7.5   # ~8.5 min on an H100
    python -m scaling_attn_compile.tiny.train_tiny --out /tmp/tw --device cpu --minutes 4  # weak, loadable

Objective (rectified flow, as Wan): ``x_t = (1 - t) x0 + t noise``, the model predicts the velocity
``noise - x0`` from ``(x_t, timestep = 1000 t, caption)``; MSE. ``t`` is logit-normal (SD3) mixed
with 20% uniform so the ends of the schedule are still seen. Captions are dropped to ``""`` 10% of
the time (classifier-free guidance). Each step draws one resolution from ``--res`` (round robin)
and as many videos as fit ``--batch-tokens``; data is rendered on the training device.

AdamW, linear warm-up then cosine decay to 10% over the run's progress (steps or minutes, whichever
ends first), grad-norm clip 1, bf16 autocast on CUDA, EMA of the weights (what is saved).
The output directory is loadable (``load_tiny_wan(path=DIR)``) from the first checkpoint on:
checkpoints overwrite the weights every ``--ckpt-minutes``. At the end it writes ``loss.png``,
``samples.png``, ``train_log.json`` and ``README.md`` (model card: data, steps, parameters, loss,
time, device, attention structure trained vs random init).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import torch

from ..models.wan import SELF_ATTENTION_PATH, compute_dtype
from .tiny_wan import (
    TINY_WAN_CONFIG,
    CaptionEncoder,
    flops_per_token,
    generate,
    initial_noise,
    load_tiny_wan,
    make_tiny_wan,
    param_count,
    save_tiny_wan,
    token_grid,
)
from .toy_video import HELD_OUT, held_out_captions, sample_batch

# Per device: resolutions (F x H x W pixels) and tokens per batch. On CUDA, 8x32x32 (2048 tokens,
# 16 blocks of 128) is the main grid; 48x48, 32x64, 12 frames and 64x64 (8192 tokens) teach
# the model other grids (the backend remaps plans across resolutions). 64K tokens per step is
# ~2.7 TFLOP of matmuls + attention: an H100 does a few steps a second, ~2-4K steps in 7.5 min.
DEFAULTS = {
    "cuda": dict(res="8x32x32,8x48x48,8x32x64,8x32x32,12x32x32,8x64x64", batch_tokens=65536,
                 lr=6e-4, warmup=200, sample_steps=30),
    # CPU (2 shared cores, ~20 GFLOP/s seen): 512-token clips, 2 per step, ~3 s a step, so a
    # 4-minute run is ~80 steps: a weak but loadable model (tests, smoke runs).
    "cpu": dict(res="8x16x16,4x16x32", batch_tokens=1024, lr=1e-3, warmup=10, sample_steps=16),
}


def parse_grid(s: str, grid_of=token_grid, like: str = "8x32x32") -> tuple[int, int, int]:
    """``--res``/``--sample-grid`` ``FxHxW`` pixels, checked by the model's ``grid_of`` (its
    pixel -> token grid); ``like`` is the example the error gives."""
    try:
        F, H, W = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise ValueError(f"--res: expected FxHxW like {like}, got {s!r}") from None
    grid_of((F, H, W))
    return F, H, W


def add_shared_args(ap: argparse.ArgumentParser) -> None:
    """The arguments both trainers (this one and ``train_small_wan``) take, with one meaning."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--res", default=None, help="comma list of FxHxW pixel grids, cycled per step")
    ap.add_argument("--batch-tokens", type=int, default=None, help="tokens per step (videos = this // tokens per video)")
    ap.add_argument("--batch", type=int, default=None, help="fixed videos per step (overrides --batch-tokens)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-steps", type=int, default=None, help="Euler steps for samples.png")
    ap.add_argument("--num-layers", type=int, default=None, help="override the config (tests)")
    ap.add_argument("--ffn-dim", type=int, default=None, help="override the config (tests)")


def resolve_args(a: argparse.Namespace, argv, module: str, defaults: dict, grid_of=token_grid,
                 like: str = "8x32x32") -> argparse.Namespace:
    """What both trainers do after parsing: the command line for the card, the device's
    :data:`DEFAULTS` where an argument was not given, the ``--res`` grids, the config overrides."""
    import sys

    a.command = f"python -m scaling_attn_compile.tiny.{module} " + " ".join(sys.argv[1:] if argv is None else argv)
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    for k, v in defaults[dev].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.grids = [parse_grid(s, grid_of, like) for s in a.res.split(",")]
    a.overrides = {k: v for k, v in (("num_layers", a.num_layers), ("ffn_dim", a.ffn_dim)) if v is not None}
    return a


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train the tiny Wan (rectified flow, toy videos).")
    ap.add_argument("--out", required=True, help="output directory (weights, card, plots)")
    ap.add_argument("--steps", type=int, default=1_000_000, help="max optimizer steps")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop the training loop after this many minutes (the final stage adds <1 min on a GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="linear warm-up steps")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--ckpt-minutes", type=float, default=2.0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--sample-grid", default=None, help="FxHxW for samples and stats (default: first --res)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward (CUDA)")
    add_shared_args(ap)
    a = resolve_args(ap.parse_args(argv), argv, "train_tiny", DEFAULTS)
    a.sample_grid = parse_grid(a.sample_grid) if a.sample_grid else a.grids[0]
    return a


def sample_t(n: int, g: torch.Generator) -> torch.Tensor:
    """``(n,)`` noise levels on ``g``'s device: logit-normal(0, 1) (80%) or uniform (20%), in (0, 1)."""
    kw = dict(generator=g, device=g.device)
    t = torch.sigmoid(torch.randn(n, **kw))
    u = torch.rand(n, **kw)
    return torch.where(torch.rand(n, **kw) < 0.2, u, t).clamp(1e-4, 1 - 1e-4)


def flow_loss(model, x0: torch.Tensor, emb: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow MSE. x0, noise ``(B, 3, F, H, W)``; emb ``(B, T, text_dim)``; t ``(B,)``."""
    tb = t.view(-1, 1, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * noise
    pred = model(hidden_states=xt, timestep=1000 * t, encoder_hidden_states=emb, return_dict=False)[0]
    return (pred.float() - (noise - x0)).square().mean()


@torch.no_grad()
def val_loss(model, grid, device, encoder, n: int = 8, seed: int = 99_999,
             ts=(0.1, 0.3, 0.5, 0.7, 0.9)) -> float:
    """Loss on a fixed held-out batch (held-out captions) at fixed t; comparable across runs."""
    x0, caps = sample_batch(seed, n, grid, device, held_out=True)
    return fixed_t_loss(model, x0, caps, initial_noise(n, grid, seed), encoder, ts)


@torch.no_grad()
def fixed_t_loss(model, x0: torch.Tensor, caps: list[str], noise: torch.Tensor, encoder, ts,
                 autocast: bool = False) -> float:
    """Both trainers' validation: the flow loss of a fixed batch and noise, in the model's
    compute dtype, averaged over the noise levels ``ts`` (bf16 autocast on CUDA if asked)."""
    n, device = x0.shape[0], x0.device
    emb = encoder(caps, device=device)
    dtype = compute_dtype(model)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
        return sum(flow_loss(model, x0.to(dtype), emb.to(dtype), torch.full((n,), t, device=device),
                             noise.to(device, dtype)).item() for t in ts) / len(ts)


def lr_at(step: int, progress: float, a) -> float:
    warm = min(1.0, (step + 1) / max(a.warmup, 1))
    return a.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def device_name(device: torch.device) -> str:
    """The device a card and a training log name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def start(a) -> tuple[Path, torch.device]:
    """Both trainers' setup: the output folder made, TF32 matmuls on CUDA, the seed set."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(a.seed)
    return out, device


def train_step(fwd, model, opt, ema_params: list, x0: torch.Tensor, caps: list[str], encoder, a,
               *, g: torch.Generator, gd: torch.Generator, lr: float, ema_step: int):
    """One optimizer step of both trainers; returns ``(loss, grad norm)`` (tensors: no sync).

    Captions dropped to ``""`` with ``a.cfg_drop`` (on ``g``), ``t`` and noise drawn on ``gd``
    (the training device), the flow loss of ``fwd`` (the model, or its compiled forward) under
    bf16 autocast on CUDA, grad-norm clip 1, AdamW at ``lr``, then the EMA with warm-up decay
    ``min(a.ema, (1 + s) / (10 + s))`` at ``s = ema_step``, so short runs are not all init."""
    n, device = x0.shape[0], x0.device
    drop = torch.rand(n, generator=g) < a.cfg_drop
    emb = encoder(["" if d else c for c, d in zip(caps, drop.tolist(), strict=True)], device=device)
    t = sample_t(n, gd)
    noise = torch.randn(x0.shape, generator=gd, device=device)
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = flow_loss(fwd, x0, emb, t, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    decay = min(a.ema, (1 + ema_step) / (10 + ema_step))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, list(model.parameters()), 1 - decay)
    return loss, gnorm


def train(a) -> dict:
    t_start = time.time()
    out, device = start(a)
    cuda = device.type == "cuda"
    model = make_tiny_wan(a.seed, **a.overrides).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_params = list(ema.parameters())
    encoder = CaptionEncoder.default()
    cfg = {**TINY_WAN_CONFIG, **a.overrides}
    n_params = param_count(model)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=a.weight_decay,
                            fused=cuda)
    fwd = torch.compile(model) if (a.compile and cuda) else model
    g = torch.Generator(device="cpu").manual_seed(a.seed)  # caption dropout
    gd = torch.Generator(device=device).manual_seed(a.seed)  # t and noise, drawn where they are used
    budget = a.minutes * 60 if a.minutes else None

    from tqdm.auto import tqdm

    history: list[dict] = []
    tokens_seen = 0
    flops = 0.0
    last_ckpt = time.time()
    t_loop = time.time()
    bar = tqdm(total=a.steps if budget is None else None, desc="train", unit="step", mininterval=2.0)
    step, run_loss, run_n = 0, 0.0, 0
    while step < a.steps:
        elapsed = time.time() - t_loop
        progress = max(step / a.steps, elapsed / budget if budget else 0.0)
        if budget and elapsed >= budget:
            break
        grid = a.grids[step % len(a.grids)]
        S = math.prod(token_grid(grid))
        n = a.batch or max(1, a.batch_tokens // S)
        x0, caps = sample_batch(a.seed * 1_000_003 + step, n, grid, device)
        lr = lr_at(step, progress, a)
        loss, gnorm = train_step(fwd, model, opt, ema_params, x0, caps, encoder, a, g=g, gd=gd,
                                 lr=lr, ema_step=step)
        step += 1
        tokens_seen += n * S
        flops += 3 * n * S * flops_per_token(cfg, S)
        bar.update(1)
        if step % a.log_every == 0 or step == 1 or step == a.steps:
            lv = loss.item()  # sync only when logging
            run_loss += lv
            run_n += 1
            el = time.time() - t_loop
            history.append(dict(step=step, loss=lv, lr=lr, grad_norm=float(gnorm), time_s=el,
                                grid="x".join(map(str, grid)), batch=n))
            bar.set_postfix(loss=f"{lv:.4f}", lr=f"{lr:.1e}", grid=history[-1]["grid"],
                            tok_s=f"{tokens_seen / max(el, 1e-9):.3g}")
        if time.time() - last_ckpt > a.ckpt_minutes * 60:
            save_tiny_wan(ema, out, encoder)
            last_ckpt = time.time()
    bar.close()
    train_s = time.time() - t_loop
    save_tiny_wan(ema, out, encoder)
    summary = dict(
        steps=step, train_seconds=train_s, tokens_seen=tokens_seen, params=n_params,
        train_tflops_per_s=flops / max(train_s, 1e-9) / 1e12,
        device=device_name(device),
        torch=torch.__version__, args={k: v for k, v in vars(a).items() if k not in ("grids",)},
        final_train_loss=sum(h["loss"] for h in history[-8:]) / max(len(history[-8:]), 1),
    )
    finish(out, a, summary, history, encoder, device)
    summary["total_seconds"] = time.time() - t_start
    (out / "train_log.json").write_text(json.dumps(dict(summary=summary, history=history), indent=1, default=str))
    return summary


def finish(out: Path, a, summary: dict, history: list[dict], encoder, device) -> None:
    """Reload the saved weights (what ships), then plots, validation, attention stats and card."""
    from .attention_stats import markdown_table, model_attention_stats, summarize, uniform_stats

    model = load_tiny_wan(device, torch.float32, path=out)
    rand = make_tiny_wan(a.seed, **a.overrides).to(device).eval()
    grid = a.sample_grid
    summary["val_loss"] = val_loss(model, grid, device, encoder)
    summary["val_loss_random_init"] = val_loss(rand, grid, device, encoder)
    plot_loss(out / "loss.png", history)
    caps = ["red square moving left", "small blue circle bouncing", "large green triangle rotating",
            "yellow square moving down"] + held_out_captions()[:4]
    t0 = time.time()
    vids = generate(model, caps, grid, steps=a.sample_steps, seed=0)
    summary["sample_seconds"] = time.time() - t0
    data, _ = sample_batch(0, len(caps), grid, device, captions=caps)
    plot_samples(out / "samples.png", caps, vids, data, held=set(held_out_captions()))
    # Structure: trained vs the same architecture at its random init, at 3 noise levels.
    tg = token_grid(grid)
    stats, cols = {}, {"uniform": uniform_stats(tg)}
    for t in (0.9, 0.5, 0.1):
        st = model_attention_stats(model, grid, t, n=2)
        stats[t] = st
        cols[f"trained t={t:g}"] = summarize(st)
    cols["random init t=0.5"] = summarize(model_attention_stats(rand, grid, 0.5, n=2))
    summary["attention"] = cols
    summary["attention_per_head_t0.5"] = {
        str(i): {m: v.tolist() for m, v in s.items()} for i, s in stats[0.5].items()
    }
    write_card(out, a, summary, markdown_table(cols), stats[0.5])


def plot_loss(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="train loss (logged steps)")
    k = max(1, len(loss) // 30)
    if len(loss) > k:
        sm = [sum(loss[max(0, i - k + 1): i + 1]) / len(loss[max(0, i - k + 1): i + 1]) for i in range(len(loss))]
        ax.plot(steps, sm, lw=1.5, label=f"moving mean ({k})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_samples(path: Path, caps: list[str], vids: torch.Tensor, data: torch.Tensor,
                 held: set[str], frames: int = 8) -> None:
    """One row per caption: a toy-data example (left) and the generated video (right), frames
    left to right. vids, data ``(B, 3, F, H, W)`` in [-1, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    F, h, w = vids.shape[2:]
    cols = list(range(0, F, max(1, F // frames)))[:frames]
    n = len(cols)
    fig, axes = plt.subplots(len(caps), 2 * n + 1, squeeze=False,
                             figsize=((2 * n + 1) * min(0.9 * w / h, 1.2), len(caps) * 1.25),
                             gridspec_kw={"width_ratios": [1] * n + [0.25] + [1] * n})
    for r, c in enumerate(caps):
        axes[r][n].axis("off")
        for j, f in enumerate(cols):
            for v, ax in ((data[r], axes[r][j]), (vids[r], axes[r][n + 1 + j])):
                ax.imshow(((v[:, f].permute(1, 2, 0).float().cpu() + 1) / 2).clamp(0, 1).numpy(),
                          interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
        axes[r][0].set_title(f"data: {c}", fontsize=7, loc="left")
        axes[r][n + 1].set_title("generated" + (" (held-out caption)" if c in held else ""), fontsize=7, loc="left")
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_card(out: Path, a, s: dict, attn_table: str, stats_mid) -> None:
    from .attention_stats import per_head_table

    grids = ", ".join("x".join(map(str, g)) for g in a.grids)
    size_mb = (out / "diffusion_pytorch_model.safetensors").stat().st_size / 1e6
    held = ", ".join(f'"{c} {sh} {m}"' for c, sh, m in HELD_OUT)
    card = f"""# tiny-wan: a {s['params'] / 1e6:.1f}M-parameter Wan2.1-style video DiT trained on toy videos

A diffusers `WanTransformer3DModel` (config in `config.json`: {a.num_layers or TINY_WAN_CONFIG['num_layers']} layers,
{TINY_WAN_CONFIG['num_attention_heads']} heads x {TINY_WAN_CONFIG['attention_head_dim']}, FFN {a.ffn_dim or TINY_WAN_CONFIG['ffn_dim']}, patch (1, 2, 2), text_dim 64), trained here from scratch
so that quality studies of block-sparse attention have a model whose attention is learned.
Weights: `diffusion_pytorch_model.safetensors` (fp16, {size_mb:.1f} MB). Load with
`scaling_attn_compile.load_tiny_wan(device, dtype, path=...)`.

- **No VAE.** `in_channels = out_channels = 3`: the model denoises RGB pixels in [-1, 1] directly;
  a video `(3, F, H, W)` is its own latent. Token grid = `(F, H/2, W/2)`.
- **Text:** a fixed caption encoder (`caption_encoder.safetensors`): a seeded N(0, 1) word table
  over the grammar's {len(CaptionEncoder.default().vocab)} words, one 64-d row per word, zero-padded to 8 tokens; `""` is
  the null caption. Not trained.
- **Sampling:** rectified-flow Euler, `timestep = 1000 t`, t from 1 to 0
  (`scaling_attn_compile.tiny.tiny_wan.generate`).

## Data

Procedural (`scaling_attn_compile.tiny.toy_video`): one textured (striped) square, circle or triangle
in one of 8 colours, moving left/right/up/down, bouncing or rotating, over a panning textured
background. Captions `[small|large] color shape motion`, e.g. "red square moving left".
8 x 3 x 6 = 144 (color, shape, motion) triples, 8 held out of training: {held}.
Resolutions (frames x height x width pixels), cycled per step: {grids}.

## Training

| | |
|---|---|
| objective | rectified flow: x_t = (1-t) x0 + t noise, predict noise - x0, MSE; t logit-normal (80%) / uniform (20%) |
| optimizer | AdamW lr {a.lr:g} (warm-up {a.warmup}, cosine to 10%), wd {a.weight_decay}, clip 1, EMA {a.ema} (saved) |
| batch | {a.batch or f'{a.batch_tokens} tokens per step'}; captions dropped 10% |
| steps | {s['steps']} |
| tokens seen | {s['tokens_seen'] / 1e6:.1f} M |
| time | {s['train_seconds'] / 60:.1f} min training loop |
| device | {s['device']}, torch {s['torch']}{', bf16 autocast' if 'cuda' in str(a.device) else ', fp32'} |
| throughput | {s['tokens_seen'] / s['train_seconds']:,.0f} tokens/s; {s['train_tflops_per_s'] * 1e3:,.1f} GFLOP/s of model matmuls (fwd + bwd) |
| final train loss | {s['final_train_loss']:.4f} (mean of last logged steps) |
| validation loss | {s['val_loss']:.4f} (held-out captions, t in 0.1..0.9, grid {'x'.join(map(str, a.sample_grid))}); random init: {s['val_loss_random_init']:.4f} |

![loss](loss.png)

## Samples

{a.sample_steps} Euler steps, no guidance, grid {'x'.join(map(str, a.sample_grid))}, seed 0. Each caption: a data example, then the
model's sample from the same caption (the last four captions were never trained on).

![samples](samples.png)

## Attention structure (trained vs random init)

Self-attention (`{SELF_ATTENTION_PATH}`) statistics at noise level t (input: x_t of held-out toy videos),
mean over {len(stats_mid)} layers x {TINY_WAN_CONFIG['num_attention_heads']} heads, grid {'x'.join(map(str, a.sample_grid))} pixels = {'x'.join(map(str, token_grid(a.sample_grid)))} tokens.
`entropy_norm`: entropy / log S (1 = uniform); `frame<k>`: softmax mass within k latent frames;
`radius<r>`: mass within r tokens spatially (any frame); `blocks<R>`: fraction of 128-token KV
blocks a query block needs to hold R of its mass (lower = more block-sparse). `uniform` is chance.

{attn_table}
Per head at t = 0.5:

{per_head_table(stats_mid)}
Reproduce: `python -m scaling_attn_compile.tiny.attention_stats --model <this dir> --grid {'x'.join(map(str, a.sample_grid))}`.

## Command

`{a.command}`
(seed {a.seed}; all arguments, resolved, in `train_log.json`).

## Limitations

Toy data, tiny model, minutes of training: samples are blurry and motion is approximate; it is a
test subject for attention sparsity, not a video generator. Only grids with even H, W; RoPE covers
up to 1024 positions per axis. The weights are the EMA, rounded to fp16.
"""
    (out / "README.md").write_text(card)


def main(argv=None) -> dict:
    a = parse_args(argv)
    s = train(a)
    print(json.dumps({k: s[k] for k in ("steps", "train_seconds", "final_train_loss", "val_loss",
                                         "val_loss_random_init", "params", "total_seconds")}, indent=1))
    return s


if __name__ == "__main__":
    main()
