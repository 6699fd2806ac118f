"""Capture of self-attention q/k in a diffusers Wan transformer (``blocks.<i>.attn1``), through
the shared processor swap of :mod:`.capture`.

:func:`capture_qk` (context manager): each forward call of the transformer then hands your
callback a :class:`LayerCapture` per layer: ``q, k`` ``(B, H, S, D)`` exactly as diffusers'
``WanAttnProcessor`` feeds them to SDPA (projection, RMS norm, RoPE), plus the latent grid and
whatever step info the driver put in the state. The original processor then runs unchanged,
so the model's output is bit-identical. Cost: the q/k projections, norms and RoPE run twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import capture
from .capture import CaptureState, LayerCapture
from .wan import latent_token_grid

__all__ = ["CaptureState", "LayerCapture", "capture_qk", "self_attention_qk", "self_attention_qkv"]


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


def _grid(module, args, kwargs):
    hs = args[0] if args else kwargs.get("hidden_states")
    return latent_token_grid(module, hs.shape) if hs is not None and hs.dim() == 5 else None


def capture_qk(transformer, on_layer: Callable[[LayerCapture], None], *,
               layers: Sequence[int] | None = None):
    """Capture self-attention q/k of ``blocks.<i>.attn1`` during the ``with`` block (see
    :func:`.capture.capture_qk`). The grid is read from each forward's ``hidden_states``."""
    return capture.capture_qk(transformer, on_layer, layers=layers,
                              modules=lambda m: [b.attn1 for b in m.blocks], grid_of=_grid,
                              qkv=self_attention_qkv, rotary_name="rotary_emb", self_only=True)
