"""The HunyuanVideo adapter (diffusers ``HunyuanVideoTransformer3DModel``): the only module that
knows its module paths and what its attention promises.

HunyuanVideo attends jointly over ``[video tokens | text tokens]`` (RoPE on the video part only)
in its double-stream blocks (``transformer_blocks.<i>.attn``, text through ``add_*_proj``) and
single-stream blocks (``single_transformer_blocks.<j>.attn``, one sequence). One layer
numbering covers both: double-stream block ``i`` is layer ``i``, single-stream block ``j`` is
layer ``num_layers + j``. The text refiner's attention (``context_embedder.token_refiner``) is
text only and stays dense.

The mask: ``forward`` builds ``attention_mask`` ``[B, 1, 1, N]`` from
``encoder_attention_mask.sum(1)``: keys at ``>= video_len + text_len[b]`` are masked for every
query row, a key-padding *prefix* mask. :func:`prefix_mask_lengths` finds that construction in
the Dynamo graph and returns the per-batch length node (on the device: no host sync), which
the FX pass hands the op as ``kv_lens``; any other mask is refused (left dense).

Same function names as :mod:`.wan` where the meaning is the same: :func:`attention_site`,
:func:`find_timestep`, :func:`find_latent_grid`, :func:`whole_model`, :func:`num_layers`,
:func:`self_attention_modules`, :func:`weights_fingerprint`, :func:`fingerprint_names`,
:func:`compute_dtype`, :func:`latent_token_grid`, :func:`patch_size`, :data:`GRAPH_CLASSES`;
regional compilation is refused with a message naming the way out (not built yet). The
calibration's q/k capture is :mod:`.hunyuan_capture` (video rows only); the bare calibration
call is :func:`velocity`.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import PlanMismatchError
from .fingerprint import _unwrap, fingerprint_tensors
from .graph import conv3d_output_grid, find_conv3d, timestep_placeholder
from .graph import is_static as _is_static
from .graph import module_paths as _module_paths
from .graph import node_value as _val
from .source import ModelSource, load_folder

Grid = tuple[int, int, int]

SUPPORTED_CLASSES: dict[str, str] = {
    "HunyuanVideoTransformer3DModel": "HunyuanVideo (joint text-video attention; text dense)",
}

# Random-weight architectures. "hunyuanvideo" is hunyuanvideo-community/HunyuanVideo's
# transformer config (20 double + 40 single blocks, 24 heads x 128); "hunyuan-tiny-random" is for
# tests. Names unlike other families' built-ins: registry.load_transformer looks them up by name.
BUILTIN_CONFIGS: dict[str, dict] = {
    "hunyuan-tiny-random": dict(in_channels=4, out_channels=4, num_attention_heads=2,
                        attention_head_dim=32, num_layers=1, num_single_layers=1,
                        num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(8, 12, 12)),
    "hunyuanvideo": dict(in_channels=16, out_channels=16, num_attention_heads=24,
                         attention_head_dim=128, num_layers=20, num_single_layers=40,
                         num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                         text_embed_dim=4096, pooled_projection_dim=768,
                         rope_axes_dim=(16, 56, 56)),
}

# Module classes whose presence in a graph's nn_module_stack makes it this family's
# (``registry.adapter_for_graph``).
GRAPH_CLASSES = ("HunyuanVideoTransformer3DModel", "HunyuanVideoTransformerBlock",
                 "HunyuanVideoSingleTransformerBlock", "HunyuanVideoTokenReplaceTransformerBlock",
                 "HunyuanVideoTokenReplaceSingleTransformerBlock")

# The FX pass for this family is the joint one (compile/joint.py): [video | text] sequences,
# joint tables and kv_lens from the prefix mask.
JOINT_ATTENTION = True
ORDER_SITES = None  # raster plans only: the token-order step knows no joint sequence yet
LAYERS_ROOT = "transformer_blocks"  # double-stream blocks; single-stream: single_transformer_blocks
PARAM_HINTS = (("context_embedder", "text_embed_dim / num_refiner_layers"),
               ("x_embedder", "in_channels / patch_size"), ("proj_out", "out_channels"),
               ("time_text_embed", "pooled_projection_dim / guidance_embeds"),
               ("ff", "mlp_ratio"), ("attn", "num_attention_heads x attention_head_dim"))

SELF_ATTENTION = "attn"  # the joint attention of both block kinds
SELF_ATTENTION_PATH = "transformer_blocks.<i>.attn / single_transformer_blocks.<j>.attn"
ATTENTION_PATH = SELF_ATTENTION_PATH
PATCH_EMBEDDING = "x_embedder"
REFINER_ATTENTION = "refiner"
LEFT_DENSE_REASONS = {REFINER_ATTENTION: "text refiner attention (text only)"}

# "L['self'].__dict__['_modules']['transformer_blocks'].0.attn" (torch 2.13) or
# "L['self'].transformer_blocks.0.attn": the block kind, its index, the attention module, and
# nothing after it (the attention's own submodules are not sites). "single_transformer_blocks"
# is not read as "transformer_blocks": a name character may not precede the match.
LAYER_RE = re.compile(r"(?<!\w)(single_transformer_blocks|transformer_blocks)\W+(\d+)\W+(attn)\W*$")
REFINER_RE = re.compile(r"(?<!\w)refiner_blocks\W+(\d+)\W+attn\W*$")


def num_double_layers(transformer) -> int:
    return len(_unwrap(transformer).transformer_blocks)


def num_layers(transformer) -> int:
    """Joint-attention layers: double-stream blocks, then single-stream blocks."""
    m = _unwrap(transformer)
    return len(m.transformer_blocks) + len(m.single_transformer_blocks)


def self_attention_modules(transformer) -> list:
    """The joint-attention module of each layer, in layer order."""
    m = _unwrap(transformer)
    return [b.attn for b in m.transformer_blocks] + [b.attn for b in m.single_transformer_blocks]


def fingerprint_names(num_layers: int, model_config: dict | None = None) -> list[str]:
    """Parameter names :func:`weights_fingerprint` hashes, in order, as a graph names them. The
    layer count does not say how many layers are double-stream: the plan's ``model_config``
    (``num_layers`` double-stream, ``num_single_layers`` single-stream) does."""
    if not model_config or "num_layers" not in model_config:
        raise PlanMismatchError(
            "fingerprint_names: a HunyuanVideo plan's weights are named by its model_config "
            "(num_layers double-stream + num_single_layers single-stream blocks), got "
            f"model_config={model_config!r}; re-extract the plan with `scaling-attn west`")
    num_double = int(model_config["num_layers"])
    if num_double > num_layers:
        raise PlanMismatchError(
            f"fingerprint_names: model_config has {num_double} double-stream blocks, more than "
            f"the plan's {num_layers} layers; the plan's metadata is inconsistent, re-extract it")
    return joint_fingerprint_names(num_double, num_layers - num_double)


def joint_fingerprint_names(num_double: int, num_single: int) -> list[str]:
    """Parameter names :func:`weights_fingerprint` hashes, in order."""
    return [f"{kind}.{i}.attn.{p}.weight" for kind, n in (("transformer_blocks", num_double),
                                                           ("single_transformer_blocks", num_single))
            for i in range(n) for p in ("to_q", "to_k")]


def weights_fingerprint(transformer, samples: int = 1024) -> str | None:
    """sha256 (16 hex) of a strided sample of every joint attention's video q/k projections."""
    return fingerprint_tensors([getattr(a, p).weight for a in self_attention_modules(transformer)
                                for p in ("to_q", "to_k")], samples)


def patch_size(transformer) -> tuple[int, int, int]:
    cfg = _unwrap(transformer).config
    return (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size))


def is_block_graph(gm: torch.fx.GraphModule) -> bool:
    """Regional compilation is not supported for this family (see :func:`forward_grid`)."""
    return False


def forward_inputs(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """``(hidden_states, timestep)`` of a ``forward(hidden_states, timestep, ...)`` call."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
    return hidden, timestep


def forward_grid(transformer, args: tuple, kwargs: dict) -> Grid:
    """Asked by ``backend.attach`` (regional compilation) at each call: refused for this family,
    whose block graphs would need the joint tables and kv_lens bound per block."""
    raise PlanMismatchError(
        "scaling_attn_backend.attach: regional compilation of HunyuanVideo is not supported "
        "yet; compile the whole transformer: torch.compile(transformer, backend=backend, "
        "fullgraph=True, dynamic=False)")


# HunyuanVideoPipeline's default guidance_scale (6.0), embedded as guidance * 1000.
DEFAULT_GUIDANCE = 6.0


def velocity(transformer, latents: torch.Tensor, timestep: torch.Tensor,
             text: torch.Tensor) -> torch.Tensor:
    """The bare calibration's call: latents ``[B, C, F, H, W]`` in and out (the model patches
    them itself), every text token real (``encoder_attention_mask`` ones, as LTX's
    :func:`.ltx.velocity`), the pipeline's default embedded guidance (6.0 x 1000) if the model
    has ``guidance_embeds``. The CLIP pooled embedding is not part of the bare inputs: zeros.
    It enters only the per-block modulation, so the video q/k of a trained model move; calibrate
    through ``HunyuanVideoPipeline`` (offline/pipeline.py) to have the real one."""
    model = _unwrap(transformer)
    cfg = model.config
    b = latents.shape[0]
    mask = torch.ones(text.shape[:2], device=text.device, dtype=text.dtype)
    pooled = torch.zeros(b, cfg.pooled_projection_dim, device=text.device, dtype=text.dtype)
    guidance = (torch.full((b,), DEFAULT_GUIDANCE * 1000.0, device=text.device, dtype=text.dtype)
                if cfg.guidance_embeds else None)
    return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                       encoder_attention_mask=mask, pooled_projections=pooled, guidance=guidance,
                       return_dict=False)[0]


def bare_call_needs(transformer) -> str | None:
    """What the transformer needs beyond latents, timestep and text: nothing :func:`velocity`
    cannot fill (an image-to-video model's condition is refused by the CLI's channel check)."""
    return None


def compute_dtype(transformer) -> torch.dtype:
    return _unwrap(transformer).x_embedder.proj.weight.dtype


def latent_token_grid(transformer, latent_shape: Sequence[int]) -> Grid:
    """Video token grid ``(F, H, W)`` of latents ``(..., C, F, H, W)`` after patching."""
    cfg = _unwrap(transformer).config
    pt, p = cfg.patch_size_t, cfg.patch_size
    f, h, w = (int(x) for x in tuple(latent_shape)[-3:])
    if f % pt or h % p or w % p:
        raise ValueError(f"latent_token_grid: latent (F, H, W) = {(f, h, w)} must be divisible "
                         f"by the patch size {(pt, p, p)}")
    return (f // pt, h // p, w // p)


TEXT_DIM = "text_embed_dim"  # the config key of the text embeddings' width
VAE_STRIDE = (4, 8, 8)  # HunyuanVideo's causal 3D VAE: 4x in time, 8x8 in space


def load_transformer(spec: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                     seed: int = 0, num_layers: int | None = None):
    """Load a ``HunyuanVideoTransformer3DModel``: a diffusers folder (``transformer/`` or a bare
    transformer folder) or a key of :data:`BUILTIN_CONFIGS` (random weights; ``num_layers``
    sets the double-stream count). Returns a :class:`~.source.ModelSource`."""
    from pathlib import Path

    from diffusers import HunyuanVideoTransformer3DModel

    path = Path(spec)
    if path.is_dir():
        return load_folder(path, lambda _: HunyuanVideoTransformer3DModel, dtype=dtype,
                           device=device, num_layers=num_layers, vae_stride=VAE_STRIDE,
                           others=f"one of {sorted(BUILTIN_CONFIGS)}", family="HunyuanVideo",
                           text_len=256)
    extra = {} if num_layers is None else {"num_layers": num_layers}
    model = make_transformer(spec, dtype=dtype, device=device, seed=seed, **extra)
    return ModelSource(model, spec, None, True, VAE_STRIDE, 256)


def make_transformer(name: str = "hunyuan-tiny-random", *, dtype=torch.float32, device="cpu",
                     seed=0, **overrides):
    """A random-weight ``HunyuanVideoTransformer3DModel`` of a :data:`BUILTIN_CONFIGS` entry."""
    from diffusers import HunyuanVideoTransformer3DModel

    if name not in BUILTIN_CONFIGS:
        raise ValueError(f"make_transformer: name must be one of {sorted(BUILTIN_CONFIGS)}, "
                         f"got {name!r}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = HunyuanVideoTransformer3DModel(**{**BUILTIN_CONFIGS[name], **overrides})
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# What the FX pass reads off a Dynamo graph
# ---------------------------------------------------------------------------------------------


def attention_site(node: torch.fx.Node) -> tuple[int | None, str | None, str | None]:
    """``(layer, kind, module path)`` of an SDPA call: kind ``"attn"`` for the joint attention
    (layer ``i`` for ``transformer_blocks.i``, ``num_double + j`` for
    ``single_transformer_blocks.j``: the double count is read off the graph, see
    :func:`layer_index`), ``"refiner"`` for the text refiner, else ``(None, None, None)``. The
    layer returned here is ``(kind_name, index)`` packed by :func:`layer_index`."""
    paths = _module_paths(node)
    for path in reversed(paths):
        m = LAYER_RE.search(path)
        if m:
            return (m.group(1), int(m.group(2))), SELF_ATTENTION, path
        if REFINER_RE.search(path):
            return None, REFINER_ATTENTION, path
    return None, None, None


def layer_index(block: tuple[str, int], num_double: int) -> int:
    """One numbering: double-stream block ``i`` -> ``i``, single-stream ``j`` -> ``num_double + j``."""
    kind, i = block
    return i if kind == "transformer_blocks" else num_double + i


def count_double_blocks(gm: torch.fx.GraphModule) -> int:
    """Double-stream blocks in the graph: 1 + the highest ``transformer_blocks.<i>`` index seen
    in any node's module stack (a whole-model graph holds every block)."""
    top = -1
    pat = re.compile(r"(?<!\w)transformer_blocks\W+(\d+)")
    for n in gm.graph.nodes:
        for p in _module_paths(n):
            m = pat.search(p)
            if m:
                top = max(top, int(m.group(1)))
    return top + 1


def find_timestep(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The ``timestep`` placeholder (by name; ``guidance`` and ``encoder_*`` never match)."""
    return timestep_placeholder(gm, None, exclude=("encoder", "guidance"))



def find_latent_grid(gm: torch.fx.GraphModule, patch_size: Sequence[int] | None = None
                     ) -> tuple[tuple[Any, ...] | None, str]:
    """Video token grid ``(F, H, W)``: the last three sizes of the ``x_embedder`` Conv3d output
    ``[B, C, F, H, W]``, and where it came from. ``patch_size`` divides its input instead."""
    conv = find_conv3d(gm, "x_embedder")
    if conv is None:
        return None, "no x_embedder Conv3d in the graph"
    if patch_size is not None:
        shape = getattr(_val(conv.args[0]), "shape", None)
        if shape is None or len(shape) != 5:
            return None, "x_embedder input is not 5-D"
        pt, ph, pw = patch_size
        return (shape[2] // pt, shape[3] // ph, shape[4] // pw), \
            f"hidden_states {tuple(shape)} / patch {tuple(patch_size)}"
    return conv3d_output_grid(conv, "x_embedder")


def whole_model(gm: torch.fx.GraphModule) -> bool:
    """Does the graph hold the patch embedding and the model's own ``proj_out``?"""
    paths = [p for n in gm.graph.nodes for p in _module_paths(n)]
    return any(re.search(r"(?<!\w)x_embedder", p) for p in paths) and any(
        re.search(r"^(?!.*blocks\W).*\Wproj_out\W*$", p) for p in paths)


def _is(node, op: str, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == op and node.target == target


def _arg(node: torch.fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def prefix_mask_lengths(mask: Any, seq_len: int) -> tuple[torch.fx.Node | None, str]:
    """The per-batch valid key length of HunyuanVideo's attention mask, or ``(None, why)``.

    ``forward`` builds (diffusers 0.42, ``HunyuanVideoTransformer3DModel.forward``)::

        mask = ones(B, N, bool).masked_fill(arange(N).unsqueeze(0) >= eff.unsqueeze(1), False)
        mask = mask.unsqueeze(1).unsqueeze(1)            # [B, 1, 1, N]

    with ``eff = video_len + encoder_attention_mask.sum(1, dtype=int)``. That is a prefix mask
    whatever the values, so ``eff`` is ``kv_lens``. Any other mask (a user's processor, another
    model) is not promised to be a prefix and is refused.
    """
    def why(msg):
        return None, f"attn_mask is not HunyuanVideo's key-padding prefix mask ({msg})"

    if not isinstance(mask, torch.fx.Node):
        return why("not a graph value")
    mv = _val(mask)
    if not isinstance(mv, torch.Tensor) or mv.dtype != torch.bool or mv.dim() != 4 or (
            tuple(mv.shape[1:]) != (1, 1, seq_len)):
        return why(f"expected bool [B, 1, 1, {seq_len}], got "
                   f"{getattr(mv, 'dtype', None)} {tuple(getattr(mv, 'shape', ()))}")
    x = mask
    for _ in range(2):  # .unsqueeze(1).unsqueeze(1)
        if not (_is(x, "call_method", "unsqueeze") and _arg(x, 1, "dim") == 1):
            return why("not built by .unsqueeze(1).unsqueeze(1)")
        x = x.args[0]
    if not _is(x, "call_method", "masked_fill") or _arg(x, 2, "value") is not False:
        return why("not a masked_fill(..., False)")
    ones, cond = x.args[0], _arg(x, 1, "mask")
    if not (_is(ones, "call_function", torch.ones) and ones.kwargs.get("dtype") == torch.bool):
        return why("not filled into torch.ones(..., dtype=torch.bool)")
    if not _is(cond, "call_function", operator.ge):
        return why("the fill condition is not indices >= lengths")
    idx, lens = cond.args
    if not (_is(idx, "call_method", "unsqueeze") and _arg(idx, 1, "dim") == 0
            and _is(idx.args[0], "call_function", torch.arange)
            and len(idx.args[0].args) == 1 and idx.args[0].args[0] == seq_len):
        return why(f"the indices are not arange({seq_len}).unsqueeze(0)")
    if not (_is(lens, "call_method", "unsqueeze") and _arg(lens, 1, "dim") == 1):
        return why("the lengths are not eff.unsqueeze(1)")
    eff = lens.args[0]
    ev = _val(eff)
    if not (isinstance(ev, torch.Tensor) and ev.dim() == 1 and not ev.dtype.is_floating_point):
        return why(f"the lengths are not an integer (B,) tensor: {getattr(ev, 'shape', ev)}")
    return eff, ""


def static_ints(*xs) -> bool:
    return all(_is_static(x) for x in xs)


def check_text_len(path: str, seq_len: int, video_len: int) -> int:
    """Text tokens of a joint site: ``S - F*H*W``, which must not be negative."""
    text_len = seq_len - video_len
    if text_len < 0:
        raise PlanMismatchError(
            f"scaling_attn_backend: {path} attends over S={seq_len} tokens, fewer than the "
            f"{video_len} video tokens of the latent grid; pass the model's patch_size or grid")
    return text_len
