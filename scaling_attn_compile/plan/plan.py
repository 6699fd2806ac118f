"""The plan: one file holding a model's WEST topology and (optionally) its FAST schedule.

    plan = load_plan("wan2.1-t2v-1.3b.plan.safetensors")
    plan.check_model(pipe.transformer)                  # clear error on a different model
    tables = plan.materialize((21, 30, 52))            # AttentionTables for one latent grid

File format (``FORMAT_VERSION`` 1): a safetensors file. Tensors:

``west.codes``          uint8 ``(num_layers, H, NB0, NB0)``: threshold codes at the calibration
                        grid (``NB0 = ceil(F0*H0*W0 / 128)``); code ``c`` means ``T in ((c-1)/255,
                        c/255]``, mask at keep-density ``p`` is ``c <= ceil(255 p)`` (see ``topology``).
``fast.levels``         float32 ``(NL,)``, only with a schedule: ascending WEST thresholds ``p``.
``fast.level_tables``   int32 ``(num_layers, NT, H)``: level index per (layer, bucket, head).
``fast.bucket_bounds``  float32 ``(NT - 1,)``: ascending timestep boundaries (``masks`` module).

The JSON metadata sits in the safetensors header under the key ``"scaling_attn_plan"``: format
name and version, model class, config and its fingerprint, a weights fingerprint, layers, heads,
head_dim, block size, patch size, calibration grid and inputs, FAST info, the token order the
blocks are in (``token_order``: ``"raster"``, ``"tile"`` or ``"tile:FxHxW"``, see
``token_order``; files written before it existed load as ``"raster"``, which they are), and a
sha256 of every tensor's bytes (safetensors itself checks the header and sizes, not the data).
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..contract.masks import BLOCK, num_blocks, num_words, pack_blocks
from ..contract.quant import check_precision
from ..contract.tables import AttentionTables
from ..contract.token_order import TokenOrder
from ..contract.token_order import describe as describe_order
from ..errors import PlanError, PlanModelMismatch
from ..models.fingerprint import _unwrap, config_fingerprint, model_config
from ..models.registry import adapter_for
from . import schema, topology

FORMAT = "scaling-attn-plan"
FORMAT_VERSION = 1
META_KEY = "scaling_attn_plan"
DEFAULT_DENSITY = 0.5  # no schedule, no levels: one level at 50% kept blocks (paper: 45-74%)
MAX_TABLE_BYTES = 600 * 10**6  # budget for one grid's materialised tables on the GPU
# Remapped threshold maps kept per plan: Dynamo's default recompile_limit is 8, so a model
# compiled at more resolutions than that runs eager anyway. 14B at 720p: 559 MB per grid.
MAX_CACHED_GRIDS = 8
# "Far" from the asked density: |achieved - asked| > max(0.05, 0.25 x asked). Block rounding
# alone moves a uniform WEST density by up to ~0.05 at 16 blocks (0.25 asked -> 0.199 or 0.318
# on the tiny model); a 1-block calibration grid used at 8 blocks gave 1.0 for 0.3 asked.
DENSITY_WARN_ABS, DENSITY_WARN_REL = 0.05, 0.25

Grid = tuple[int, int, int]


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------

@dataclass
class FastSchedule:
    """FAST: the level each (layer, timestep bucket, head) uses. Filled by ``fast.py`` (issue 5).

    Attributes:
        levels: ascending WEST keep-density thresholds ``p`` in ``(0, 1]``, ``(NL,)``; level ``i``
            of a layer/head is the mask ``T <= levels[i]`` (achieved density >= ``levels[i]``).
        level_tables: int32 ``(num_layers, NT, H)``, values in ``[0, NL)``.
        bucket_bounds: float32 ``(NT - 1,)`` ascending timestep boundaries (0..1000 units);
            ``bucket(t) = #{bounds <= t}``, so a schedule profiled at 50 steps serves 30 too.
        info: JSON-able facts about how it was made (target density, A(l, t) parameters, ...).
    """

    levels: list[float]
    level_tables: torch.Tensor
    bucket_bounds: torch.Tensor
    info: dict = field(default_factory=dict)

    def validate(self, num_layers: int, num_heads: int) -> None:
        lv = list(self.levels)
        if not lv or any(not 0.0 < p <= 1.0 for p in lv) or lv != sorted(lv):
            raise PlanError(f"FastSchedule.levels: expected a non-empty ascending list in (0, 1], "
                            f"got {lv}")
        lt, bb = self.level_tables, self.bucket_bounds
        if lt.dtype != torch.int32 or lt.dim() != 3 or lt.shape[0] != num_layers \
                or lt.shape[2] != num_heads:
            raise PlanError(f"FastSchedule.level_tables: expected int32 (num_layers={num_layers}, "
                            f"NT, H={num_heads}), got {lt.dtype} {tuple(lt.shape)}")
        if lt.numel() and (int(lt.min()) < 0 or int(lt.max()) >= len(lv)):
            raise PlanError(f"FastSchedule.level_tables: values must index levels [0, {len(lv)}), "
                            f"got range [{int(lt.min())}, {int(lt.max())}]")
        if bb.dtype != torch.float32 or bb.dim() != 1 or bb.shape[0] != lt.shape[1] - 1:
            raise PlanError(f"FastSchedule.bucket_bounds: expected float32 (NT-1={lt.shape[1] - 1},), "
                            f"got {bb.dtype} {tuple(bb.shape)}")
        if bb.numel() > 1 and not bool((bb[1:] >= bb[:-1]).all()):
            raise PlanError(f"FastSchedule.bucket_bounds: must be ascending, got {bb.tolist()}")


@dataclass
class PlanMeta:
    """The plan's JSON metadata (see the module doc)."""

    model_class: str
    model_config: dict
    config_fingerprint: str
    weights_fingerprint: str | None
    num_layers: int
    num_heads: int
    head_dim: int
    patch_size: list[int]
    calib_grid: list[int]
    num_calibration_inputs: int
    calibration: dict = field(default_factory=dict)  # timesteps, steps, source, ...
    energy_filter: dict | None = None  # EnergyFilter.to_dict(), applied by the backend
    precision: str = "bf16"  # attention math the backend runs: "bf16", "int8", "fp8" (quant.py)
    # Which tokens share a 128-token block (token_order.py). A file without the key was written
    # before tile order existed, and its blocks are raster strips: the default must stay raster.
    token_order: str = "raster"
    block_size: int = BLOCK
    code_max: int = topology.CODE_MAX
    format: str = FORMAT
    format_version: int = FORMAT_VERSION


@dataclass
class Plan:
    """WEST topology (+ optional FAST schedule) of one model.

    Attributes:
        codes: uint8 ``(num_layers, H, NB0, NB0)`` threshold codes at ``meta.calib_grid``.
        meta: :class:`PlanMeta`.
        schedule: :class:`FastSchedule` or ``None``.
    """

    codes: torch.Tensor
    meta: PlanMeta
    schedule: FastSchedule | None = None
    _remapped: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        m = self.meta
        m.token_order = str(TokenOrder.parse(m.token_order))  # one clear error for a bad spec
        nb0 = num_blocks(math.prod(m.calib_grid))
        want = (m.num_layers, m.num_heads, nb0, nb0)
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != want:
            raise PlanError(f"Plan.codes: expected uint8 {want} for calib_grid {m.calib_grid}, got "
                            f"{self.codes.dtype} {tuple(self.codes.shape)}")
        if self.schedule is not None:
            self.schedule.validate(m.num_layers, m.num_heads)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_codes(cls, codes: torch.Tensor, transformer, calib_grid: Grid,
                   num_calibration_inputs: int, calibration: dict | None = None, *,
                   token_order=None) -> Plan:
        """A plan for ``transformer`` from threshold codes extracted at ``calib_grid (F, H, W)``
        with blocks in ``token_order`` (``None``: raster)."""
        model = _unwrap(transformer)
        ad = adapter_for(model, "Plan.from_codes")
        cfg = model_config(model)
        heads = cfg["num_attention_heads"]
        meta = PlanMeta(
            model_class=type(model).__name__, model_config=cfg,
            config_fingerprint=config_fingerprint(cfg),
            weights_fingerprint=ad.weights_fingerprint(model),
            num_layers=ad.num_layers(model), num_heads=heads, head_dim=cfg["attention_head_dim"],
            patch_size=list(ad.patch_size(model)), calib_grid=list(calib_grid),
            num_calibration_inputs=num_calibration_inputs, calibration=dict(calibration or {}),
            token_order=str(TokenOrder.parse(token_order)))
        return cls(codes.to("cpu", torch.uint8).contiguous(), meta)

    def with_energy_filter(self, energy_filter) -> Plan:
        """A copy that carries an :class:`~scaling_attn_compile.ops.energy.EnergyFilter` (or
        ``None``) in its metadata; the backend applies it unless given one explicitly."""
        from dataclasses import replace

        d = None if energy_filter is None else energy_filter.to_dict()
        return Plan(self.codes, replace(self.meta, energy_filter=d), self.schedule)

    def with_precision(self, precision: str) -> Plan:
        """A copy whose metadata asks the backend for ``precision`` attention ("bf16", "int8",
        "fp8"; ``contract/quant.py``), unless the backend is given one explicitly."""
        from dataclasses import replace

        meta = replace(self.meta, precision=check_precision(precision, "with_precision"))
        return Plan(self.codes, meta, self.schedule)

    @property
    def energy_filter(self):
        from ..ops.energy import EnergyFilter

        d = self.meta.energy_filter
        return None if d is None else EnergyFilter.from_dict(d)

    def with_schedule(self, schedule: FastSchedule | None) -> Plan:
        """This plan with ``schedule`` (validated); the topology is shared, not copied."""
        return Plan(self.codes, self.meta, schedule)

    # ---- basic facts -------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.meta.num_layers

    @property
    def num_heads(self) -> int:
        return self.meta.num_heads

    @property
    def calib_grid(self) -> Grid:
        return tuple(self.meta.calib_grid)

    @property
    def token_order(self) -> TokenOrder:
        """The order the plan's blocks are in, at every grid (``token_order.py``)."""
        return TokenOrder.parse(self.meta.token_order)

    def grid_for(self, latent_shape) -> Grid:
        """Token grid ``(F, H, W)`` of latents ``(B, C, F, H, W)`` or ``(C, F, H, W)`` after patching."""
        f, h, w = (int(x) for x in tuple(latent_shape)[-3:])
        pt, ph, pw = self.meta.patch_size
        if f % pt or h % ph or w % pw:
            raise PlanError(f"grid_for: latent (F, H, W) = {(f, h, w)} must be divisible by the "
                            f"patch size {tuple(self.meta.patch_size)}")
        return (f // pt, h // ph, w // pw)

    # ---- masks -------------------------------------------------------------------------------

    def thresholds(self, grid: Grid | None = None) -> torch.Tensor:
        """Codes ``(num_layers, H, NB, NB)`` at ``grid`` (the calibration grid by default),
        remapped conservatively through 3D block coordinates; cached per grid."""
        grid = self.calib_grid if grid is None else _as_grid(grid, "grid")
        if grid == self.calib_grid:
            return self.codes
        if grid not in self._remapped:
            # remap_codes checks the size before allocating (a pixel size passed as the grid
            # asked for 1.36 TB); the error says what a token grid is.
            try:
                remapped = topology.remap_codes(self.codes, self.calib_grid, grid,
                                            progress=self.codes.shape[-1] > 128,
                                            patch_size=tuple(self.meta.patch_size),
                                            order=self.token_order)
            except ValueError as e:
                raise PlanError(str(e)) from None
            if len(self._remapped) >= MAX_CACHED_GRIDS:  # oldest first (dicts keep order)
                self._remapped.pop(next(iter(self._remapped)))
            self._remapped[grid] = remapped
        return self._remapped[grid]

    def mask(self, layer: int, p: float, grid: Grid | None = None) -> torch.Tensor:
        """bool ``(H, NB, NB)`` block mask of ``layer`` at keep-density threshold ``p``."""
        if not 0 <= layer < self.num_layers:
            raise PlanError(f"layer: expected 0..{self.num_layers - 1}, got {layer}")
        return topology.mask_at(self.thresholds(grid)[layer], p)

    def materialize(self, grid: Grid, levels: list[float] | None = None, *,
                    density: float | None = None, use_schedule: bool = True, device=None,
                    max_bytes: int = MAX_TABLE_BYTES) -> AttentionTables:
        """Bit-packed op tables for one latent grid ``(F, H, W)`` (after patching).

        Which levels:
          * the plan has a FAST schedule (and ``use_schedule``): its levels, level tables and
            bucket bounds; passing ``levels`` or ``density`` too is an error.
          * ``levels=[p0, p1, ...]``: masks ``T <= p_i`` (WEST thresholds, achieved density per
            head >= p_i because of the union); level table ``(1, H)`` zeros, so level 0 is used and
            the others are there for callers that bind their own level table (FAST profiling).
          * ``density=d``: one level per layer and head at the smallest threshold whose mask
            keeps at least ``d`` of the blocks (a uniform *achieved* density baseline).
          * none of these: ``density=DEFAULT_DENSITY`` (0.5).

        Tables live on ``device`` (default CPU). Raises :class:`PlanError` if they would exceed
        ``max_bytes`` (600 MB: Wan2.1-14B at 720p fits 8 levels, see :func:`tables_nbytes`).
        """
        grid = _as_grid(grid, "materialize: grid")
        if grid != self.calib_grid:
            try:  # before the table budget: its message tells token grids from pixels
                topology.check_remap_size(self.num_layers * self.num_heads, self.calib_grid, grid,
                                      patch_size=self.meta.patch_size)
            except ValueError as e:
                raise PlanError(f"materialize: {e}") from None
        sched = self.schedule if use_schedule else None
        if sched is not None and (levels is not None or density is not None):
            raise PlanError("materialize: this plan has a FAST schedule, which fixes the levels; "
                            "got levels/density too. Pass use_schedule=False to override it")
        if levels is not None and density is not None:
            raise PlanError(f"materialize: pass levels or density, not both (got levels={levels}, "
                            f"density={density})")
        if sched is not None:
            levels = list(sched.levels)
        elif levels is not None:
            levels = [float(p) for p in levels]
            if not levels or any(not 0.0 < p <= 1.0 for p in levels):
                raise PlanError(f"materialize: levels must be a non-empty list of thresholds in "
                                f"(0, 1], got {levels}")
        elif density is None:
            density = DEFAULT_DENSITY
        if density is not None and not 0.0 < density <= 1.0:
            raise PlanError(f"materialize: density must be in (0, 1], got {density}; pass the "
                            f"kept-block fraction, e.g. 0.3")
        n_levels = 1 if levels is None else len(levels)
        nbytes = tables_nbytes(self.num_layers, self.num_heads, grid, n_levels,
                               1 if sched is None else sched.level_tables.shape[1])
        if nbytes > max_bytes:
            raise PlanError(f"materialize: tables for grid {grid} with {n_levels} levels need "
                            f"{nbytes / 1e6:.0f} MB, over the {max_bytes / 1e6:.0f} MB budget; "
                            f"use fewer levels or raise max_bytes")
        codes = self.thresholds(grid)
        nb = codes.shape[-1]
        # Build on the target device: packing 14B/720p tables takes ~0.5 s per layer and level
        # on 2 CPU cores, a few ms on a GPU.
        work = torch.device(device) if device is not None else codes.device
        eye = torch.eye(nb, dtype=torch.bool, device=work)
        masks, level_dens = [], []
        for layer in range(self.num_layers):
            c = codes[layer].to(work)  # (H, NB, NB)
            if levels is None:
                cut = topology.codes_for_density(c, density)[:, None, None, None]  # (H, 1, 1, 1)
            else:
                cut = torch.tensor([topology.code_for(p) for p in levels],
                                   device=work)[None, :, None, None]
            # One level at a time: pack_blocks works in int64, 8x the bool size (14B/720p:
            # 115 MB per level instead of ~0.6 GB for five at once).
            words, dens = [], []
            for i in range(cut.shape[1]):
                keep = (c <= cut[:, i]) | eye  # (H, NB, NB)
                dens.append(keep.float().mean(dim=(-1, -2)).cpu())
                words.append(pack_blocks(keep))
            level_dens.append(torch.stack(dens, dim=1))  # (H, L)
            masks.append(torch.stack(words, dim=1).to(device))  # (H, L, NB, W)
        self._warn_if_density_far(grid, density, sched, level_dens)
        if sched is not None:
            level_tables = [sched.level_tables[i].to(device) for i in range(self.num_layers)]
            bounds = sched.bucket_bounds.to(device)
        else:
            level_tables = [torch.zeros(1, self.num_heads, dtype=torch.int32, device=device)
                            for _ in range(self.num_layers)]
            bounds = torch.zeros(0, dtype=torch.float32, device=device)
        return AttentionTables(grid, masks, level_tables, bounds, level_dens,
                               token_order=self.meta.token_order)

    def _warn_if_density_far(self, grid: Grid, density, sched, level_dens) -> None:
        """Warn when the mean kept-block density at ``grid`` is far from the one asked for
        (``density``, or the schedule's ``target_density``): a coarse calibration grid remapped
        to a finer one keeps whole regions (1 block at calibration -> every block kept)."""
        if sched is not None:
            asked = sched.info.get("target_density")
            lt = sched.level_tables.long()  # (num_layers, NT, H)
            # Buckets weighted by the steps they hold where the schedule says (a dense warm-up of
            # 13 of 50 steps is 1 of its 2 buckets), else alike.
            w = torch.tensor(sched.info.get("bucket_steps") or [1.0] * lt.shape[1],
                             dtype=torch.float32)
            w = w / w.sum()
            got = float(torch.stack([(d.gather(1, lt[i].T) * w).sum(1).mean()  # (H, NL)->(H, NT)
                                     for i, d in enumerate(level_dens)]).mean())
        else:
            asked = density
            got = float(torch.stack([d[:, 0] for d in level_dens]).mean())
        if asked is None or abs(got - asked) <= max(DENSITY_WARN_ABS, DENSITY_WARN_REL * asked):
            return
        nb0, nb = self.codes.shape[-1], num_blocks(math.prod(grid))
        if grid == self.calib_grid or nb0 >= nb:
            why = (f"with {nb} blocks per row the masks are too coarse to reach it (the "
                   f"always-kept diagonal alone is 1/{nb} = {1 / nb:.3f}); run a larger grid or "
                   f"ask a density these masks reach")
        else:
            why = (f"the plan was calibrated at grid {self.calib_grid} ({nb0} blocks per row), "
                   f"and each of its blocks covers ~{nb / nb0:.0f} blocks here; calibrate at a "
                   f"grid closer to this one (`scaling-attn west --latent F,H,W`)")
        warnings.warn(f"materialize: mean kept-block density at grid {grid} is {got:.3f}, far "
                      f"from the {asked:g} asked: {why}", stacklevel=3)

    # ---- model check -------------------------------------------------------------------------

    def check_model(self, transformer, *, weights: str = "error") -> None:
        """Raise :class:`PlanModelMismatch` if ``transformer`` is not the model this plan is for.

        The architecture config must match exactly. ``weights``: what to do when the weights
        fingerprint differs (same architecture, other checkpoint, so another topology):
        ``"error"`` (default), ``"warn"`` or ``"ignore"``.
        """
        if weights not in ("error", "warn", "ignore"):
            raise ValueError(f"check_model: weights must be 'error', 'warn' or 'ignore', "
                             f"got {weights!r}")
        model = _unwrap(transformer)
        name = type(model).__name__
        if name != self.meta.model_class:
            raise PlanModelMismatch(f"check_model: plan is for a {self.meta.model_class}, got a "
                                    f"{name}; extract a plan for this model with `scaling-attn west`")
        cfg = model_config(model)
        if config_fingerprint(cfg) != self.meta.config_fingerprint:
            want = self.meta.model_config
            diff = [f"{k}: plan {want.get(k)!r}, model {cfg.get(k)!r}"
                    for k in sorted(set(want) | set(cfg)) if want.get(k) != cfg.get(k)]
            raise PlanModelMismatch("check_model: the model's config differs from the plan's ("
                                    + "; ".join(diff) + "); extract a plan for this model with "
                                    "`scaling-attn west`")
        if weights == "ignore" or self.meta.weights_fingerprint is None:
            return
        got = adapter_for(model, "check_model").weights_fingerprint(model)
        if got is not None and got != self.meta.weights_fingerprint:
            msg = (f"check_model: same architecture but other weights (fingerprint "
                   f"{got} != plan's {self.meta.weights_fingerprint}); WEST topology is "
                   f"weight-encoded, so re-extract for this checkpoint, or pass weights='warn' "
                   f"to use this plan anyway")
            if weights == "error":
                raise PlanModelMismatch(msg)
            warnings.warn(msg, stacklevel=2)

    # ---- files -------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"west.codes": self.codes.contiguous().cpu()}
        if self.schedule is not None:
            s = self.schedule
            out["fast.levels"] = torch.tensor(list(s.levels), dtype=torch.float32)
            out["fast.level_tables"] = s.level_tables.to("cpu", torch.int32).contiguous()
            out["fast.bucket_bounds"] = s.bucket_bounds.to("cpu", torch.float32).contiguous()
        return out

    def save(self, path) -> Path:
        """Write the plan to ``path`` (safetensors + JSON metadata); returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = self.tensors()
        meta = asdict(self.meta)
        meta["schedule"] = None if self.schedule is None else {"info": self.schedule.info}
        meta["sha256"] = {k: _sha256(t) for k, t in tensors.items()}
        meta[schema.CHECKSUM_KEY] = schema.meta_checksum(meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
        # safetensors writes through a 0600 temp file: give the plan the umask's permissions,
        # as open() would, so a shared plan is readable by others (issue 18, item 8).
        mask = os.umask(0)
        os.umask(mask)
        path.chmod(0o666 & ~mask)
        return path

    def summary(self, densities=(0.1, 0.2, 0.3, 0.5)) -> str:
        """Human-readable description: model, calibration, and mask density at a few ``p``."""
        m = self.meta
        lines = [
            f"plan: {m.model_class} {m.num_layers} layers x {m.num_heads} heads, head_dim "
            f"{m.head_dim}, patch {tuple(m.patch_size)}",
            f"calibration grid (F, H, W) = {tuple(m.calib_grid)} -> S = "
            f"{math.prod(m.calib_grid)}, NB = {self.codes.shape[-1]}; "
            f"{m.num_calibration_inputs} calibration inputs",
            describe_order(self.calib_grid, self.token_order),
        ]
        curve = topology.density_by_code(self.codes).mean(dim=(0, 1))  # (256,), no big masks
        for p in densities:
            d = curve[topology.code_for(p)].item()
            lines.append(f"  threshold p = {p:.2f}: mean kept-block density {d:.3f}")
        if (s := self.schedule) is not None:
            levels = [round(float(x), 4) for x in s.levels]  # 0.05, not 0.05000000074505806
            lines.append(f"FAST schedule: {len(s.levels)} levels {levels}, "
                         f"{s.level_tables.shape[1]} timestep buckets")
            lines += [x for x in [schema.describe_fit(s.info)] if x]  # --objective video
        else:
            lines.append("FAST schedule: none")
        return "\n".join(lines)


def _as_grid(grid, what: str) -> Grid:
    """``grid`` as a tuple of three positive Python ints, else a :class:`PlanError`."""
    try:
        out = tuple(operator.index(x) for x in grid)
    except TypeError:
        out = ()
    if len(out) != 3 or min(out) < 1:
        raise PlanError(f"{what}: expected a latent token grid (F, H, W) of three positive ints, "
                        f"got {grid!r}")
    return out


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def tables_nbytes(num_layers: int, num_heads: int, grid: Grid, num_levels: int,
                  num_buckets: int = 1) -> int:
    """Bytes of materialised tables: masks ``L x (H, levels, NB, W)`` int32 + level tables
    ``L x (NT, H)`` int32 + bounds. Wan2.1-14B at 720p (40 x 40, NB 591, W 19): 71.9 MB/level."""
    s = math.prod(grid)
    masks = num_layers * num_heads * num_levels * num_blocks(s) * num_words(s) * 4
    return masks + num_layers * num_buckets * num_heads * 4 + max(0, num_buckets - 1) * 4


