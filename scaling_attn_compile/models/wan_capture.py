"""Capture of self-attention q/k in a diffusers Wan transformer, by swapping the attention
processor of every self-attention layer (the adapter's processor swap).

:func:`capture_qk` (context manager): installs a capturing processor on every self-attention
layer (``blocks.<i>.attn1``). Each forward call of the transformer then hands your callback a
:class:`LayerCapture` per layer: ``q, k`` ``(B, H, S, D)`` exactly as diffusers'
``WanAttnProcessor`` feeds them to SDPA (projection, RMS norm, RoPE), plus the latent grid and
whatever step info the driver put in the state. The original processor then runs unchanged,
so the model's output is bit-identical. Cost: the q/k projections, norms and RoPE run twice.
The driver that denoises and captures is :func:`..offline.calibrate.capture_self_attention`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .fingerprint import _unwrap
from .wan import Grid, latent_token_grid


@dataclass
class LayerCapture:
    """What a capture callback receives for one self-attention call.

    ``q, k``: ``(B, H, S, D)`` views (of ``(B, S, H, D)`` memory) in the model's dtype, as SDPA
    receives them. ``grid``: token grid ``(F, H, W)``, ``S = F * H * W``. The rest is the
    driver's state (``None`` when you run the model yourself without setting it).
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    grid: Grid | None
    input_index: int | None = None
    step_index: int | None = None
    timestep: float | None = None
    branch: str = ""
    v: torch.Tensor | None = None  # (B, H, S, D) like q/k; FAST's output-error profile reads it


@dataclass
class CaptureState:
    """Mutable state of a :func:`capture_qk` session; the driver sets the step fields."""

    enabled: bool = True
    grid: Grid | None = None
    input_index: int | None = None
    step_index: int | None = None
    timestep: float | None = None
    branch: str = ""
    calls: int = 0
    extra: dict = field(default_factory=dict)


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor):
    # Same arithmetic as the closure inside diffusers' WanAttnProcessor.__call__ (0.42).
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def self_attention_qkv(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, ...]:
    """q, k, v ``(B, H, S, D)`` of a ``WanAttention`` self-attention call, as diffusers computes
    them: projections (fused or not), ``norm_q``/``norm_k`` across heads, head split, RoPE."""
    try:  # diffusers' own helper, so fused projections behave identically
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections
        q, k, v = _get_qkv_projections(attn, hidden_states, None)
    except ImportError:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
    v = v.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        q = _apply_rotary_emb(q, *rotary_emb)
        k = _apply_rotary_emb(k, *rotary_emb)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def self_attention_qk(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, ...]:
    """q, k of :func:`self_attention_qkv`."""
    return self_attention_qkv(attn, hidden_states, rotary_emb)[:2]


class _CaptureProcessor:
    """Wraps a layer's original processor: computes q/k/v, calls back, then runs the original."""

    def __init__(self, original, layer: int, state: CaptureState, on_layer: Callable):
        self.original, self.layer, self.state, self.on_layer = original, layer, state, on_layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):
        s = self.state
        if s.enabled and encoder_hidden_states is None:  # self-attention only
            with torch.no_grad():
                q, k, v = self_attention_qkv(attn, hidden_states, rotary_emb)
            s.calls += 1
            self.on_layer(LayerCapture(self.layer, q, k, s.grid, s.input_index, s.step_index,
                                       s.timestep, s.branch, v))
            del q, k, v
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                             rotary_emb, **kwargs)


@contextlib.contextmanager
def capture_qk(transformer, on_layer: Callable[[LayerCapture], None], *,
               layers: Sequence[int] | None = None) -> Iterator[CaptureState]:
    """Capture self-attention q/k of ``blocks.<i>.attn1`` during the ``with`` block.

    ``on_layer(LayerCapture)`` runs synchronously inside the forward, once per (call, layer), so
    q/k of one layer at a time are alive (14B at 720p: 2 x 774 MB in bf16). Set
    ``state.enabled = False`` to run forwards without capturing. The original processors are
    restored on exit, even on error. The grid is read from each forward's ``hidden_states``.
    """
    model = _unwrap(transformer)
    state = CaptureState()
    chosen = range(len(model.blocks)) if layers is None else list(layers)
    originals = {}

    def grid_hook(module, args, kwargs):
        hs = args[0] if args else kwargs.get("hidden_states")
        if hs is not None and hs.dim() == 5:
            state.grid = latent_token_grid(module, hs.shape)

    handle = model.register_forward_pre_hook(grid_hook, with_kwargs=True)
    try:
        for i in chosen:
            attn = model.blocks[i].attn1
            originals[i] = attn.processor
            attn.processor = _CaptureProcessor(attn.processor, i, state, on_layer)
        yield state
    finally:
        handle.remove()
        for i, proc in originals.items():
            model.blocks[i].attn1.processor = proc
