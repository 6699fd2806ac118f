"""Dense calibration runs of a diffusers Wan transformer, capturing self-attention q/k per layer.

Two layers of API:

* :func:`capture_qk` (context manager): installs a capturing processor on every
  ``blocks.<i>.attn1`` (self-attention). Each forward call of the transformer then hands your
  callback a :class:`LayerCapture` per layer: ``q, k`` ``(B, H, S, D)`` exactly as diffusers'
  ``WanAttnProcessor`` feeds them to SDPA (projection, RMS norm, RoPE), plus the latent grid and
  whatever step info the driver put in the state. The original processor then runs unchanged,
  so the model's output is bit-identical. Cost: the q/k projections, norms and RoPE run twice.
* :func:`capture_self_attention`: the driver. For each :class:`CalibrationInput` it denoises from
  seeded noise along ``timesteps`` (flow-matching Euler, Wan's sampler family: ``sigma = t /
  1000``, ``x <- x + (sigma_next - sigma) * v``, with classifier-free guidance when the input has
  negative embeddings) and captures at the chosen steps.

:func:`calibrate_west` wires this to :mod:`.west` (block mass -> threshold codes -> union) and
returns a :class:`~scaling_attn_compile.plan.Plan`. FAST (issue 5) reuses :func:`capture_qk` /
:func:`capture_self_attention` with its own callback.

Also here: model loading (a local diffusers folder, the tiny asset, or built-in configs with
random weights), latent shapes, default timesteps, and calibration inputs (random or precomputed
embeddings, or a checkpoint's own text encoder).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import west
from ..contract.masks import num_blocks

Grid = tuple[int, int, int]

# Built-in architectures (random weights). Real configs: Wan2.1 T2V 1.3B and 14B
# (research/papers.md [W1]/[W2]); "tiny" is for tests and CPU smoke runs.
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
}
# Text sequence length of random embeddings per built-in (Wan's T5 pads to 512 tokens).
BUILTIN_TEXT_LEN = {"tiny-random": 16, "wan2.1-1.3b": 512, "wan2.1-14b": 512}
TINY_ASSET_DIR = Path(__file__).parent.parent / "assets" / "tiny-wan"
WAN_VAE_STRIDE = (4, 8, 8)  # Wan2.1 VAE: 4x in time (causal: F_lat = (frames-1)/4 + 1), 8x8 in space


# --------------------------------------------------------------------------------------------
# Models and shapes
# --------------------------------------------------------------------------------------------

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


def _vae_stride_of(folder: Path) -> tuple[int, int, int]:
    cfg = folder / "vae" / "config.json"
    if not cfg.is_file():
        return (1, 1, 1)  # no VAE: the model works on pixels (e.g. the tiny toy-video DiT)
    c = json.loads(cfg.read_text())
    return (int(c.get("scale_factor_temporal") or 4), int(c.get("scale_factor_spatial") or 8),
            int(c.get("scale_factor_spatial") or 8))


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

    if spec == "tiny":
        shipped = any((TINY_ASSET_DIR / sub / "config.json").is_file() for sub in ("transformer", ""))
        spec = str(TINY_ASSET_DIR) if shipped else "tiny-random"
    path = Path(spec)
    if path.is_dir():
        if num_layers is not None:
            raise ValueError(f"load_transformer: num_layers applies to built-in configs only, got "
                             f"num_layers={num_layers} with folder {path}")
        sub = "transformer" if (path / "transformer" / "config.json").is_file() else None
        if sub is None and not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"load_transformer: {path} has neither transformer/config.json nor config.json; "
                f"pass a diffusers Wan folder or one of {sorted(BUILTIN_CONFIGS)} or 'tiny'")
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            # Without it diffusers 0.42 fails with "low_cpu_mem_usage cannot be False when
            # keep_in_fp32_modules is True", which names neither the package nor the fix.
            raise ImportError(f"load_transformer: loading the diffusers folder {path} needs the "
                              f"`accelerate` package (a dependency of scaling-attn-compile); "
                              f"pip install accelerate")
        model = WanTransformer3DModel.from_pretrained(str(path), subfolder=sub, torch_dtype=dtype)
        model = model.to(device).eval()
        return ModelSource(model, path.name, path, False, _vae_stride_of(path))
    if spec not in BUILTIN_CONFIGS:
        raise ValueError(f"load_transformer: model must be a diffusers folder, 'tiny' or one of "
                         f"{sorted(BUILTIN_CONFIGS)}, got {spec!r} (no such folder either)")
    cfg = dict(BUILTIN_CONFIGS[spec])
    if num_layers is not None:
        cfg["num_layers"] = int(num_layers)
    torch.manual_seed(seed)
    # Build directly on the device in the target dtype: 14B in float32 would need 56 GB first.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**cfg)
    finally:
        torch.set_default_dtype(prev)
    return ModelSource(model.eval(), spec, None, True, WAN_VAE_STRIDE, BUILTIN_TEXT_LEN[spec])


def latent_shape_for(frames: int, height: int, width: int, in_channels: int,
                     vae_stride: Sequence[int] = WAN_VAE_STRIDE) -> tuple[int, int, int, int]:
    """Latent shape ``(C, F, H, W)`` of a video of ``frames x height x width`` pixels.

    Time is causal (Wan's VAE): ``F = (frames - 1) / st + 1``; space: ``H = height / sh``.
    """
    st, sh, sw = vae_stride
    if (frames - 1) % st or height % sh or width % sw:
        raise ValueError(f"latent_shape_for: need (frames - 1) % {st} == 0, height % {sh} == 0 and "
                         f"width % {sw} == 0 for VAE stride {tuple(vae_stride)}, got frames={frames}, "
                         f"height={height}, width={width}; e.g. 81 x 480 x 832")
    return (in_channels, (frames - 1) // st + 1, height // sh, width // sw)


def token_grid(transformer, latent_shape: Sequence[int]) -> Grid:
    """Self-attention token grid ``(F, H, W)`` of latents ``(..., C, F, H, W)`` after patching."""
    pt, ph, pw = _unwrap(transformer).config.patch_size
    f, h, w = (int(x) for x in tuple(latent_shape)[-3:])
    if f % pt or h % ph or w % pw:
        raise ValueError(f"token_grid: latent (F, H, W) = {(f, h, w)} must be divisible by the patch "
                         f"size {(pt, ph, pw)}; pick height/width that are multiples of "
                         f"{ph * 8}/{pw * 8} pixels")
    return (f // pt, h // ph, w // pw)


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


def _unwrap(model):
    return getattr(model, "_orig_mod", model)


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


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------

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


def self_attention_qk(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, ...]:
    """q, k ``(B, H, S, D)`` of a ``WanAttention`` self-attention call, as diffusers computes
    them: projections (fused or not), ``norm_q``/``norm_k`` across heads, head split, RoPE."""
    try:  # diffusers' own helper, so fused projections behave identically
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections
        q, k, _ = _get_qkv_projections(attn, hidden_states, None)
    except ImportError:
        q, k = attn.to_q(hidden_states), attn.to_k(hidden_states)
    q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        q = _apply_rotary_emb(q, *rotary_emb)
        k = _apply_rotary_emb(k, *rotary_emb)
    return q.transpose(1, 2), k.transpose(1, 2)


class _CaptureProcessor:
    """Wraps a layer's original processor: computes q/k, calls back, then runs the original."""

    def __init__(self, original, layer: int, state: CaptureState, on_layer: Callable):
        self.original, self.layer, self.state, self.on_layer = original, layer, state, on_layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):
        s = self.state
        if s.enabled and encoder_hidden_states is None:  # self-attention only
            with torch.no_grad():
                q, k = self_attention_qk(attn, hidden_states, rotary_emb)
            s.calls += 1
            self.on_layer(LayerCapture(self.layer, q, k, s.grid, s.input_index, s.step_index,
                                       s.timestep, s.branch))
            del q, k
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
            state.grid = token_grid(module, hs.shape)

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


def capture_self_attention(transformer, inputs: Sequence[CalibrationInput],
                           timesteps: Sequence[float], on_layer: Callable[[LayerCapture], None], *,
                           latent_shape: Sequence[int], capture_steps: Sequence[int] | None = None,
                           guidance_scale: float = 5.0, layers: Sequence[int] | None = None,
                           progress: bool = True) -> list[torch.Tensor]:
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
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
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
        bar = tqdm(total=total, desc="calibration", unit="step")
    with capture_qk(model, on_layer, layers=layers) as state, torch.no_grad():
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
                v = model(hidden_states=x.to(dtype), timestep=ts, encoder_hidden_states=pos,
                          return_dict=False)[0].float()
                if neg is not None:
                    state.branch = "uncond"
                    vu = model(hidden_states=x.to(dtype), timestep=ts, encoder_hidden_states=neg,
                               return_dict=False)[0].float()
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
    """Run dense calibration and return a :class:`~scaling_attn_compile.plan.Plan` (no schedule).

    For every captured (input, step, branch) and layer: ``west.block_mass`` of q/k (Triton on
    CUDA, chunked torch on CPU), threshold codes, and the running min (union) per layer. The
    accumulated codes stay on ``accumulate_device`` (default: the model's device).
    ``token_order``: which tokens share a block (``"raster"``, ``"tile"``, ``"tile:FxHxW"``;
    ``None``: raster, so code that binds a plan's masks to raster-order q/k itself keeps
    working; the CLI and the demo default to ``token_order.NEW_PLAN_ORDER``); q/k are permuted
    into it before block pooling.
    """
    from ..plan.plan import Plan
    from ..contract.token_order import TokenOrder, in_token_order

    order = TokenOrder.parse(token_order)

    model = _unwrap(transformer)
    if not inputs:
        raise ValueError("calibrate_west: inputs is empty; pass at least one CalibrationInput")
    grid = token_grid(model, latent_shape)
    seq_len = math.prod(grid)
    param = next(model.parameters())
    acc = west.ThresholdAccumulator(len(model.blocks), model.config.num_attention_heads, seq_len,
                                    device=accumulate_device or param.device)

    def on_layer(cap: LayerCapture) -> None:
        acc.update(cap.layer, west.block_mass(cap.q, cap.k, impl=block_mass_impl))

    capture_self_attention(model, inputs, timesteps, in_token_order(on_layer, order),
                           latent_shape=latent_shape, capture_steps=capture_steps,
                           guidance_scale=guidance_scale, progress=progress)
    missing = [i for i, n in enumerate(acc.updates) if n == 0]
    if missing:
        raise RuntimeError(f"calibrate_west: layers {missing} were never captured; is "
                           f"blocks.<i>.attn1 running a processor that bypasses __call__?")
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
