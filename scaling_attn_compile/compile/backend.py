"""The ``torch.compile`` backend: block-sparse self-attention in a diffusers Wan transformer.

    backend = scaling_attn_backend(plan)                  # build ONCE, reuse for every compile
    transformer = torch.compile(transformer, backend=backend, fullgraph=True, dynamic=False)

    # or by name, through the torch_dynamo_backends entry point "scaling_attn":
    transformer = torch.compile(transformer, backend="scaling_attn", options={"plan": plan})

    # or regionally (diffusers' compile_repeated_blocks), tables attached to the blocks first:
    backend.attach(transformer)
    transformer.compile_repeated_blocks(backend=backend, fullgraph=True, dynamic=False)

For each graph Dynamo hands it, the backend

0. checks that the graph's parameters are the plan's model (config shapes and the attention
   weights fingerprint, ``check_model``); a graph with symbolic sizes is compiled per concrete
   size at its first call instead (``on_dynamic_shapes="specialize"``, :mod:`.specialize`);
1. finds the latent grid ``(F, H, W)`` after patching (the output shape of the patch-embedding
   Conv3d applied to the ``hidden_states`` input ``[B, C, F, H, W]``), materialises the plan for
   it and checks the plan against the model (layers, heads, head_dim, sequence length);
2. rewrites every ``F.scaled_dot_product_attention`` call of self-attention (the model adapter,
   :mod:`..models.registry` picks it per graph, reads the layer from ``nn_module_stack``; ``Sq == Sk``, no mask, no
   dropout, not causal)
   into ``torch.ops.scaling_attn.sparse_attention`` bound to layer ``i``'s tables (graph buffers
   with a ``ConstantSource``, so their values stay out of compiled code and caches) and the
   transformer's ``timestep`` input (density is looked up on the device: no recompile per step);
3. hands the graph to Inductor's ``compile_fx``; the op's lowering (:mod:`.lowering`) makes it a
   Triton template kernel on CUDA and an extern call to the eager op elsewhere.

A graph of one block (regional compilation, :mod:`.regional`) has no layer index and no patch
embedding: its self-attention is bound to the block's attached buffers instead of constants.

Cross-attention (text, and text + image for I2V) is never touched. The design and the
reasons are in ``DESIGN.md``.

Logging: logger ``scaling_attn_compile``; INFO gives one line per compiled graph with the
rewrite count per layer; ``verbose=True`` attaches a stderr handler at INFO.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..contract.tables import AttentionTables
from ..contract.validate import check_attention_tables
from ..errors import PlanMismatchError
from ..models.registry import adapter_for_graph
from . import lowering as _lowering  # registers the Inductor lowering of the op
from . import lowering_q8 as _lowering_q8  # noqa: F401  (and of the 8-bit op)
from .joint import rewrite_joint_attention
from .parallel import ulysses_head_range, ulysses_rank
from .rewrite import RewriteReport, _pad_bounds, _register_constant, rewrite_self_attention
from .specialize import PerShape, is_symbolic

log = logging.getLogger("scaling_attn_compile")


# --------------------------------------------------------------------------------------------
# Graph inspection helpers
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The FX pass
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Sequence parallelism: which of the plan's heads this rank runs
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class ScalingAttnBackend:
    """A ``torch.compile`` backend callable; see :func:`scaling_attn_backend`.

    Attributes:
        reports: one :class:`RewriteReport` per graph compiled, in order.
    """

    def __init__(self, plan, *, inductor_config: Mapping[str, Any] | None = None,
                 patch_size: Sequence[int] | None = None, grid: Sequence[int] | None = None,
                 on_dynamic_shapes: str = "specialize", compiler: str | Callable = "inductor",
                 hash_kernel_sources: bool = True, materialize_kwargs: Mapping | None = None,
                 energy_filter=None, head_range: Sequence[int] | None = None,
                 parallel=None, check_model: str | bool = "weights", precision: str | None = None,
                 fa4: bool = True, verbose: bool = False):
        if not (isinstance(plan, AttentionTables) or hasattr(plan, "materialize")
                or callable(plan)):
            raise TypeError(
                "scaling_attn_backend: plan must be AttentionTables, an object with "
                f".materialize(grid) -> AttentionTables, or a callable grid -> AttentionTables; "
                f"got {type(plan).__name__}")
        if on_dynamic_shapes not in ("specialize", "error", "dense"):
            raise ValueError("scaling_attn_backend: on_dynamic_shapes must be 'specialize', "
                             f"'error' or 'dense', got {on_dynamic_shapes!r}")
        if not (compiler in ("inductor", "eager") or callable(compiler)):
            raise ValueError("scaling_attn_backend: compiler must be 'inductor', 'eager' or a "
                             f"callable (gm, example_inputs) -> callable, got {compiler!r}")
        if patch_size is not None and len(tuple(patch_size)) != 3:
            raise ValueError("scaling_attn_backend: patch_size must be (pt, ph, pw), got "
                             f"{patch_size!r}")
        if head_range is not None and parallel is not None:
            raise ValueError("scaling_attn_backend: pass head_range=(h0, h1) or parallel=..., "
                             "not both (both say which heads this rank holds)")
        if head_range is not None and (len(tuple(head_range)) != 2 or not all(
                isinstance(x, int) for x in head_range)):
            raise ValueError("scaling_attn_backend: head_range must be (h0, h1), ints, got "
                             f"{head_range!r}")
        if isinstance(parallel, str) and parallel != "auto":
            raise ValueError("scaling_attn_backend: parallel must be 'auto', (rank, degree), a "
                             "diffusers ContextParallelConfig/ParallelConfig or the transformer; "
                             f"got {parallel!r}")
        self.head_range = tuple(head_range) if head_range is not None else None
        # Resolved at compile time, not here: diffusers sets the Ulysses rank up in
        # enable_parallelism, which may come after the backend is built.
        self.parallel = parallel
        self.plan = plan
        self.inductor_config = dict(inductor_config or {})
        self.patch_size = tuple(patch_size) if patch_size is not None else None
        self.grid = tuple(grid) if grid is not None else None
        self.on_dynamic_shapes = on_dynamic_shapes
        self.compiler = compiler
        self.hash_kernel_sources = hash_kernel_sources
        self.materialize_kwargs = dict(materialize_kwargs or {})
        from ..ops.energy import EnergyFilter

        if energy_filter is None:  # the plan may carry one (Plan.with_energy_filter)
            energy_filter = getattr(plan, "energy_filter", None)
        if isinstance(energy_filter, Mapping):
            energy_filter = EnergyFilter.from_dict(energy_filter)
        if energy_filter is not None and not isinstance(energy_filter, EnergyFilter):
            raise TypeError("scaling_attn_backend: energy_filter must be an EnergyFilter, a dict "
                            f"of its fields, or None; got {type(energy_filter).__name__}")
        self.energy_filter = energy_filter
        if not isinstance(fa4, bool):
            raise TypeError(f"scaling_attn_backend: fa4 must be True or False, got {fa4!r}")
        self.fa4 = fa4
        from ..contract.quant import check_precision

        if precision is None:  # the plan may carry one (Plan.with_precision)
            precision = getattr(getattr(plan, "meta", None), "precision", None) or "bf16"
        self.precision = check_precision(precision, "scaling_attn_backend: precision")
        if self.materialize_kwargs and not hasattr(plan, "materialize"):
            raise ValueError("scaling_attn_backend: materialize_kwargs needs a plan with "
                             f".materialize(grid, **kwargs), got {type(plan).__name__}")
        meta = getattr(plan, "meta", None)
        self.head_dim = getattr(plan, "head_dim", None) or getattr(meta, "head_dim", None)
        from .model_check import ModelCheck

        # Checked before the first compile, from the graph's parameters (the backend never
        # sees the transformer itself); AttentionTables and callables record no model.
        check = ModelCheck(plan, check_model)  # validates the option
        self.model_check = check if ModelCheck.applies(plan) else None
        self.reports: list[RewriteReport] = []
        self.attached: list = []  # RegionalTables, one per attached transformer
        self.current = None  # the attached transformer whose forward is running
        self._tables: dict[tuple, tuple[AttentionTables, list]] = {}
        if verbose:
            log.setLevel(logging.INFO)
            if not log.handlers:
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
                log.addHandler(handler)

    # One materialisation per (grid, device): recompiles (new graph, same resolution) and the
    # graphs of a model with graph breaks share the same device tensors.
    def tables_for(self, grid: tuple[int, int, int], device: torch.device):
        key = (tuple(grid), str(device))
        if key not in self._tables:
            plan = self.plan
            if isinstance(plan, AttentionTables):
                tables = plan
            elif hasattr(plan, "materialize"):
                tables = plan.materialize(tuple(grid), **self.materialize_kwargs)
            else:
                tables = plan(tuple(grid))
            check_attention_tables(tables, grid)
            per_layer = []
            bounds = tables.bucket_bounds.to(device=device, dtype=torch.float32)
            for m, lt in zip(tables.masks, tables.level_tables, strict=True):
                lt, b = _pad_bounds(lt.to(device).contiguous(), bounds)
                per_layer.append((m.to(device).contiguous(), lt, b))
            # All layers share one bounds tensor: one graph buffer, not one per layer.
            per_layer = [(m, lt, per_layer[0][2]) for m, lt, _ in per_layer]
            self._tables[key] = (tables, per_layer)
        return self._tables[key]

    def attach(self, transformer):
        """Prepare ``transformer`` for regional compilation (``compile_repeated_blocks``): each
        block's self-attention module holds its layer's tables as buffers, which one compiled
        block reads as graph inputs, and a forward pre-hook keeps them (and the timestep) current
        for each call's resolution and step. Call before the first compiled call:

            backend = scaling_attn_backend(plan)
            backend.attach(transformer)
            transformer.compile_repeated_blocks(backend=backend, fullgraph=True, dynamic=False)

        A whole-model ``torch.compile`` of an attached transformer still works (it binds its own
        constants). Returns the :class:`~.regional.RegionalTables`; its ``detach()`` undoes this.
        See :mod:`.regional` for what Dynamo does with the buffers."""
        from .regional import RegionalTables

        handle = RegionalTables(self, transformer)
        self.attached.append(handle)
        return handle

    def heads_for(self, plan_heads: int) -> tuple[int, int] | None:
        """The plan's heads this process's graphs run (see ``head_range``/``parallel``)."""
        if self.head_range is not None:
            return self.head_range
        rd = ulysses_rank(self.parallel)
        return None if rd is None else ulysses_head_range(plan_heads, *rd)

    def _apply_token_order(self, gm, report: RewriteReport, example_inputs) -> None:
        """Permute the graph's tokens into the tables' order (``order_pass.py``), if not raster."""
        if not report.per_layer:
            return
        orders = {t.token_order if hasattr(t, "token_order") else "raster"
                  for (g, _dev), (t, _) in self._tables.items() if g == tuple(report.grid)}
        if len(orders) != 1:
            raise PlanMismatchError(f"scaling_attn_backend: tables for grid {report.grid} come in "
                                    f"token orders {sorted(orders)}; use one plan per backend")
        (order,) = orders
        if str(order) != "raster" and (self.parallel is not None or self.head_range is not None):
            # Untested: Ulysses' split hooks cut the tokens and RoPE tables after the patch
            # embedding and gather them after the output projection, around where the
            # permutations go.
            raise PlanMismatchError(
                f"scaling_attn_backend: the plan's blocks are in {order} order, which is not yet "
                "supported with sequence parallelism (parallel=/head_range=); extract a "
                "raster-order plan (scaling-attn west --token-order raster)")
        from torch._guards import detect_fake_mode

        from .order_pass import apply_token_order

        ad = adapter_for_graph(gm)
        if ad.ORDER_SITES is None and str(order) != "raster":
            raise PlanMismatchError(
                f"scaling_attn_backend: the plan's blocks are in {order} order, which this model "
                f"family ({', '.join(ad.SUPPORTED_CLASSES)}) cannot run yet; extract a "
                "raster-order plan (scaling-attn west --token-order raster)")
        fake_mode = detect_fake_mode(list(example_inputs)) if example_inputs else None
        if apply_token_order(gm, report.grid, order, timestep=ad.find_timestep(gm),
                             register_constant=_register_constant, fake_mode=fake_mode,
                             sites=ad.ORDER_SITES):
            report.token_order = str(order)

    def config_patches(self) -> dict[str, Any]:
        patches = dict(self.inductor_config)
        if self.hash_kernel_sources:
            patches["post_grad_custom_post_pass"] = _lowering.KernelSourceHash(
                patches.get("post_grad_custom_post_pass"))
        return patches

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        # A block graph's parameter names are the block's; attach() checked the whole model.
        if self.model_check is not None and not adapter_for_graph(gm).is_block_graph(gm):
            self.model_check(gm, example_inputs)
        if self.on_dynamic_shapes == "specialize" and is_symbolic(gm, example_inputs):
            # Dynamo's automatic-dynamic recompile at a second resolution (or dynamic=True):
            # masks exist per static grid, so compile once per concrete size at its first call.
            log.info("graph with symbolic sizes: compiling it per resolution at first call")
            return PerShape(gm, example_inputs, self.compile_static)
        return self.compile_static(gm, example_inputs)

    def compile_static(self, gm: torch.fx.GraphModule, example_inputs):
        """Rewrite and compile one graph (static shapes, or per ``on_dynamic_shapes``)."""
        energy = self.energy_filter.for_layer if self.energy_filter is not None else None
        if getattr(adapter_for_graph(gm), "JOINT_ATTENTION", False):
            # HunyuanVideo: [video | text] attention, joint tables, kv_lens from its text mask
            if self.precision != "bf16":
                raise ValueError(f"scaling_attn_backend: precision={self.precision!r} has no "
                                 "kv_lens (joint text-video attention) path yet; use bf16")
            report = rewrite_joint_attention(
                gm, lambda grid: self.tables_for(grid, torch.device("cpu"))[0],
                example_inputs=example_inputs, patch_size=self.patch_size,
                head_dim=self.head_dim, energy=energy)
        else:
            report = self._rewrite(gm, example_inputs, energy)
        self._finish(gm, report, example_inputs)
        if self.compiler == "eager":
            return gm.forward
        if callable(self.compiler):
            return self.compiler(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        with _lowering.fa4_choice(self.fa4):  # the lowering runs inside this call
            return compile_fx(gm, example_inputs, config_patches=self.config_patches())

    def _rewrite(self, gm, example_inputs, energy) -> RewriteReport:
        report = rewrite_self_attention(
            gm, self.tables_for, example_inputs=example_inputs, patch_size=self.patch_size,
            grid=self.grid, head_dim=self.head_dim,
            on_dynamic_shapes="error" if self.on_dynamic_shapes == "specialize"
            else self.on_dynamic_shapes,
            energy=energy, head_range=self.heads_for, attached=self.current,
            precision=self.precision)
        self._apply_token_order(gm, report, example_inputs)
        return report

    def _finish(self, gm, report: RewriteReport, example_inputs) -> None:
        self.reports.append(report)
        if report.num_rewritten and torch.is_grad_enabled() and any(
                isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
            # AOT would trace a backward through the op, which has no autograd formula, and
            # fail with "Trying to backward through scaling_attn.sparse_attention".
            raise RuntimeError(
                "scaling_attn_backend: the sparse attention op is inference-only, but this "
                "graph was traced with autograd on (parameters require grad); call the compiled "
                "transformer under torch.no_grad() or torch.inference_mode() (diffusers "
                "pipelines already do), or transformer.requires_grad_(False)")
        if report.per_layer:
            counts = ", ".join(f"{k}:{v}" for k, v in sorted(report.per_layer.items()))
            log.info("grid %s (S=%d): rewrote %d self-attention calls "
                     "(layer:count %s); left dense %s", report.grid, report.seq_len,
                     report.num_rewritten, counts, report.left_dense or "{}")
        if report.block_sites:
            log.info("grid %s (S=%d): rewrote %d self-attention calls of one transformer block "
                     "(regional compilation; every layer reads its attached tables); left dense "
                     "%s", report.grid, report.seq_len, report.block_sites,
                     report.left_dense or "{}")


def scaling_attn_backend(plan, **options) -> ScalingAttnBackend:
    """A ``torch.compile`` backend that runs self-attention block-sparse.

    Build it **once** and reuse it: Dynamo guards on the backend object, so a new backend per
    ``torch.compile`` call recompiles.

    Args:
        plan: :class:`~scaling_attn_compile.contract.tables.AttentionTables` for the one latent grid the
            model runs, or an object with ``.materialize(grid) -> AttentionTables`` (a
            :class:`Plan`), or a callable ``grid -> AttentionTables``. ``grid`` is the latent
            ``(F, H, W)`` after patching (``S = F * H * W``).
        inductor_config: config patches for ``compile_fx`` (e.g. ``{"max_autotune": True}``;
            ``{"triton.cudagraphs": True}`` for CUDA graphs).
        patch_size: ``(pt, ph, pw)``; the grid is then ``hidden_states[B, C, F, H, W]`` sizes
            divided by it instead of the patch embedding's output shape.
        grid: the latent grid, for graphs that do not contain the patch embedding.
        on_dynamic_shapes: what to do with a graph whose sizes are symbolic (Dynamo's
            automatic-dynamic recompile at a second resolution, or ``dynamic=True``):
            ``"specialize"`` (default) compiles it once per concrete size at its first call
            (:mod:`.specialize`), so each resolution runs sparse with its own masks;
            ``"error"`` raises :class:`DynamicShapeError`; ``"dense"`` leaves it dense.
        check_model: before compiling, check that the model is the plan's (a :class:`Plan`
            records its model's config and weights fingerprint; see :mod:`.model_check`):
            ``"weights"`` (default) needs both to match; ``"config"`` allows other weights of
            the same architecture (a fine-tune or LoRA of the calibrated model) and logs a
            warning; ``False`` skips the check and logs that. A mismatch raises
            :class:`~scaling_attn_compile.plan.plan.PlanModelMismatch` naming what differs.
        compiler: ``"inductor"`` (default), ``"eager"`` (run the rewritten graph eagerly; for
            debugging) or a callable ``(gm, example_inputs) -> callable``.
        hash_kernel_sources: put the kernel/lowering sources into Inductor's cache key.
        materialize_kwargs: extra keyword arguments for ``plan.materialize(grid, ...)``, e.g.
            ``{"density": 0.25}`` for a plan without a FAST schedule.
        energy_filter: an :class:`~scaling_attn_compile.ops.energy.EnergyFilter` (or a dict of its
            fields): the kernel's online skipping of negligible visited blocks, per layer.
            ``None`` uses the plan's (``Plan.with_energy_filter``), if any.
        parallel: Ulysses sequence parallelism (each rank runs ``H/N`` heads for the whole
            sequence, and binds the plan's heads ``[r*H/N, (r+1)*H/N)``): the transformer after
            ``enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``, that config,
            ``(rank, N)``, or ``"auto"`` (``torch.distributed`` rank and world size; right when
            ``ulysses_degree`` is the world size). See :func:`ulysses_rank`.
        head_range: ``(h0, h1)``, the plan's heads this process runs, for other head splits.
            Without ``parallel``/``head_range`` a model with fewer heads than the plan is an
            error.
        precision: ``"bf16"`` (default: the op in the input dtype, lowered to the Triton
            template), or ``"int8"`` / ``"fp8"``: 8-bit attention (Q.K^T in that format, P.V in
            FP8; ``contract/quant.py``), lowered to its quantize pre-pass and the 8-bit
            template (``compile/lowering``), with the
            energy filter where one is given. ``None`` uses the plan's
            (``Plan.with_precision``), else bf16.
        fa4: offer FlashAttention-4 block-sparse to Inductor's autotuner beside the Triton
            template (default ``True``; it is offered only where ``flash_attn.cute`` imports on
            an sm90 GPU and the call has no energy filter or ``kv_lens``). ``False`` leaves the
            template alone (A/B timing); the environment variable ``SCALING_ATTN_FA4=0`` does the
            same for every backend.
        verbose: log each compiled graph's rewrite counts to stderr.
    """
    return ScalingAttnBackend(plan, **options)


# Backends built by name, one per (plan, options): the same plan and options reuse one backend
# object and so its materialised tables. The plan is kept alive here, so its id stays unique.
_NAMED: dict[tuple, tuple[Any, ScalingAttnBackend]] = {}


def dynamo_backend(gm: torch.fx.GraphModule, example_inputs, *, options: Mapping | None = None,
                   mode: str | None = None):
    """The backend by name, for the ``torch_dynamo_backends`` entry point ``scaling_attn``:

        torch.compile(transformer, backend="scaling_attn", options={"plan": plan, ...})

    ``options`` holds ``plan`` and any keyword of :func:`scaling_attn_backend`; ``mode`` (e.g.
    ``"max-autotune-no-cudagraphs"``) becomes Inductor config patches, as for Inductor.
    """
    options = dict(options or {})
    if "plan" not in options:
        raise ValueError(
            "scaling_attn backend: options must hold the plan, e.g. torch.compile(transformer, "
            "backend='scaling_attn', options={'plan': load_plan(path)}); got options "
            f"{sorted(options)}")
    plan = options.pop("plan")
    if mode is not None:
        from torch._inductor import list_mode_options

        options["inductor_config"] = {**list_mode_options(mode),
                                      **dict(options.get("inductor_config") or {})}
    key = (id(plan), repr(sorted(options.items(), key=lambda kv: kv[0])))
    if key not in _NAMED:
        _NAMED[key] = (plan, ScalingAttnBackend(plan, **options))
    return _NAMED[key][1](gm, example_inputs)
