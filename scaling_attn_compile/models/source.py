"""Where a transformer comes from, for every family (Wan, LTX-Video, HunyuanVideo): a loaded
model with its origin (:class:`ModelSource`), a diffusers folder (:func:`load_folder`) and a
built-in config with random weights (:func:`build_on_device`), and the latent shape its causal
video VAE gives a video (:func:`causal_latent_shape`).

Each family's ``load_transformer`` picks its class, VAE stride and text length and calls these;
a Hub id becomes a folder before that (:mod:`.hub`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class ModelSource:
    """A loaded transformer and where it came from.

    ``folder``: the diffusers folder (``None`` for built-in configs); ``random_weights``: True for
    built-in configs; ``vae_stride``: pixels per latent cell ``(t, h, w)``; ``text_len``: length
    of random prompt embeddings that fits the model.
    """

    transformer: torch.nn.Module
    name: str
    folder: Path | None
    random_weights: bool
    vae_stride: tuple[int, int, int]
    text_len: int = 512


def load_folder(path: Path, cls_of, *, dtype, device, num_layers: int | None, vae_stride,
                others: str, family: str, text_len: int = 512) -> ModelSource:
    """Every family's ``load_transformer`` for a diffusers folder (its ``transformer/``
    subfolder, or a bare transformer folder): ``cls_of(config_path)`` is the model class.
    ``others``: what else ``--model`` accepts, for the error naming a folder without a config."""
    if num_layers is not None:
        raise ValueError(f"load_transformer: num_layers applies to built-in configs only, got "
                         f"num_layers={num_layers} with folder {path}")
    sub = "transformer" if (path / "transformer" / "config.json").is_file() else None
    if sub is None and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"load_transformer: {path} has neither transformer/config.json nor config.json; "
            f"pass a diffusers {family} folder or {others}")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        # Without it diffusers 0.42 fails with "low_cpu_mem_usage cannot be False when
        # keep_in_fp32_modules is True", which names neither the package nor the fix.
        raise ImportError(f"load_transformer: loading the diffusers folder {path} needs the "
                          f"`accelerate` package (a dependency of scaling-attn-compile); "
                          f"pip install accelerate")
    cls = cls_of(path / (sub or "") / "config.json")
    model = cls.from_pretrained(str(path), subfolder=sub, torch_dtype=dtype)
    return ModelSource(model.to(device).eval(), path.name, path, False, vae_stride, text_len)


def build_on_device(cls, config: dict, *, dtype: torch.dtype, device) -> torch.nn.Module:
    """``cls(**config)`` with random weights, built directly on ``device`` in ``dtype`` (in eval
    mode): a 14B model in float32 would need 56 GB before any cast. Seeding is the caller's."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def causal_latent_shape(frames: int, height: int, width: int, in_channels: int,
                        vae_stride, *, vae: str = "VAE", example: str = "81 x 480 x 832"
                        ) -> tuple[int, int, int, int]:
    """Latent shape ``(C, F, H, W)`` of a video of ``frames x height x width`` pixels through a
    causal video VAE of stride ``(st, sh, sw)`` (Wan's, LTX's): ``F = (frames - 1) / st + 1``,
    ``H = height / sh``. ``vae`` and ``example`` word the error (``"LTX's VAE"``, its size)."""
    st, sh, sw = vae_stride
    if (frames - 1) % st or height % sh or width % sw:
        raise ValueError(f"latent_shape_for: need (frames - 1) % {st} == 0, height % {sh} == 0 and "
                         f"width % {sw} == 0 for {vae} stride {tuple(vae_stride)}, got "
                         f"frames={frames}, height={height}, width={width}; e.g. {example}")
    return (in_channels, (frames - 1) // st + 1, height // sh, width // sw)
