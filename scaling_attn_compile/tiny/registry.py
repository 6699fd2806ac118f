"""The bundled models by name: loader, caption encoder, sampler, prompts, grid (the demo and the
quality study run them through this).

    spec = get_model("tiny-wan")                   # or "small-wan", or get_model(name, path=DIR)
    model = spec.load("cuda", torch.bfloat16)
    video = spec.generate(model, spec.held_out(8), grid=spec.native_grid, steps=50, seed=0)

Each entry is a :class:`BundledModel`. What the demo and the study need of a model:

* ``load(device, dtype)`` -> a diffusers ``WanTransformer3DModel`` in eval mode;
* ``encode(captions, device, dtype)`` -> ``encoder_hidden_states (B, T, text_dim)``;
* ``generate(model, captions, grid=, steps=, seed=, transformer=, guidance_scale=, shift=)`` ->
  videos ``(B, C, F, H, W)`` float32, sample ``i`` from noise seeded ``seed + i``, the transformer
  called with ``timestep = timesteps(steps, shift)[j]`` at step ``j`` (calibration replays that
  trajectory);
* ``held_out(n)``: ``n`` prompts no calibration sees; ``training_pool()``: training captions,
  from which calibration draws;
* ``native_grid``: the (pixel = latent, or latent) grid ``generate`` takes, ``token_grid(grid)``
  the token grid after patching; ``steps``: the study's default step count.

"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class BundledModel:
    name: str
    path: Path  # the weights folder (config.json, weights, caption encoder, README.md card)
    weights_name: str
    native_grid: tuple[int, int, int]
    steps: int
    load: Callable
    encode: Callable
    generate: Callable
    timesteps: Callable[..., list[float]]
    token_grid: Callable
    held_out: Callable[[int], list[str]]
    training_pool: Callable[[], list[str]]

    def training(self, n: int) -> list[str]:
        """``n`` training captions spread over the pool (the tiny-wan demo's choice:
        ``pool[(i * N // n + i % 3) % N]``), deterministic in ``n``."""
        pool = self.training_pool()
        n = max(1, min(n, len(pool)))
        return [pool[((i * len(pool)) // n + i % 3) % len(pool)] for i in range(n)]

    def calibration_input(self, caption: str, seed: int, *, guidance_scale: float = 1.0):
        """One caption's calibration input; with ``guidance_scale != 1`` the null caption is its
        negative (classifier-free guidance, as ``generate`` runs it)."""
        from ..offline.calibrate import CalibrationInput

        neg = self.encode([""], "cpu", torch.float32) if guidance_scale != 1.0 else None
        return CalibrationInput(self.encode([caption], "cpu", torch.float32), seed=seed,
                                negative_prompt_embeds=neg, name=caption)

    def card(self) -> str | None:
        card = self.path / "README.md"
        return card.read_text().splitlines()[0].lstrip("# ").strip() if card.exists() else None

    def weights_sha256_16(self) -> str | None:
        w = self.path / self.weights_name
        return hashlib.sha256(w.read_bytes()).hexdigest()[:16] if w.exists() else None


def _check_n(name: str, prompts: list[str], n: int) -> list[str]:
    if n > len(prompts):
        raise ValueError(f"--prompts: {name} has {len(prompts)} held-out prompts, asked for {n}; "
                         f"pass --prompts {len(prompts)} or fewer")
    return prompts[:n]


def tiny_wan(path: Path | None = None) -> BundledModel:
    """The bundled tiny Wan (6.9M parameters, 8x32x32 pixels = 16 blocks; see its model card)."""
    from . import tiny_wan as tw
    from .toy_video import held_out_captions, train_triples

    path = Path(path) if path is not None else tw.ASSET_DIR
    return BundledModel(
        name="tiny-wan", path=path, weights_name=tw.WEIGHTS_NAME, native_grid=(8, 32, 32),
        steps=16,
        load=lambda device, dtype: tw.load_tiny_wan(device, dtype, path=path),
        encode=lambda caps, device=None, dtype=torch.float32: tw.encode_captions(
            caps, device=device, dtype=dtype, path=path),
        generate=lambda model, caps, *, grid, steps, seed, transformer=None, **kw: tw.generate(
            model, caps, grid=grid, steps=steps, seed=seed, transformer=transformer,
            encoder_path=path, **kw),
        timesteps=lambda steps, shift=1.0: [1000.0 * s
                                            for s in tw.sigmas(steps, shift).tolist()[:-1]],
        token_grid=tw.token_grid,
        held_out=lambda n: _check_n("tiny-wan", held_out_captions(), n),
        training_pool=lambda: [" ".join(t) for t in train_triples()])


def small_wan(path: Path | None = None) -> BundledModel:
    """small-wan (16x128x128 pixels, patch (1, 4, 4): 16x32x32 tokens = 128 blocks), 50 steps."""
    from . import photo_video as pv
    from . import small_wan as sw
    from . import tiny_wan as tw

    path = Path(path) if path is not None else Path(sw.ASSET_DIR)
    return BundledModel(
        name="small-wan", path=path, weights_name=sw.WEIGHTS_NAME,
        native_grid=tuple(sw.SMALL_WAN_GRID), steps=50,
        load=lambda device, dtype: sw.load_small_wan(device, dtype, path=path),
        encode=lambda caps, device=None, dtype=torch.float32: sw.encode_captions(
            caps, device=device, dtype=dtype, path=path),
        generate=lambda model, caps, *, grid, steps, seed, transformer=None, progress=False,
        **kw: sw.generate(model, caps, grid=grid, steps=steps, seed=seed, transformer=transformer,
                          encoder=sw.caption_encoder(path), **kw),
        timesteps=lambda steps, shift=1.0: [1000.0 * s
                                            for s in tw.sigmas(steps, shift).tolist()[:-1]],
        token_grid=sw.token_grid,
        held_out=lambda n: _check_n("small-wan", list(pv.held_out_prompts(max(n, 8))), n),
        training_pool=lambda: list(pv.train_captions(64)))


MODELS: dict[str, Callable[[Path | None], BundledModel]] = {
    "tiny-wan": tiny_wan,
    "small-wan": small_wan,
}


def get_model(name: str, path: Path | None = None) -> BundledModel:
    if name not in MODELS:
        raise ValueError(f"--model: expected one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](path)
