"""small-wan: a Wan2.1 ``WanTransformer3DModel`` sized so that one video is 128 mask blocks.

tiny-wan's native video is 16 blocks of 128 tokens; real Wan2.1 has 256-591. small-wan is the
test subject at realistic block granularity, trained on camera moves over real photographs
(``photo_video``):

- **Pixel space, no VAE.** ``in_channels = out_channels = 3`` (RGB in ``[-1, 1]``), patch
  ``(1, 4, 4)``: the native video ``SMALL_WAN_GRID = (16, 128, 128)`` pixels is a token grid
  ``(16, 32, 32)`` = 16,384 tokens = 128 blocks of 128. A VAE would need training or weights we
  cannot download; a 4x4 patch embedding is Wan's own patchifier, just on pixels.
- **Size.** 4 heads x 64 = 256 wide, 8 layers (32 self-attention heads for WEST/FAST to tell
  apart), FFN 640: 7.47M parameters = 14.9 MB in fp16, under the 16 MB a GPU run can return per
  file. At 16,384 tokens attention is ~92% of the FLOPs (0.27 of 0.30 TFLOP per layer per sample
  forward), so the narrow FFN costs little quality per second of training.
- **Text**: a fixed seeded word table (``SmallCaptionEncoder``) over ``photo_video.VOCAB``, up to
  16 words, 64-d; ``""`` is the null caption. Saved next to the weights, never trained.
- **Sampling**: rectified-flow Euler as tiny-wan (``timestep = 1000 t``, predicts ``noise - x0``).

    model = load_small_wan("cuda", torch.bfloat16)            # assets/small-wan/ or path=...
    video = generate(model, held_out_prompts(4))              # (4, 3, 16, 128, 128)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from ..models.wan import compute_dtype, compute_weight
from . import tiny_wan
from .photo_video import MAX_WORDS, VOCAB, words
from .tiny_wan import ENCODER_NAME, WEIGHTS_NAME, CaptionEncoder, initial_noise, sigmas

ASSET_DIR = Path(__file__).parent.parent / "assets" / "small-wan"
"""Shipped weights: ``config.json``, fp16 ``diffusion_pytorch_model.safetensors``,
``caption_encoder.safetensors``, ``README.md`` (model card), plots."""

SMALL_WAN_CONFIG: dict = {
    **tiny_wan.TINY_WAN_CONFIG,
    "patch_size": (1, 4, 4),
    "num_layers": 8,
    "ffn_dim": 640,
}
PATCH = (1, 4, 4)
SMALL_WAN_GRID: tuple[int, int, int] = (16, 128, 128)
"""Native pixel grid (F, H, W): token grid (16, 32, 32) = 16,384 tokens = 128 blocks of 128."""
BLOCK = 128  # tokens per mask block (the kernel's tile)


def make_small_wan(seed: int = 0, **overrides) -> WanTransformer3DModel:
    """A freshly initialised small-wan (fp32, CPU), deterministic in ``seed``; ``overrides``
    replace ``SMALL_WAN_CONFIG`` entries (tests use e.g. ``num_layers=1``)."""
    unknown = set(overrides) - set(SMALL_WAN_CONFIG)
    if unknown:
        raise ValueError(f"overrides: unknown config keys {sorted(unknown)}; known: {sorted(SMALL_WAN_CONFIG)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**{**SMALL_WAN_CONFIG, **overrides})


def token_grid(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Pixel grid ``(F, H, W)`` -> token grid ``(F, H/4, W/4)`` after the ``(1, 4, 4)`` patch."""
    F, H, W = grid
    if H % PATCH[1] or W % PATCH[2] or min(grid) < 1:
        raise ValueError(f"grid: H and W must be positive multiples of 4 for patch {PATCH}, got (F, H, W) = "
                         f"{grid}; use e.g. ({F}, {-(-H // 4) * 4}, {-(-W // 4) * 4})")
    return F // PATCH[0], H // PATCH[1], W // PATCH[2]


def num_blocks(grid: tuple[int, int, int] = SMALL_WAN_GRID) -> int:
    """Mask blocks (of 128 tokens, last one partial) per video at pixel ``grid``."""
    return -(-math.prod(token_grid(grid)) // BLOCK)


# ----------------------------------------------------------------------------- captions


class SmallCaptionEncoder(CaptionEncoder):
    """tiny-wan's fixed word-table encoder over ``photo_video.VOCAB``; commas separate words."""

    @classmethod
    def default(cls, text_dim: int = 64, max_len: int = MAX_WORDS, seed: int = 4321) -> SmallCaptionEncoder:
        g = torch.Generator(device="cpu").manual_seed(seed)
        return cls(VOCAB, torch.randn(len(VOCAB), text_dim, generator=g), max_len)

    def __call__(self, captions: list[str], device=None, dtype=torch.float32) -> torch.Tensor:
        if isinstance(captions, str):
            raise TypeError("captions: expected a list of strings, got one string; wrap it: [caption]")
        return super().__call__([" ".join(words(c)) for c in captions], device=device, dtype=dtype)


def caption_encoder(path: str | Path | None = None) -> SmallCaptionEncoder:
    """The encoder saved in ``path`` (default: the shipped model's), else the default one."""
    p = Path(path) if path is not None else ASSET_DIR
    return SmallCaptionEncoder.load(p) if (p / ENCODER_NAME).exists() else SmallCaptionEncoder.default()


def encode_captions(captions: list[str], device=None, dtype=torch.float32,
                    path: str | Path | None = None) -> torch.Tensor:
    """Caption embeddings ``(B, MAX_WORDS, text_dim)`` from the encoder saved with the model."""
    return caption_encoder(path)(captions, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- save / load


def save_small_wan(model: WanTransformer3DModel, directory: str | Path,
                   encoder: CaptionEncoder | None = None, dtype=torch.float16) -> Path:
    """fp16 weights + ``config.json`` + caption encoder: a folder that
    ``WanTransformer3DModel.from_pretrained`` and ``load_small_wan(path=...)`` both read."""
    return tiny_wan.save_tiny_wan(model, directory, encoder or SmallCaptionEncoder.default(), dtype)


def load_small_wan(device="cpu", dtype=torch.float32, path: str | Path | None = None) -> WanTransformer3DModel:
    """small-wan from ``path`` (default ``assets/small-wan/``), eval mode; fp32 modules as diffusers."""
    d = Path(path) if path is not None else ASSET_DIR
    if not (d / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"path: no {WEIGHTS_NAME} in {d}; train one with `python -m "
                                f"scaling_attn_compile.tiny.train_small_wan --out {d} --device cuda --minutes 7`")
    return tiny_wan.load_tiny_wan(device, dtype, path=d)


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(model: WanTransformer3DModel, captions: list[str], grid: tuple[int, int, int] = SMALL_WAN_GRID,
             steps: int = 30, seed: int = 0, transformer=None, *, guidance_scale: float = 1.0,
             shift: float = 1.0, clamp: bool = True, encoder: CaptionEncoder | None = None) -> torch.Tensor:
    """Rectified-flow Euler samples for ``captions``: ``(B, 3, F, H, W)`` float32 on the model's
    device. Same conventions as ``tiny_wan.generate`` (sample i from noise seeded ``seed + i``;
    ``transformer`` replaces ``model`` for the forward, e.g. the sparse-compiled one; guidance
    batches cond rows first). ``encoder``: default ``SmallCaptionEncoder.default()``."""
    token_grid(grid)
    net = transformer if transformer is not None else model
    device, dtype = compute_weight(model).device, compute_dtype(model)
    enc = encoder or SmallCaptionEncoder.default()
    B = len(captions)
    x = initial_noise(B, grid, seed, model.config.in_channels).to(device)
    cond = enc(captions, device=device, dtype=dtype)
    cfg = guidance_scale != 1.0
    if cfg:
        cond = torch.cat([cond, enc([""] * B, device=device, dtype=dtype)])
    ts = sigmas(steps, shift).tolist()
    for i in range(steps):
        inp = torch.cat([x, x]) if cfg else x
        timestep = torch.full((inp.shape[0],), 1000.0 * ts[i], device=device, dtype=torch.float32)
        v = net(hidden_states=inp.to(dtype), timestep=timestep, encoder_hidden_states=cond,
                return_dict=False)[0].float()
        if cfg:
            v_c, v_u = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        x = x + (ts[i + 1] - ts[i]) * v  # dx/dt = noise - x0; t goes 1 -> 0
    return x.clamp(-1, 1) if clamp else x
