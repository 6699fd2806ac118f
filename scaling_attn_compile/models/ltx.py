"""The LTX-Video adapter (diffusers ``LTXVideoTransformer3DModel``): the only module that knows
LTX's module paths (``transformer_blocks.<i>.attn1`` self-attention over the video tokens,
``attn2`` cross-attention to the text, ``proj_in``, ``rope``, ``time_embed``, ``proj_out``).

What differs from Wan (``wan.py`` has the same names; the registry picks one per model/graph):

* the latents come in already packed, ``hidden_states [B, S, C]``, with the grid as Python ints
  (``num_frames, height, width`` forward arguments, in tokens: every released config has patch
  size 1). Dynamo bakes them into the graph, where :func:`find_latent_grid` reads them back from
  the ``torch.meshgrid`` of ``rope`` (its three ``arange`` sizes are ``(F, H, W)``);
* RoPE is applied inside the processor to the flat ``[B, S, H*D]`` q/k, before the head split
  (``ltx_capture.py`` computes q/k the same way);
* the timestep is ``timestep`` ``(B,)``, embedded by ``time_embed``;
* token order: raster only (``ORDER_SITES = None``; the token-order step knows Wan's Conv3d
  patch embedding and RoPE table layout, not LTX's ``proj_in`` and ``(cos, sin) [B, S, C]``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .fingerprint import _unwrap, fingerprint_tensors
from .graph import module_paths as _module_paths
from .graph import node_value as _val
from .graph import timestep_placeholder
from .source import ModelSource, build_on_device, causal_latent_shape, load_folder

Grid = tuple[int, int, int]

SUPPORTED_CLASSES: dict[str, str] = {
    "LTXVideoTransformer3DModel": "LTX-Video (text-to-video and image-to-video, 2B and 13B)",
}

# Module classes that make a Dynamo graph this family's (registry.adapter_for_graph).
GRAPH_CLASSES = ("LTXVideoTransformer3DModel", "LTXVideoTransformerBlock", "LTXAttention")

# LTX-Video 2B (Lightricks/LTX-Video transformer/config.json, 0.9.x; the class defaults of
# diffusers 0.42.1): 28 layers x 32 heads x 64, 128 latent channels, T5-XXL text (4096).
BUILTIN_CONFIGS: dict[str, dict] = {
    "ltx-video-2b": dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1,
                         num_attention_heads=32, attention_head_dim=64, cross_attention_dim=2048,
                         num_layers=28, caption_channels=4096),
}
BUILTIN_TEXT_LEN = {"ltx-video-2b": 128}  # LTXPipeline's max_sequence_length
# LTX's VAE: 8x in time (causal: F = (frames - 1) / 8 + 1), 32x32 in space. Default video
# 161 x 480 x 704 (LTXPipeline's defaults) -> latents 21 x 15 x 22 = 6,930 tokens.
LTX_VAE_STRIDE = (8, 32, 32)

# "L['self'].__dict__['_modules']['transformer_blocks'].0.attn1" (torch 2.13).
LAYER_RE = re.compile(r"(?<!\w)transformer_blocks\W+(\d+)\W+(attn\d)")
# A block compiled on its own (regional compilation): "L['self'].attn1", no layer index.
BLOCK_ATTENTION_RE = re.compile(r"^L\['self'\]\W+(?:_modules\W+)?(attn\d)\W*$")

SELF_ATTENTION = "attn1"
LEFT_DENSE_REASONS = {"attn2": "cross-attention"}
SELF_ATTENTION_PATH = "transformer_blocks.<i>.attn1"
ATTENTION_PATH = "transformer_blocks.<i>.attn<k>"
PATCH_EMBEDDING = "rope (its position grid from num_frames/height/width)"
LAYERS_ROOT = "transformer_blocks"
ORDER_SITES = None  # raster plans only (see the module doc)

# Which config keys shape which parameters: only to word the model check's error.
PARAM_HINTS = (("ff.", "attention_head_dim x num_attention_heads"),
               ("caption_projection", "caption_channels"), ("proj_in", "in_channels"),
               ("proj_out", "out_channels"), ("attn2.to_k", "cross_attention_dim"),
               ("attn2.to_v", "cross_attention_dim"),
               ("attn", "num_attention_heads x attention_head_dim"))


def load_transformer(spec: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                     seed: int = 0, num_layers: int | None = None):
    """Load an ``LTXVideoTransformer3DModel``: a diffusers folder (``transformer/`` subfolder or
    a bare transformer folder) or a key of :data:`BUILTIN_CONFIGS` (random weights, seeded;
    ``num_layers`` truncates it). Returns a :class:`~.source.ModelSource`."""
    from pathlib import Path

    from diffusers import LTXVideoTransformer3DModel

    path = Path(spec)
    if path.is_dir():
        return load_folder(path, lambda _: LTXVideoTransformer3DModel, dtype=dtype,
                           device=device, num_layers=num_layers, vae_stride=LTX_VAE_STRIDE,
                           others=f"one of {sorted(BUILTIN_CONFIGS)}", family="LTX-Video",
                           text_len=BUILTIN_TEXT_LEN["ltx-video-2b"])
    if spec not in BUILTIN_CONFIGS:
        raise ValueError(f"load_transformer: an LTX model must be a diffusers folder or one of "
                         f"{sorted(BUILTIN_CONFIGS)}, got {spec!r}")
    cfg = dict(BUILTIN_CONFIGS[spec], **({} if num_layers is None else {"num_layers": num_layers}))
    torch.manual_seed(seed)
    model = build_on_device(LTXVideoTransformer3DModel, cfg, dtype=dtype, device=device)
    return ModelSource(model, spec, None, True, LTX_VAE_STRIDE, BUILTIN_TEXT_LEN[spec])


TEXT_DIM = "caption_channels"  # the config key of the text embeddings' width


def attention_site(node: torch.fx.Node) -> tuple[int | None, str | None, str | None]:
    """(layer index, 'attn1'/'attn2', module path) of the innermost
    ``transformer_blocks.<i>.attn<k>``; in a graph of one block the layer index is None."""
    paths = _module_paths(node)
    for path in reversed(paths):
        m = LAYER_RE.search(path)
        if m:
            return int(m.group(1)), m.group(2), path
    m = BLOCK_ATTENTION_RE.match(paths[-1]) if paths else None
    if m:
        return None, m.group(1), paths[-1]
    return None, None, None


def is_block_graph(gm: torch.fx.GraphModule) -> bool:
    """Is this the graph of one transformer block compiled on its own (regional compilation)?"""
    return any(n.op == "call_function" and n.target is F.scaled_dot_product_attention
               and attention_site(n)[1] is not None and attention_site(n)[0] is None
               for n in gm.graph.nodes)


# forward(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, num_frames,
#         height, width, ...): positions of the arguments read here.
_ARG_POS = {"hidden_states": 0, "timestep": 2, "num_frames": 4, "height": 5, "width": 6}


def _arg(args: tuple, kwargs: dict, name: str):
    if name in kwargs:
        return kwargs[name]
    i = _ARG_POS[name]
    return args[i] if len(args) > i else None


def forward_inputs(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """``(hidden_states, timestep)`` of a ``LTXVideoTransformer3DModel.forward`` call."""
    return _arg(args, kwargs, "hidden_states"), _arg(args, kwargs, "timestep")


def forward_grid(transformer, args: tuple, kwargs: dict) -> Grid:
    """The token grid ``(num_frames, height, width)`` of a forward call (its RoPE grid)."""
    from ..errors import PlanMismatchError

    grid = tuple(_arg(args, kwargs, k) for k in ("num_frames", "height", "width"))
    if not all(isinstance(x, int) for x in grid):
        raise PlanMismatchError(
            "scaling_attn_backend: the attached LTX transformer was called without integer "
            f"num_frames, height, width (got {grid}); pass them as LTXPipeline does (latent "
            "frames, height and width) or give the backend grid=(F, H, W)")
    return grid


def velocity(transformer, latents: torch.Tensor, timestep: torch.Tensor,
             text: torch.Tensor) -> torch.Tensor:
    """The model's output for latents ``[B, C, F, H, W]``: packed to tokens as
    ``LTXPipeline._pack_latents`` does, every text token attended, unpacked back."""
    model = _unwrap(transformer)
    pt, ph, pw = patch_size(model)
    b, c, f, h, w = latents.shape
    grid = (f // pt, h // ph, w // pw)
    x = latents.reshape(b, c, grid[0], pt, grid[1], ph, grid[2], pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)
    mask = torch.ones(text.shape[:2], device=text.device, dtype=text.dtype)
    out = transformer(hidden_states=x, encoder_hidden_states=text, timestep=timestep,
                      encoder_attention_mask=mask, num_frames=grid[0], height=grid[1],
                      width=grid[2], return_dict=False)[0]
    out = out.reshape(b, *grid, -1, pt, ph, pw)
    return out.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, -1, f, h, w)


def find_timestep(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The transformer's ``timestep`` placeholder: by name, or (a positional call) the
    non-parameter placeholder feeding ``time_embed``."""
    return timestep_placeholder(gm, "time_embed")



def find_latent_grid(gm: torch.fx.GraphModule, patch_size: Sequence[int] | None = None
                     ) -> tuple[tuple[Any, ...] | None, str]:
    """Token grid ``(F, H, W)``: the sizes of the three ``arange``s ``rope`` meshes (its
    ``num_frames, height, width`` arguments). ``patch_size`` does not apply: the hidden states
    come in packed. ``video_coords`` instead of the grid leaves no meshgrid (then pass
    ``grid=``)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.meshgrid and any(
                re.search(r"\Wrope\W*$", p) for p in _module_paths(n)):
            vals = [_val(a) for a in n.args]
            if len(vals) == 3 and all(getattr(v, "dim", lambda: 0)() == 1 for v in vals):
                where = "rope's position grid (num_frames, height, width)"
                return tuple(v.shape[0] for v in vals), where
    return None, "no rope position grid in the graph (called with video_coords?)"


def whole_model(gm: torch.fx.GraphModule) -> bool:
    """Does this graph hold the model's first and last parts (no graph break in between)?"""
    paths = [p for n in gm.graph.nodes for p in _module_paths(n)]
    return any(re.search(r"\Wproj_in\W*$", p) for p in paths) and any(
        re.search(r"^(?!.*blocks\W).*\Wproj_out\W*$", p) for p in paths)


def weights_fingerprint(transformer, samples: int = 1024) -> str | None:
    """sha256 (16 hex) of a strided sample of every self-attention q/k projection weight."""
    model = _unwrap(transformer)
    return fingerprint_tensors([getattr(block.attn1, name).weight
                                for block in model.transformer_blocks
                                for name in ("to_q", "to_k")], samples)


def fingerprint_names(num_layers: int, model_config: dict | None = None) -> list[str]:
    """Parameter names :func:`weights_fingerprint` hashes, in order, as a graph names them
    (``model_config``, the plan's, is not needed: the layer count names every layer)."""
    return [f"transformer_blocks.{i}.attn1.{p}.weight" for i in range(num_layers)
            for p in ("to_q", "to_k")]


def patch_size(transformer) -> tuple[int, int, int]:
    """The patch size ``(pt, ph, pw)`` a plan records (``patch_size_t``, ``patch_size`` x 2)."""
    cfg = _unwrap(transformer).config
    return (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size))


def latent_shape_for(frames: int, height: int, width: int, in_channels: int,
                     vae_stride: Sequence[int] = LTX_VAE_STRIDE) -> tuple[int, int, int, int]:
    """Latent shape ``(C, F, H, W)`` of a video of ``frames x height x width`` pixels."""
    return causal_latent_shape(frames, height, width, in_channels, vae_stride,
                               vae="LTX's VAE", example="161 x 480 x 704")


def latent_token_grid(transformer, latent_shape: Sequence[int]) -> Grid:
    """Self-attention token grid ``(F, H, W)`` of latents ``(..., C, F, H, W)`` after packing."""
    pt, ph, pw = patch_size(transformer)
    f, h, w = (int(x) for x in tuple(latent_shape)[-3:])
    if f % pt or h % ph or w % pw:
        raise ValueError(f"latent_token_grid: latent (F, H, W) = {(f, h, w)} must be divisible by "
                         f"the patch size {(pt, ph, pw)}")
    return (f // pt, h // ph, w // pw)


def bare_call_needs(transformer) -> str | None:
    """What the transformer needs beyond latents, timestep and text: nothing."""
    return None


def num_layers(transformer) -> int:
    return len(_unwrap(transformer).transformer_blocks)


def compute_dtype(transformer) -> torch.dtype:
    """The dtype the model computes in: its input projection's."""
    return _unwrap(transformer).proj_in.weight.dtype


def compute_weight(transformer) -> torch.Tensor:
    return _unwrap(transformer).proj_in.weight


def transformer_blocks(transformer) -> torch.nn.ModuleList:
    return _unwrap(transformer).transformer_blocks


def self_attention_modules(transformer) -> list:
    """The self-attention module of each block, in layer order."""
    return [block.attn1 for block in _unwrap(transformer).transformer_blocks]
