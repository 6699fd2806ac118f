"""The Wan2.1 adapter (diffusers ``WanTransformer3DModel``): the only module that knows Wan's
module paths (``blocks.<i>.attn1`` self-attention, ``attn2`` cross-attention,
``patch_embedding``, ``timesteps_proj``, ``rope``, ``proj_out``) and its configs.

* graph sites, for the FX pass: :func:`attention_site`, :func:`find_timestep`,
  :func:`find_latent_grid`, :func:`whole_model`, :data:`WAN_SITES` (token-order step),
  :data:`PARAM_HINTS` and :func:`fingerprint_names` (the model check); :func:`is_block_graph`
  and :func:`forward_inputs` (regional compilation: a block's graph, the transformer's inputs
  as its forward pre-hook sees them);
* models: :data:`BUILTIN_CONFIGS` (1.3B, 14B, a tiny random one), :func:`load_transformer`,
  :func:`latent_shape_for`, :func:`latent_token_grid`, :func:`encode_prompts` (UMT5);
* :func:`weights_fingerprint` and :func:`num_layers`, for the plan.

The q/k capture by processor swap is :mod:`.wan_capture`. A new family (Wan2.2, ...) is one new
file with the same names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import PlanMismatchError, UnsupportedModelError
from .fingerprint import _unwrap, fingerprint_tensors
from .graph import OrderSites, conv3d_output_grid, find_conv3d, timestep_placeholder
from .graph import is_param_or_buffer as _is_param_or_buffer
from .graph import is_static as _is_static
from .graph import module_paths as _module_paths
from .graph import node_value as _val
from .graph import source_name as _source_name
from .registry import check_supported, supported_classes  # noqa: F401  (every family's refusal)
from .source import ModelSource, build_on_device, causal_latent_shape, load_folder

Grid = tuple[int, int, int]


# Built-in architectures (random weights). Real configs: Wan2.1 T2V 1.3B and 14B
# (their diffusers transformer configs); "tiny" is for tests and CPU smoke runs.
BUILTIN_CONFIGS: dict[str, dict] = {
    "tiny-random": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=128,
                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                        eps=1e-6, rope_max_seq_len=1024),
    "wan2.1-1.3b": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                        ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "wan2.1-14b": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                       in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                       ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    # Wan2.2 TI2V-5B (Wan-AI/Wan2.2-TI2V-5B-Diffusers transformer/config.json): 48 latent
    # channels from a VAE of stride (4, 16, 16), so 4x fewer tokens per frame than Wan2.1's
    # VAE at the same pixels; its pipeline runs expand_timesteps (a per-token timestep).
    "wan2.2-ti2v-5b": dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128,
                           in_channels=48, out_channels=48, text_dim=4096, freq_dim=256,
                           ffn_dim=14336, num_layers=30, cross_attn_norm=True,
                           qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
}


# Text sequence length of random embeddings per built-in (Wan's T5 pads to 512 tokens).
BUILTIN_TEXT_LEN = {"tiny-random": 16, "wan2.1-1.3b": 512, "wan2.1-14b": 512,
                    "wan2.2-ti2v-5b": 512}


TINY_ASSET_DIR = Path(__file__).parent.parent / "assets" / "tiny-wan"


WAN_VAE_STRIDE = (4, 8, 8)  # Wan2.1 VAE: 4x in time (causal: F_lat = (frames-1)/4 + 1), 8x8 in space
WAN22_VAE_STRIDE = (4, 16, 16)  # Wan2.2 VAE (TI2V-5B): 16x16 in space
BUILTIN_VAE_STRIDE = {"wan2.2-ti2v-5b": WAN22_VAE_STRIDE}  # others: WAN_VAE_STRIDE


def _vae_stride_of(folder: Path) -> tuple[int, int, int]:
    cfg = folder / "vae" / "config.json"
    if not cfg.is_file():
        return (1, 1, 1)  # no VAE: the model works on pixels (e.g. the tiny toy-video DiT)
    c = json.loads(cfg.read_text())
    return (int(c.get("scale_factor_temporal") or 4), int(c.get("scale_factor_spatial") or 8),
            int(c.get("scale_factor_spatial") or 8))


def _transformer_class(config_json: Path):
    """The diffusers class a folder's ``config.json`` names (``_class_name``), if supported: a
    SkyReels-V2 or VACE folder must not load as a WanTransformer3DModel, which would drop the
    weights it has no place for."""
    import diffusers

    name = json.loads(config_json.read_text()).get("_class_name") or "WanTransformer3DModel"
    if name not in SUPPORTED_CLASSES:
        other = (" by this Wan loader (another family's: pass its pipeline folder, with "
                 "model_index.json, or use the Python API)") if name in supported_classes() else ""
        raise UnsupportedModelError(f"load_transformer: {config_json} names model class {name}, "
                                    f"which is not supported; supported: "
                                    f"{', '.join(SUPPORTED_CLASSES)}{other}")
    return getattr(diffusers, name)


def load_transformer(spec: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                     seed: int = 0, num_layers: int | None = None) -> ModelSource:
    """Load a ``WanTransformer3DModel``.

    ``spec``:
      * a directory: a diffusers folder (``transformer/`` subfolder, or a bare transformer folder
        with ``config.json``);
      * ``"tiny"``: the trained tiny model in ``scaling_attn_compile/assets/tiny-wan/`` when it is
        installed, else the ``"tiny-random"`` built-in;
      * a key of :data:`BUILTIN_CONFIGS`: that architecture with random weights (seeded).

    ``num_layers`` truncates a built-in config (for memory/time checks); not allowed on folders.
    """
    from diffusers import WanTransformer3DModel

    from .hub import resolve_model

    spec = resolve_model(spec)  # a Hub id -> its snapshot folder in the local cache
    if spec == "tiny":
        shipped = any((TINY_ASSET_DIR / sub / "config.json").is_file() for sub in ("transformer", ""))
        spec = str(TINY_ASSET_DIR) if shipped else "tiny-random"
    path = Path(spec)
    if path.is_dir():
        return load_folder(path, _transformer_class, dtype=dtype, device=device,
                           num_layers=num_layers, vae_stride=_vae_stride_of(path),
                           others=f"one of {sorted(BUILTIN_CONFIGS)} or 'tiny'", family="Wan")
    if spec not in BUILTIN_CONFIGS:
        raise ValueError(f"load_transformer: model must be a diffusers folder, 'tiny' or one of "
                         f"{sorted(BUILTIN_CONFIGS)}, got {spec!r} (no such folder either)")
    cfg = dict(BUILTIN_CONFIGS[spec])
    if num_layers is not None:
        cfg["num_layers"] = int(num_layers)
    torch.manual_seed(seed)
    model = build_on_device(WanTransformer3DModel, cfg, dtype=dtype, device=device)
    return ModelSource(model, spec, None, True,
                       BUILTIN_VAE_STRIDE.get(spec, WAN_VAE_STRIDE), BUILTIN_TEXT_LEN[spec])


# The diffusers classes this adapter serves: Wan2.1's block structure (``blocks.<i>.attn1``
# self-attention over the video tokens, ``attn2`` cross-attention, ``patch_embedding``,
# ``rope``, ``condition_embedder.timesteps_proj``, ``proj_out``) under one module-path table.
SUPPORTED_CLASSES: dict[str, str] = {
    "WanTransformer3DModel": "Wan2.1 and Wan2.2 (T2V, I2V, A14B experts, TI2V-5B)",
    "WanVACETransformer3DModel": "Wan VACE (control blocks vace_blocks.<i> stay dense)",
    "SkyReelsV2Transformer3DModel": "SkyReels-V2 (diffusion forcing's causal mask: dense)",
}


def bare_call_needs(transformer) -> str | None:
    """What a transformer needs beyond latents, timestep and text to run on its own (the bare
    calibration path calls it with those only), or None: VACE needs its control video."""
    if "vace_layers" in _unwrap(transformer).config:
        return "its control video (control_hidden_states, from WanVACEPipeline)"
    return None


def latent_shape_for(frames: int, height: int, width: int, in_channels: int,
                     vae_stride: Sequence[int] = WAN_VAE_STRIDE) -> tuple[int, int, int, int]:
    """Latent shape ``(C, F, H, W)`` of a video of ``frames x height x width`` pixels.

    Time is causal (Wan's VAE): ``F = (frames - 1) / st + 1``; space: ``H = height / sh``.
    """
    return causal_latent_shape(frames, height, width, in_channels, vae_stride)


def latent_token_grid(transformer, latent_shape: Sequence[int]) -> Grid:
    """Self-attention token grid ``(F, H, W)`` of latents ``(..., C, F, H, W)`` after patching."""
    pt, ph, pw = _unwrap(transformer).config.patch_size
    f, h, w = (int(x) for x in tuple(latent_shape)[-3:])
    if f % pt or h % ph or w % pw:
        raise ValueError(f"latent_token_grid: latent (F, H, W) = {(f, h, w)} must be divisible by the patch "
                         f"size {(pt, ph, pw)}; pick height/width that are multiples of "
                         f"{ph * 8}/{pw * 8} pixels")
    return (f // pt, h // ph, w // pw)


def encode_prompts(folder, prompts: Sequence[str], *, device="cpu", dtype=torch.float32,
                   max_sequence_length: int = 512) -> torch.Tensor:
    """Encode prompts with a checkpoint's own ``text_encoder/`` + ``tokenizer/`` (UMT5, as
    ``WanPipeline._get_t5_prompt_embeds``): ``(N, max_sequence_length, text_dim)``, zero-padded
    past each prompt's tokens. Needs ``transformers``. Untested here (no weights on this machine).
    """
    try:
        from transformers import AutoTokenizer, UMT5EncoderModel
    except ImportError as e:
        raise ImportError("encode_prompts: text prompts need the `transformers` package "
                          "(pip install transformers), or pass precomputed embeddings") from e
    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    enc = UMT5EncoderModel.from_pretrained(str(folder), subfolder="text_encoder",
                                           torch_dtype=dtype).to(device).eval()
    prompts = [" ".join(p.split()) for p in prompts]  # WanPipeline's whitespace_clean
    t = tok(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    lens = t.attention_mask.gt(0).sum(1)
    with torch.no_grad():
        h = enc(t.input_ids.to(device), t.attention_mask.to(device)).last_hidden_state
    out = torch.zeros_like(h)
    for i, n in enumerate(lens.tolist()):
        out[i, :n] = h[i, :n]
    return out.cpu()


# "L['self'].blocks.0.attn1" (torch 2.11) and
# "L['self'].__dict__['_modules']['blocks'].0.attn1" (torch 2.13): one regex for both.
# Not preceded by a name character: VACE's "vace_blocks.<i>.attn1" is not a layer (see VACE_RE).
LAYER_RE = re.compile(r"(?<!\w)blocks\W+(\d+)\W+(attn\d)")


# VACE's control blocks (``WanVACETransformer3DModel.vace_blocks``) attend over the control
# tokens with their own weights: the plan has no topology for them, so they stay dense.
VACE_RE = re.compile(r"vace_blocks\W+(\d+)\W+(attn\d)")
VACE_ATTENTION = "vace"


# Why an attention call the adapter does not call self-attention stays dense, by its kind.
LEFT_DENSE_REASONS = {"attn2": "cross-attention", VACE_ATTENTION: "VACE control-block attention"}


# Module classes whose presence in a graph's nn_module_stack makes it this family's
# (``registry.adapter_for_graph``): the transformers, their blocks and attention modules.
GRAPH_CLASSES = ("WanTransformer3DModel", "WanTransformerBlock", "WanAttention",
                 "WanVACETransformer3DModel", "WanVACETransformerBlock",
                 "SkyReelsV2Transformer3DModel", "SkyReelsV2TransformerBlock", "SkyReelsV2Attention")


# A block whose forward a diffusers hook replaced (context parallelism puts its split hook on
# blocks.0) is reached through the hook's closure, e.g. "...['blocks'].0.forward.func
# .__closure__[0].cell_contents.forward.__self__.attn1". Only these wrapper tokens may stand
# between the layer index and the attention, so no other nesting is mistaken for a layer.
HOOKED_LAYER_RE = re.compile(
    r"(?<!\w)blocks\W+(\d+)(?:\W|\d|forward|func|__closure__|cell_contents|__self__)*?\W(attn\d)$")


SELF_ATTENTION = "attn1"


# A block compiled on its own (regional compilation, ``compile_repeated_blocks``): the graph's
# root is the block, so the attention's path is "L['self'].attn1" (torch 2.13) or
# "L['self']._modules['attn1']", with no layer index.
BLOCK_ATTENTION_RE = re.compile(r"^L\['self'\]\W+(?:_modules\W+)?(attn\d)\W*$")


def attention_site(node: torch.fx.Node) -> tuple[int | None, str | None, str | None]:
    """(layer index, 'attn1'/'attn2', module path) of the innermost ``blocks.<i>.attn<k>``; in
    a graph of one block (regional compilation) the layer index is None."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [str(path) for path, _cls in stack.values()]
    for path in reversed(paths):
        m = LAYER_RE.search(path) or HOOKED_LAYER_RE.search(path)
        if m:
            return int(m.group(1)), m.group(2), path
        m = VACE_RE.search(path)
        if m:  # its cross-attention is a cross-attention like any other
            return None, VACE_ATTENTION if m.group(2) == SELF_ATTENTION else m.group(2), path
    m = BLOCK_ATTENTION_RE.match(paths[-1]) if paths else None
    if m:
        return None, m.group(1), paths[-1]
    return None, None, None


def is_block_graph(gm: torch.fx.GraphModule) -> bool:
    """Is this the graph of one transformer block compiled on its own (regional compilation)?
    Its attention has no layer index, and its parameter names are the block's, not the model's
    (a block's ``scale_shift_table`` is not the model's)."""
    return any(n.op == "call_function" and n.target is F.scaled_dot_product_attention
               and attention_site(n)[1] is not None and attention_site(n)[0] is None
               for n in gm.graph.nodes)


def forward_inputs(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """``(hidden_states, timestep)`` of a ``WanTransformer3DModel.forward`` call, as a forward
    pre-hook sees them (``forward(hidden_states, timestep, encoder_hidden_states, ...)``)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    timestep = kwargs["timestep"] if "timestep" in kwargs else (
        args[1] if len(args) > 1 else None)
    return hidden, timestep


def forward_grid(transformer, args: tuple, kwargs: dict) -> Grid:
    """The token grid of a forward call as its pre-hook sees it: ``hidden_states [B, C, F, H, W]``
    over the patch size."""
    hidden = forward_inputs(args, kwargs)[0]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 5:
        raise PlanMismatchError(
            "scaling_attn_backend: the attached transformer was called without a 5-D "
            f"hidden_states [B, C, F, H, W] (got {getattr(hidden, 'shape', type(hidden))})")
    return latent_token_grid(transformer, hidden.shape)


def velocity(transformer, latents: torch.Tensor, timestep: torch.Tensor,
             text: torch.Tensor) -> torch.Tensor:
    """The model's output for latents ``[B, C, F, H, W]`` (the bare calibration's call)."""
    return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                       return_dict=False)[0]


def find_timestep(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The transformer's ``timestep`` placeholder: by name, or (a positional call) the
    non-parameter placeholder feeding Wan's ``timesteps_proj``."""
    return timestep_placeholder(gm, "timesteps_proj")



def find_latent_grid(gm: torch.fx.GraphModule, patch_size: Sequence[int] | None = None
                     ) -> tuple[tuple[Any, ...] | None, str]:
    """Latent grid ``(F, H, W)`` after patching, and where it came from.

    The output of the ``patch_embedding`` Conv3d is ``[B, inner, F, H, W]``: its last three sizes
    are the grid whatever the kernel, stride or padding. With ``patch_size`` given, the grid is
    the ``hidden_states`` input ``[B, C, F, H, W]`` divided by it instead. May return symbolic
    sizes (the caller decides what to do with them).
    """
    conv = find_conv3d(gm, "patch_embedding")
    if patch_size is not None:
        hidden = conv.args[0] if conv is not None else None
        if hidden is None:
            cands = [n for n in gm.graph.nodes if n.op == "placeholder"
                     and not _is_param_or_buffer(n) and "encoder" not in n.name
                     and "hidden_states" in (_source_name(n) + n.name)]
            hidden = cands[0] if cands else None
        shape = getattr(_val(hidden), "shape", None)
        if shape is None or len(shape) != 5:
            return None, "no 5-D hidden_states input [B, C, F, H, W] in the graph"
        pt, ph, pw = patch_size
        f, h, w = shape[2:]
        if any(_is_static(a) and a % p for a, p in zip((f, h, w), (pt, ph, pw), strict=True)):
            raise PlanMismatchError(
                f"scaling_attn_backend: hidden_states grid {tuple(shape[2:])} is not divisible "
                f"by patch_size={tuple(patch_size)}; pass the model's patch size "
                "(transformer.config.patch_size) or leave patch_size=None")
        return (f // pt, h // ph, w // pw), f"hidden_states {tuple(shape)} / patch {patch_size}"
    return conv3d_output_grid(conv, "patch_embedding")


def whole_model(gm: torch.fx.GraphModule) -> bool:
    """Does this graph hold the model's first and last parts (no graph break in between)?"""
    paths = [p for n in gm.graph.nodes for p in _module_paths(n)]
    return any("patch_embedding" in p for p in paths) and any("proj_out" in p for p in paths)


# The model's own proj_out, not a VACE control block's ("vace_blocks.<i>.proj_out"). VACE's
# control tokens (vace_patch_embedding) are permuted with the video tokens.
WAN_SITES = OrderSites(embedding=r"\Wpatch_embedding\W*$", rope_tables=r"\Wrope\W*$",
                       output=r"^(?!.*blocks\W).*\Wproj_out\W*$",
                       extra_embeddings=(r"\Wvace_patch_embedding\W*$",))


ORDER_SITES = WAN_SITES  # what the token-order step permutes (None: raster plans only)


def weights_fingerprint(transformer, samples: int = 1024) -> str | None:
    """sha256 (16 hex) of a strided sample of every ``blocks.<i>.attn1`` q/k projection weight.

    WEST topology is weight-encoded, so another checkpoint of the same architecture is another
    topology. Values are rounded to bfloat16 first so a checkpoint matches itself whether it is
    run in float32, float16 or bfloat16. ``None`` for meta tensors (no weights).
    """
    model = _unwrap(transformer)
    return fingerprint_tensors([getattr(block.attn1, name).weight for block in model.blocks
                                for name in ("to_q", "to_k")], samples)


# Which config keys shape which parameters: only to word the error.
PARAM_HINTS = (("ffn.", "ffn_dim"), ("text_embedder", "text_dim"), ("time_embedder", "freq_dim"),
          ("time_proj", "freq_dim"), ("image_embedder", "image_dim"),
          ("add_k_proj", "added_kv_proj_dim"), ("add_v_proj", "added_kv_proj_dim"),
          ("norm_added_k", "added_kv_proj_dim"), ("patch_embedding", "in_channels/patch_size"),
          ("proj_out", "out_channels/patch_size"), ("rope.", "attention_head_dim/rope_max_seq_len"),
          ("norm_q", "qk_norm"), ("norm_k", "qk_norm"), ("norm2", "cross_attn_norm"),
          ("attn", "num_attention_heads x attention_head_dim"))


TEXT_DIM = "text_dim"  # the config key of the text embeddings' width
SELF_ATTENTION_PATH = "blocks.<i>.attn1"  # how messages name a self-attention layer
ATTENTION_PATH = "blocks.<i>.attn<k>"  # ... and any attention layer
PATCH_EMBEDDING = "patch_embedding"  # how messages name the patch embedding
LAYERS_ROOT = "blocks"  # the ModuleList of transformer blocks: the first name of a layer's parameters


def patch_size(transformer) -> tuple[int, int, int]:
    """The patch size ``(pt, ph, pw)`` a plan records."""
    return tuple(int(p) for p in _unwrap(transformer).config.patch_size)


def num_layers(transformer) -> int:
    """Number of transformer blocks (self-attention layers)."""
    return len(_unwrap(transformer).blocks)


def compute_dtype(transformer) -> torch.dtype:
    """The dtype the model computes in: its patch embedding's. Not the first parameter's: Wan
    keeps ``scale_shift_table`` in float32 in a bfloat16 model, and float32 latents then fail the
    bf16 patch embedding ("Input type (float) and bias type (c10::BFloat16) should be the same",
    seen on the H200)."""
    return _unwrap(transformer).patch_embedding.weight.dtype


def compute_weight(transformer) -> torch.Tensor:
    """A parameter on the model's device in its compute dtype (:func:`compute_dtype`), for code
    that makes inputs for it."""
    return _unwrap(transformer).patch_embedding.weight


def transformer_blocks(transformer) -> torch.nn.ModuleList:
    """The transformer blocks, in layer order (what per-block compilation compiles)."""
    return _unwrap(transformer).blocks


def self_attention_modules(transformer) -> list:
    """The self-attention module of each block, in layer order (whose processor a capture swaps)."""
    return [block.attn1 for block in _unwrap(transformer).blocks]


def fingerprint_names(num_layers: int, model_config: dict | None = None) -> list[str]:
    """Parameter names :func:`weights_fingerprint` hashes, in order (``model_config`` unused)."""
    return [f"blocks.{i}.attn1.{p}.weight" for i in range(num_layers) for p in ("to_q", "to_k")]
