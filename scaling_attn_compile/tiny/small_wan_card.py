"""small-wan's model card: validation, samples, attention structure, README.md.

Runs at the end of ``train_small_wan`` on the training device, on the weights as shipped (fp16,
reloaded), at the native grid on CUDA (< 1 min on an H200: 30 Euler steps of 4 videos, and 4
forwards with q/k capture). Also usable alone::

    python -m scaling_attn_compile.tiny.small_wan_card --model DIR --device cuda   # prints the structure
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from ..models.wan import SELF_ATTENTION_PATH, compute_weight
from . import photo_video as pv
from .attention_stats import collect_qk, head_stats, markdown_table, summarize
from .small_wan import (
    BLOCK,
    SmallCaptionEncoder,
    caption_encoder,
    generate,
    load_small_wan,
    num_blocks,
    token_grid,
)
from .tiny_wan import WEIGHTS_NAME, initial_noise

# A head's class from two masses (0.5 = most of its softmax mass): near in time (|df| <= 1 latent
# frame, ``frame1``) and near in space (<= 4 tokens = 16 pixels, any frame, ``radius4``).
# Both -> local; time only -> spatial (whole nearby frames); space only -> temporal (the same
# place across the clip); neither -> global.
CLASSES = ("local", "spatial", "temporal", "global")
METRICS = ("entropy_norm", "frame0", "frame1", "radius1", "radius2", "radius4", "blocks0.9",
           "blocks0.99", "top25")


def head_class(frame1: float, radius4: float, thr: float = 0.5) -> str:
    near_t, near_s = frame1 >= thr, radius4 >= thr
    return CLASSES[0] if near_t and near_s else CLASSES[1] if near_t else CLASSES[2] if near_s else CLASSES[3]


def class_shares(stats: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Share of (layer, head) pairs in each of ``CLASSES``."""
    labels = [head_class(s["frame1"][h].item(), s["radius4"][h].item())
              for s in stats.values() for h in range(len(s["frame1"]))]
    return {c: labels.count(c) / len(labels) for c in CLASSES}


@torch.no_grad()
def attention_stats(model, grid, t: float, *, n: int = 2, seed: int = 0, encoder=None):
    """``{layer: {metric: (H,)}}`` at noise level t on x_t of ``n`` held-out photo videos."""
    p = compute_weight(model)
    enc = encoder or SmallCaptionEncoder.default()
    x0, caps = pv.sample_batch(seed, n, grid, p.device, held_out=True)
    xt = ((1 - t) * x0 + t * initial_noise(n, grid, seed + 10_000).to(p.device)).to(p.dtype)
    with collect_qk(model) as qk:
        model(hidden_states=xt, timestep=torch.full((n,), 1000.0 * t, device=p.device),
              encoder_hidden_states=enc(caps, device=p.device, dtype=p.dtype), return_dict=False)
    big = 1 << 26 if p.device.type == "cuda" else 1 << 22
    return {i: head_stats(q, k, token_grid(grid), max_elems=big) for i, (q, k) in sorted(qk.items())}


def chance_stats(tgrid, device) -> dict[str, float]:
    """The metrics under uniform attention (q = k = 0), computed on ``device``: the same numbers
    as ``attention_stats.uniform_stats`` (which loops on the CPU: 76 s at 16,384 tokens on 2 cores)."""
    z = torch.zeros(1, 1, math.prod(tgrid), 1, device=device)
    big = 1 << 26 if torch.device(device).type == "cuda" else 1 << 22
    return {m: v.item() for m, v in head_stats(z, z, tgrid, max_elems=big).items()}


def random_init_like(directory: Path, device, dtype, seed: int = 0) -> WanTransformer3DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(str(directory)))
    m.to(device)
    keep = set(WanTransformer3DModel._keep_in_fp32_modules)  # as load_small_wan: these stay fp32
    for name, prm in m.named_parameters():
        if not keep.intersection(name.split(".")):
            prm.data = prm.data.to(dtype)
    return m.eval()


def finish(out: Path, a, summary: dict, history: list[dict], runs: list[dict], encoder, device, val_loss) -> None:
    from .train_tiny import plot_loss, plot_samples

    t0 = time.time()
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = load_small_wan(device, dtype, path=out)
    rand = random_init_like(out, device, dtype)
    grid = a.card_grid
    summary["val_loss"] = val_loss(model, grid, device, encoder)
    summary["val_loss_random_init"] = val_loss(rand, grid, device, encoder)
    plot_loss(out / "loss.png", history)
    caps = pv.held_out_prompts(4)
    vids = generate(model, caps, grid, steps=a.sample_steps, seed=0, encoder=encoder)
    data, _ = pv.sample_batch(0, len(caps), grid, device, captions=caps)
    plot_samples(out / "samples.png", caps, vids, data, held=set(caps), frames=6)
    tg = token_grid(grid)
    cols, shares, per_t = {"uniform": chance_stats(tg, device)}, {}, {}
    for t in (0.9, 0.5, 0.1):
        per_t[t] = attention_stats(model, grid, t, encoder=encoder)
        cols[f"trained t={t:g}"] = summarize(per_t[t])
        shares[f"trained t={t:g}"] = class_shares(per_t[t])
    rs = attention_stats(rand, grid, 0.5, encoder=encoder)
    cols["random init t=0.5"], shares["random init t=0.5"] = summarize(rs), class_shares(rs)
    summary["attention"], summary["head_classes"] = cols, shares
    summary["attention_per_head_t0.5"] = {str(i): {m: v.tolist() for m, v in s.items()} for i, s in per_t[0.5].items()}
    summary["card_seconds"] = time.time() - t0
    write_card(out, a, summary, runs, cols, shares, per_t[0.5])


def _per_head(stats) -> str:
    ms = ("frame1", "radius4", "blocks0.9", "top25")
    lines = ["| layer | head | class | " + " | ".join(ms) + " |", "|---|---|---|" + "---|" * len(ms)]
    for i, s in stats.items():
        for h in range(len(s["frame1"])):
            c = head_class(s["frame1"][h].item(), s["radius4"][h].item())
            lines.append(f"| {i} | {h} | {c} | " + " | ".join(f"{s[m][h].item():.3f}" for m in ms) + " |")
    return "\n".join(lines) + "\n"


def write_card(out: Path, a, s: dict, runs: list[dict], cols, shares, stats_mid) -> None:
    cfg = WanTransformer3DModel.load_config(str(out))
    size_mb = (out / WEIGHTS_NAME).stat().st_size / 1e6
    g = "x".join(map(str, a.card_grid))
    tg = token_grid(a.card_grid)
    grids = ", ".join("x".join(map(str, x)) for x in a.grids)
    train = ", ".join(f"{f} ({w})" for f, w in pv.PHOTOS.items() if f in pv.TRAIN_PHOTOS)
    held = ", ".join(f"{f} ({pv.PHOTOS[f]})" for f in pv.HELD_OUT_PHOTOS)
    run_rows = "\n".join(
        f"| {r['index']} | {r.get('start_step', 0)} -> {r.get('end_step', '?')} | {r.get('loop_seconds', 0) / 60:.1f} min "
        f"| {r.get('device', '?')} | {'resumed' if r.get('resumed_from') else 'from scratch'} |" for r in runs)
    share_rows = "\n".join(f"| {k} | " + " | ".join(f"{v[c]:.0%}" for c in CLASSES) + " |" for k, v in shares.items())
    card = f"""# small-wan: a {s['params'] / 1e6:.2f}M-parameter Wan2.1 video DiT at 128 mask blocks per video

A diffusers `WanTransformer3DModel` ({cfg['num_layers']} layers, {cfg['num_attention_heads']} heads x
{cfg['attention_head_dim']}, FFN {cfg['ffn_dim']}, patch {tuple(cfg['patch_size'])}, text_dim {cfg['text_dim']}),
trained here from scratch so that block-sparse attention can be studied at realistic block
granularity: its native video, {g} pixels = {'x'.join(map(str, tg))} tokens = {math.prod(tg):,} tokens,
is **{num_blocks(a.card_grid)} blocks of {BLOCK}** (tiny-wan: 16; Wan2.1: 256-591).
Weights: `diffusion_pytorch_model.safetensors`, fp16 EMA, {size_mb:.1f} MB. Load with
`scaling_attn_compile.tiny.small_wan.load_small_wan(device, dtype, path=...)` or
`WanTransformer3DModel.from_pretrained(path)`.

## Architecture and why

- **Pixel space, no VAE**: RGB in [-1, 1] is the latent; the (1, 4, 4) patch embedding is the
  only compression. A VAE would need weights we cannot download, or a second training run.
- **Width 256, 8 layers, FFN 640**: 32 self-attention heads for WEST/FAST to tell apart; fp16
  weights under the 16 MB a GPU run returns per file. At 16,384 tokens attention is ~92% of the
  FLOPs, so a narrower FFN costs little time; the head dim 64 keeps Wan's 3D RoPE split.
- **Text**: a fixed seeded word table (`caption_encoder.safetensors`, {len(pv.VOCAB)} words, 64-d,
  up to {pv.MAX_WORDS} words; `""` = null caption), never trained.
- **Sampling**: rectified-flow Euler, `timestep = 1000 t` (`small_wan.generate`).

## Data (`scaling_attn_compile.tiny.photo_video`, generated on the fly)

Photographs shipped inside the scikit-image wheel (`skimage/data/`, read with Pillow; nothing
downloaded), centre-cropped square. Videos: a camera window pans, zooms, rotates or combines a
zoom/rotation with a pan (linear trajectories), a soft elliptical crop of another photo floats in
front with 1.6-2.4x parallax, and 60% of videos carry a striped procedural shape (toy_video's)
moving left/right/up/down. Captions: e.g. "coffee photo, camera pans left, red circle moving up".

- training photos: {train}
- held-out photos (never seen, also not as foreground): {held}
- held-out camera motions (compounds of trained words): {', '.join(pv.HELD_OUT_MOTIONS)}
- grids (F x H x W pixels) cycled per step: {grids}

## Training

| | |
|---|---|
| objective | rectified flow, predict noise - x0, MSE; t logit-normal 80% / uniform 20%; captions dropped 10% |
| optimizer | AdamW lr {a.lr:g}, warm-up then cosine to 10% per run, wd {a.weight_decay}, clip 1, EMA {a.ema} (saved) |
| batch | {a.batch or f'{a.batch_tokens:,} tokens per step'} |
| steps | {s['total_steps']} in {len(runs)} run(s) (this run {s['steps']}) |
| device | {s['device']}, torch {s['torch']}{', bf16 autocast, per-block torch.compile' if 'cuda' in str(a.device) else ', fp32 eager'} |
| throughput (this run) | {s['tokens_seen'] / max(s['train_seconds'], 1e-9):,.0f} tokens/s |
| final train loss | {s['final_train_loss']:.4f} (mean of the last logged steps) |
| validation loss | {s['val_loss']:.4f} (4 held-out videos, t in 0.1..0.9, grid {g}); random init: {s['val_loss_random_init']:.4f} |

| run | steps | loop time | device | start |
|---|---|---|---|---|
{run_rows}

![loss](loss.png)

## Samples

{a.sample_steps} Euler steps, no guidance, grid {g}, seed 0, 4 held-out prompts (unseen photo and
camera motion). Each row: a data video for the caption, then the model's sample; 6 frames each.

![samples](samples.png)

## Attention structure

Self-attention (`{SELF_ATTENTION_PATH}`) at noise level t, input x_t of 2 held-out videos, grid {g}.
Head classes by where most (>= 50%) of a head's softmax mass lies: **local** = within 1 latent
frame and 4 tokens (16 px); **spatial** = within 1 frame, spread in space; **temporal** = within
4 tokens of the same place across frames; **global** = neither. Chance (uniform attention) at
this grid: frame1 {cols['uniform']['frame1']:.3f}, radius4 {cols['uniform']['radius4']:.3f} (the
classes mean something only where both are well below 0.5, as at the native grid: 0.180, 0.043).

| | {' | '.join(CLASSES)} |
|---|{'---|' * len(CLASSES)}
{share_rows}

Means over layers and heads. `top25`: share of a 128-row query block's pooled mass held by its
top 25% of 128-token KV blocks (as WEST measures concentration); `blocks<R>`: fraction of KV
blocks needed for recall R; `frame<k>`/`radius<r>`: mass within k frames / r tokens; `uniform` is chance.

{markdown_table(cols, METRICS)}
Per head at t = 0.5:

{_per_head(stats_mid)}
## Command

`{a.command}`

## Limitations

Minutes of training on ~14 photographs: samples are blurry and motion approximate; a test subject
for attention sparsity at 128 blocks, not a video generator. H, W must be multiples of 4.
"""
    (out / "README.md").write_text(card)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Attention structure of a small-wan folder.")
    ap.add_argument("--model", default=None, help="small-wan folder (default: shipped)")
    ap.add_argument("--grid", default="16x128x128")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    grid = tuple(int(v) for v in a.grid.lower().split("x"))
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    model = load_small_wan(a.device, dtype, path=a.model)
    cols, shares = {"uniform": chance_stats(token_grid(grid), a.device)}, {}
    for t in (0.9, 0.5, 0.1):
        st = attention_stats(model, grid, t, encoder=caption_encoder(a.model))
        cols[f"t={t:g}"], shares[f"t={t:g}"] = summarize(st), class_shares(st)
    print(markdown_table(cols, METRICS))
    for k, v in shares.items():
        print(k, {c: f"{x:.0%}" for c, x in v.items()})


if __name__ == "__main__":
    main()
