"""Dense calibration runs of a diffusers Wan transformer, capturing self-attention q/k per layer.

The capture itself (a processor swap on every self-attention layer, ``capture_qk``,
:class:`LayerCapture`) is the model family's (:func:`..models.registry.capture_for`, e.g.
:mod:`scaling_attn_compile.models.wan_capture`).
Here:

* :func:`capture_self_attention`: the driver. For each :class:`CalibrationInput` it denoises from
  seeded noise along ``timesteps`` (flow-matching Euler, Wan's sampler family: ``sigma = t /
  1000``, ``x <- x + (sigma_next - sigma) * v``, with classifier-free guidance when the input has
  negative embeddings) and captures at the chosen steps.

:func:`calibrate_west` wires this to :mod:`.west` (block mass -> threshold codes -> union) and
returns a :class:`~scaling_attn_compile.plan.plan.Plan`. FAST (issue 5) reuses :func:`capture_qk` /
:func:`capture_self_attention` with its own callback.

Also here: default timesteps and calibration inputs (random or precomputed embeddings). Model
loading, latent shapes and prompt encoding are the adapter's (:mod:`..models.registry`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..contract.masks import num_blocks
from ..models.capture import LayerCapture
from ..models.fingerprint import _unwrap
from ..models.registry import adapter_for, capture_for
from . import west

# --------------------------------------------------------------------------------------------
# Models and shapes
# --------------------------------------------------------------------------------------------


def default_timesteps(num_steps: int, shift: float = 5.0) -> list[float]:
    """Wan-style flow-matching timesteps (0..1000, descending) for ``num_steps`` steps.

    ``shift``: Wan uses 3.0 at 480p and 5.0 at 720p (diffusers docs).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if num_steps < 1:
        raise ValueError(f"default_timesteps: num_steps must be >= 1, got {num_steps}")
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(num_steps)
    return [float(t) for t in sched.timesteps]


def evenly_spaced(n_total: int, n_pick: int) -> list[int]:
    """``n_pick`` indices spread over ``range(n_total)``, first and last included."""
    if n_pick >= n_total:
        return list(range(n_total))
    if n_pick == 1:
        return [0]
    return sorted({round(i * (n_total - 1) / (n_pick - 1)) for i in range(n_pick)})


# --------------------------------------------------------------------------------------------
# Calibration inputs
# --------------------------------------------------------------------------------------------

@dataclass
class CalibrationInput:
    """One calibration prompt: text embeddings ``(1, L, text_dim)`` and the noise seed.

    With ``negative_prompt_embeds`` the denoising uses classifier-free guidance and both the
    conditional and unconditional passes are captured (branches ``"cond"`` / ``"uncond"``).
    """

    prompt_embeds: torch.Tensor
    seed: int = 0
    negative_prompt_embeds: torch.Tensor | None = None
    name: str = ""


def random_inputs(n: int, text_len: int, text_dim: int, *, seed: int = 0) -> list[CalibrationInput]:
    """``n`` inputs with Gaussian text embeddings ``(1, text_len, text_dim)`` (random-weight
    models; a trained model needs real embeddings: random ones are off its distribution)."""
    g = torch.Generator().manual_seed(seed)
    return [CalibrationInput(torch.randn(1, text_len, text_dim, generator=g), seed=seed + i,
                             name=f"random-{i}") for i in range(n)]


def load_embeddings(path, *, seed: int = 0) -> list[CalibrationInput]:
    """Precomputed prompt embeddings from a ``.safetensors`` or ``.pt`` file.

    Expected: ``prompt_embeds`` ``(N, L, text_dim)`` and optionally ``negative_prompt_embeds``
    ``(N, L, text_dim)`` or ``(1, L, text_dim)`` (shared). A ``.pt`` may also hold the bare tensor.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        data = load_file(str(path))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, torch.Tensor):
        data = {"prompt_embeds": data}
    if "prompt_embeds" not in data or data["prompt_embeds"].dim() != 3:
        raise ValueError(f"load_embeddings: {path} must hold 'prompt_embeds' (N, L, text_dim), got "
                         f"keys {sorted(data)}")
    pos, neg = data["prompt_embeds"], data.get("negative_prompt_embeds")
    out = []
    for i in range(pos.shape[0]):
        n = None if neg is None else neg[min(i, neg.shape[0] - 1)][None]
        out.append(CalibrationInput(pos[i][None], seed=seed + i, negative_prompt_embeds=n,
                                    name=f"{path.stem}-{i}"))
    return out


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------


def capture_self_attention(transformer, inputs: Sequence[CalibrationInput],
                           timesteps: Sequence[float], on_layer: Callable[[LayerCapture], None], *,
                           latent_shape: Sequence[int], capture_steps: Sequence[int] | None = None,
                           guidance_scale: float = 5.0, layers: Sequence[int] | None = None,
                           progress: bool | str = True) -> list[torch.Tensor]:
    """Denoise each input along ``timesteps`` and call ``on_layer`` for every self-attention.

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` (eval mode; its device and dtype are
            used for the run).
        inputs: calibration inputs (embeddings ``(1, L, text_dim)`` + seed).
        timesteps: descending, 0..1000 (e.g. :func:`default_timesteps`); ``sigma = t / 1000``.
        on_layer: callback, see :class:`LayerCapture`.
        latent_shape: ``(C, F, H, W)`` latents (e.g. :func:`latent_shape_for`).
        capture_steps: step indices to capture at (default all); the other steps still run, so
            the trajectory is the real one.
        guidance_scale: CFG scale, used only for inputs with negative embeddings.
        layers: layer indices to capture (default all).

    Returns:
        The final latents of each input, float32 ``(1, C, F, H, W)`` on the CPU (tests compare
        them with an uncaptured run).
    """
    model = _unwrap(transformer)
    ad = adapter_for(model, "capture_self_attention")
    device, dtype = next(model.parameters()).device, ad.compute_dtype(model)
    steps = list(timesteps)
    if len(latent_shape) != 4:
        raise ValueError(f"capture_self_attention: latent_shape must be (C, F, H, W), got "
                         f"{tuple(latent_shape)}")
    if any(b > a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"capture_self_attention: timesteps must be descending, got {steps}")
    capture = set(range(len(steps)) if capture_steps is None else capture_steps)
    finals = []
    total = len(inputs) * len(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        # progress may be the bar's label (FAST passes "FAST profile" through build_fast_plan)
        bar = tqdm(total=total, desc=progress if isinstance(progress, str) else "calibration",
                   unit="step")
    with capture_for(model).capture_qk(model, on_layer, layers=layers) as state, torch.no_grad():
        for i, inp in enumerate(inputs):
            g = torch.Generator().manual_seed(inp.seed)
            x = torch.randn(1, *latent_shape, generator=g).to(device)  # float32 trajectory
            pos = inp.prompt_embeds.to(device, dtype)
            neg = None if inp.negative_prompt_embeds is None else \
                inp.negative_prompt_embeds.to(device, dtype)
            for j, t in enumerate(steps):
                state.enabled = j in capture
                state.input_index, state.step_index, state.timestep = i, j, float(t)
                ts = torch.full((1,), float(t), device=device)
                state.branch = "cond"
                v = ad.velocity(model, x.to(dtype), ts, pos).float()
                if neg is not None:
                    state.branch = "uncond"
                    vu = ad.velocity(model, x.to(dtype), ts, neg).float()
                    v = vu + guidance_scale * (v - vu)
                sigma = t / 1000.0
                sigma_next = steps[j + 1] / 1000.0 if j + 1 < len(steps) else 0.0
                x = x + (sigma_next - sigma) * v
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(input=i, t=f"{t:.0f}", layer_calls=state.calls)
            finals.append(x.cpu())
    if bar is not None:
        bar.close()
    return finals


# --------------------------------------------------------------------------------------------
# WEST extraction
# --------------------------------------------------------------------------------------------

def calibrate_west(transformer, inputs: Sequence[CalibrationInput], timesteps: Sequence[float], *,
                   latent_shape: Sequence[int], capture_steps: Sequence[int] | None = None,
                   guidance_scale: float = 5.0, block_mass_impl: str = "auto",
                   accumulate_device=None, progress: bool = True, source: str = "",
                   token_order=None):
    """Run dense calibration and return a :class:`~scaling_attn_compile.plan.plan.Plan` (no schedule).

    For every captured (input, step, branch) and layer: ``west.block_mass`` of q/k (Triton on
    CUDA, chunked torch on CPU), threshold codes, and the running min (union) per layer. The
    accumulated codes stay on ``accumulate_device`` (default: the model's device).
    ``token_order``: which tokens share a block (``"raster"``, ``"tile"``, ``"tile:FxHxW"``;
    ``None``: raster, so code that binds a plan's masks to raster-order q/k itself keeps
    working; ``"auto"``, the CLI's and the demo's default (``token_order.NEW_PLAN_ORDER``): tile
    where the family's adapter can permute the model, raster elsewhere); q/k are permuted into
    it before block pooling.
    """
    from ..contract.token_order import TokenOrder, in_token_order
    from ..plan.plan import Plan

    model = _unwrap(transformer)
    ad = adapter_for(model, "calibrate_west")
    order = TokenOrder.for_new_plan(token_order, can_permute=ad.ORDER_SITES is not None)
    if not inputs:
        raise ValueError("calibrate_west: inputs is empty; pass at least one CalibrationInput")
    grid = ad.latent_token_grid(model, latent_shape)
    seq_len = math.prod(grid)
    param = next(model.parameters())
    acc = west.ThresholdAccumulator(ad.num_layers(model), model.config.num_attention_heads, seq_len,
                                    device=accumulate_device or param.device)

    def on_layer(cap: LayerCapture) -> None:
        acc.update(cap.layer, west.block_mass(cap.q, cap.k, impl=block_mass_impl))

    capture_self_attention(model, inputs, timesteps, in_token_order(on_layer, order),
                           latent_shape=latent_shape, capture_steps=capture_steps,
                           guidance_scale=guidance_scale, progress=progress)
    missing = [i for i, n in enumerate(acc.updates) if n == 0]
    if missing:
        raise RuntimeError(f"calibrate_west: layers {missing} were never captured; is "
                           f"{ad.SELF_ATTENTION_PATH} running a processor that bypasses __call__?")
    steps = list(timesteps)
    chosen = list(range(len(steps))) if capture_steps is None else sorted(capture_steps)
    calibration = {
        "timesteps": [steps[j] for j in chosen], "num_steps": len(steps),
        "latent_shape": list(latent_shape), "maps_per_layer": acc.updates[0],
        "guidance_scale": guidance_scale,
        "cfg": any(inp.negative_prompt_embeds is not None for inp in inputs),
        "seeds": [inp.seed for inp in inputs], "source": source,
        "nb": num_blocks(seq_len),
    }
    return Plan.from_codes(acc.codes, model, grid, len(inputs), calibration, token_order=order)
