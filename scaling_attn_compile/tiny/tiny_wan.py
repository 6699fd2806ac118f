"""The tiny Wan: a ~7M-parameter diffusers ``WanTransformer3DModel`` trained here on toy videos.

No model weights can be downloaded here and random weights have no attention structure, so this
model (trained by ``train_tiny.py`` on ``toy_video``) is what quality studies, the demo and tests
use. It is a real ``WanTransformer3DModel`` (Wan2.1 block structure: self-attention with 3D RoPE
and RMS q/k norm, cross-attention to text, AdaLN time modulation), just small.

- **No VAE.** ``in_channels = out_channels = 3``: the "latents" are the RGB pixels in ``[-1, 1]``,
  ``(B, 3, F, H, W)``. Patch ``(1, 2, 2)``, so the token grid of a ``(F, H, W)`` video is
  ``(F, H/2, W/2)``; 8x32x32 pixels -> 8x16x16 = 2048 tokens = 16 blocks of 128.
- **Text** is a fixed, seeded word-embedding table over the toy grammar's vocabulary
  (``CaptionEncoder``): a caption becomes ``(T, text_dim) = (8, 64)``, one row per word, zero
  rows as padding. It is saved next to the weights and never trained.
- **Sampling** is rectified-flow Euler: ``x_t = (1 - t) x0 + t noise``, the model predicts
  ``noise - x0`` and is called with ``timestep = 1000 t`` (as Wan pipelines do).

Public API::

    model = load_tiny_wan(device, dtype)          # shipped weights (assets/tiny-wan/)
    emb = encode_captions(["red square moving left"])            # (B, 8, 64)
    video = generate(model, captions, grid=(8, 32, 32), steps=20, seed=0,
                     transformer=torch.compile(model, backend=...))  # (B, 3, 8, 32, 32)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from ..models.wan import compute_dtype, compute_weight
from .toy_video import VOCAB

ASSET_DIR = Path(__file__).parent.parent / "assets" / "tiny-wan"
"""Where the shipped weights live (``config.json``, ``diffusion_pytorch_model.safetensors``,
``caption_encoder.safetensors``, ``README.md``)."""

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' name: from_pretrained(dir) works
ENCODER_NAME = "caption_encoder.safetensors"

# 4 heads x 64 = 256 wide, 6 layers, FFN 4x: 6.9M parameters. head_dim 64 keeps Wan's 3D RoPE
# split useful (24 temporal + 20 + 20 spatial channels); 6 layers x 4 heads = 24 heads give WEST
# and FAST some per-layer/per-head variety. Stored as fp16 (13.9 MB <= 20 MB budget).
TINY_WAN_CONFIG: dict = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=3,
    out_channels=3,
    text_dim=64,
    freq_dim=128,
    ffn_dim=1024,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
PATCH = (1, 2, 2)


def make_tiny_wan(seed: int = 0, **overrides) -> WanTransformer3DModel:
    """A freshly initialised tiny Wan (fp32, CPU), deterministic in ``seed``.

    ``overrides`` replace ``TINY_WAN_CONFIG`` entries (tests use e.g. ``num_layers=1``).
    """
    unknown = set(overrides) - set(TINY_WAN_CONFIG)
    if unknown:
        raise ValueError(f"overrides: unknown config keys {sorted(unknown)}; known: {sorted(TINY_WAN_CONFIG)}")
    cfg = {**TINY_WAN_CONFIG, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**cfg)


def token_grid(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Pixel grid ``(F, H, W)`` -> token grid ``(F, H/2, W/2)`` after the ``(1, 2, 2)`` patch."""
    F, H, W = grid
    if H % PATCH[1] or W % PATCH[2]:
        raise ValueError(f"grid: H and W must be even for patch {PATCH}, got (F, H, W) = {grid}; "
                         f"use e.g. ({F}, {H + H % 2}, {W + W % 2})")
    return F // PATCH[0], H // PATCH[1], W // PATCH[2]


# ----------------------------------------------------------------------------- captions


class CaptionEncoder:
    """Fixed word-level caption encoder: caption -> ``(max_len, text_dim)``.

    Each vocabulary word owns one row of a seeded ``N(0, 1)`` table; a caption is its words' rows
    in order, zero-padded to ``max_len``. The empty caption ``""`` is all zeros: the null
    condition that training drops captions to, for classifier-free guidance. Unknown words raise.
    """

    def __init__(self, vocab: tuple[str, ...] | list[str], table: torch.Tensor, max_len: int):
        if table.shape[0] != len(vocab):
            raise ValueError(f"table: expected {len(vocab)} rows (one per word), got {tuple(table.shape)}")
        self.vocab = tuple(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.table = table.float()
        self.max_len = max_len

    @property
    def text_dim(self) -> int:
        return self.table.shape[1]

    @classmethod
    def default(cls, text_dim: int = 64, max_len: int = 8, seed: int = 1234) -> CaptionEncoder:
        """The encoder the tiny Wan is trained with (``VOCAB``, seeded table)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        return cls(VOCAB, torch.randn(len(VOCAB), text_dim, generator=g), max_len)

    def __call__(self, captions: list[str], device=None, dtype=torch.float32) -> torch.Tensor:
        """``captions`` (B strings) -> ``(B, max_len, text_dim)``."""
        if isinstance(captions, str):
            raise TypeError("captions: expected a list of strings, got one string; wrap it: [caption]")
        out = torch.zeros(len(captions), self.max_len, self.text_dim)
        for b, cap in enumerate(captions):
            words = cap.lower().split()
            if len(words) > self.max_len:
                raise ValueError(f"caption {cap!r}: {len(words)} words, at most {self.max_len}")
            for j, w in enumerate(words):
                if w not in self.index:
                    raise ValueError(f"caption {cap!r}: unknown word {w!r}; vocabulary: {list(self.vocab)}")
                out[b, j] = self.table[self.index[w]]
        return out.to(device=device, dtype=dtype)

    def save(self, directory: str | Path) -> None:
        meta = {"vocab": json.dumps(list(self.vocab)), "max_len": str(self.max_len)}
        save_file({"table": self.table.contiguous()}, str(Path(directory) / ENCODER_NAME), metadata=meta)

    @classmethod
    def load(cls, directory: str | Path) -> CaptionEncoder:
        from safetensors import safe_open

        path = Path(directory) / ENCODER_NAME
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            table = f.get_tensor("table")
        return cls(json.loads(meta["vocab"]), table, int(meta["max_len"]))


_ENCODERS: dict[str, CaptionEncoder] = {}


def caption_encoder(path: str | Path | None = None) -> CaptionEncoder:
    """The caption encoder saved at ``path`` (default: the shipped model's, else the default one)."""
    p = Path(path) if path is not None else ASSET_DIR
    key = str(p.resolve())
    if key not in _ENCODERS:
        _ENCODERS[key] = CaptionEncoder.load(p) if (p / ENCODER_NAME).exists() else CaptionEncoder.default()
    return _ENCODERS[key]


def encode_captions(captions: list[str], device=None, dtype=torch.float32,
                    path: str | Path | None = None) -> torch.Tensor:
    """Captions -> ``encoder_hidden_states`` ``(B, T, text_dim)`` = ``(B, 8, 64)`` for the tiny Wan.

    ``""`` gives the null (unconditional) embedding. ``path``: a model directory whose saved
    encoder to use (default: the shipped one; identical to ``CaptionEncoder.default()``).
    """
    return caption_encoder(path)(captions, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- save / load


def save_tiny_wan(model: WanTransformer3DModel, directory: str | Path,
                  encoder: CaptionEncoder | None = None, dtype=torch.float16) -> Path:
    """Write ``config.json``, fp16 ``diffusion_pytorch_model.safetensors`` and the caption encoder.

    The folder loads with ``load_tiny_wan(path=directory)`` and with diffusers'
    ``WanTransformer3DModel.from_pretrained(directory)``. fp16, not bf16: the same 2 bytes but
    8x finer mantissa; the trained weights are far inside fp16's range.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
    model.save_config(str(d))
    (encoder or CaptionEncoder.default()).save(d)
    return d


def load_tiny_wan(device="cpu", dtype=torch.float32, path: str | Path | None = None) -> WanTransformer3DModel:
    """The trained tiny Wan from ``path`` (default ``assets/tiny-wan/``), in eval mode.

    Weights are stored fp16 and cast to ``dtype``; as in diffusers' ``from_pretrained``, the
    modules Wan keeps in fp32 (``_keep_in_fp32_modules``: time embedder, norms, modulation tables)
    stay fp32 when ``dtype`` is fp16/bf16.
    """
    d = Path(path) if path is not None else ASSET_DIR
    if not (d / WEIGHTS_NAME).exists():
        raise FileNotFoundError(
            f"path: no {WEIGHTS_NAME} in {d}; train one with "
            f"`python -m scaling_attn_compile.tiny.train_tiny --out {d} --device cuda --minutes 7.5`"
        )
    config = WanTransformer3DModel.load_config(str(d))
    model = WanTransformer3DModel.from_config(config)
    state = load_file(str(d / WEIGHTS_NAME))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.to(device=device)
    if dtype != torch.float32:
        # diffusers' rule: a parameter whose dotted name has a part in _keep_in_fp32_modules
        # (rope, time_embedder, scale_shift_table, norm1/2/3) stays fp32.
        keep = set(WanTransformer3DModel._keep_in_fp32_modules)
        for name, p in model.named_parameters():
            if not keep.intersection(name.split(".")):
                p.data = p.data.to(dtype)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- sampling


def sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Noise levels ``t`` from 1 to 0, ``(steps + 1,)``; ``shift > 1`` spends more steps at high
    noise (``t' = s t / (1 + (s - 1) t)``, the schedule of Wan/SD3's flow-matching scheduler)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def initial_noise(n: int, grid: tuple[int, int, int], seed: int, channels: int = 3) -> torch.Tensor:
    """``(n, C, F, H, W)`` float32 CPU noise; sample ``i`` is drawn from ``seed + i`` alone, so a
    caption's video does not depend on what it is batched with, nor on the device."""
    F, H, W = grid
    return torch.stack([
        torch.randn(channels, F, H, W, generator=torch.Generator(device="cpu").manual_seed(seed + i))
        for i in range(n)
    ])


@torch.no_grad()
def generate(model: WanTransformer3DModel, captions: list[str], grid: tuple[int, int, int] = (8, 32, 32),
             steps: int = 20, seed: int = 0, transformer=None, *, guidance_scale: float = 1.0,
             shift: float = 1.0, clamp: bool = True, encoder_path: str | Path | None = None,
             progress: bool = False) -> torch.Tensor:
    """Sample videos for ``captions`` with rectified-flow Euler: ``(B, 3, F, H, W)`` float32 on
    the model's device, in ``[-1, 1]`` when ``clamp``.

    grid: pixel (= latent, no VAE) size ``(F, H, W)``; H, W even. The transformer sees
    ``hidden_states (B', 3, F, H, W)``, ``timestep (B',)`` float32 in ``[0, 1000]`` and
    ``encoder_hidden_states (B', 8, 64)``, with ``B' = 2B`` under guidance (cond rows first).
    transformer: a callable with the model's signature to run instead of ``model`` (e.g. the same
    model compiled with the sparse backend); ``model`` still gives device and dtype.
    guidance_scale: classifier-free guidance (1.0 = off, one pass per step).
    seed: sample i starts from noise seeded ``seed + i`` (same noise on every device).
    """
    token_grid(grid)
    net = transformer if transformer is not None else model
    # Wan keeps some modules fp32 under bf16: ask the adapter for the compute dtype.
    device, dtype = compute_weight(model).device, compute_dtype(model)
    B = len(captions)
    x = initial_noise(B, grid, seed, model.config.in_channels).to(device)
    cond = encode_captions(captions, device=device, dtype=dtype, path=encoder_path)
    cfg = guidance_scale != 1.0
    if cfg:
        cond = torch.cat([cond, encode_captions([""] * B, device=device, dtype=dtype, path=encoder_path)])
    ts = sigmas(steps, shift).tolist()
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="generate", leave=False)
    for i in it:
        t, t_next = ts[i], ts[i + 1]
        inp = torch.cat([x, x]) if cfg else x
        timestep = torch.full((inp.shape[0],), 1000.0 * t, device=device, dtype=torch.float32)
        v = net(hidden_states=inp.to(dtype), timestep=timestep, encoder_hidden_states=cond,
                return_dict=False)[0].float()
        if cfg:
            v_c, v_u = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        x = x + (t_next - t) * v  # dx/dt = v = noise - x0; t goes 1 -> 0
    return x.clamp(-1, 1) if clamp else x


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config: dict, seq_len: int) -> float:
    """Forward FLOPs per video token (matmuls only) at sequence length ``seq_len``."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    # q, k, v, o of self-attention + q, o of cross-attention (its k, v act on 8 text tokens) + FFN
    per_block = 2 * (6 * d * d + 2 * d * config["ffn_dim"])
    return config["num_layers"] * (per_block + 4 * seq_len * d)
