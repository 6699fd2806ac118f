"""Regional compilation: one compiled transformer block serves every layer with its own tables.

    backend = scaling_attn_backend(plan)
    backend.attach(pipe.transformer)          # the tables become buffers on each block
    pipe.transformer.compile_repeated_blocks(backend=backend, fullgraph=True, dynamic=False)

diffusers' ``compile_repeated_blocks`` compiles each ``WanTransformerBlock`` on its own; Dynamo
traces one graph and reuses it for every block, so the graph knows no layer index and cannot
hold a layer's tables as constants (the full-graph path does, :mod:`.rewrite`). Here the tables
are **buffers on each block's self-attention module** and the timestep a buffer the
transformer's forward pre-hook updates in place; the FX pass binds the block's self-attention
SDPA to those buffers, which Dynamo lifts as graph inputs. One compiled block then runs every
layer with that layer's masks, and every step with the step's timestep, without a recompile.

What Dynamo does (torch 2.13, diffusers 0.42.1, ``inline_inbuilt_nn_modules=True``; 2-block
Wan, ``compile_repeated_blocks(fullgraph=True, dynamic=False)``, measured on the CPU):

* buffers that the traced code does not read are **not** lifted: with the four buffers
  registered but unused, the block graph had 32 placeholders (the block's 27 parameters, temb,
  hidden_states, the two RoPE tables, the text), none of them ours. So each self-attention
  module gets a forward pre-hook that passes its buffers to a no-op custom op
  (``scaling_attn::bind_tables``, :mod:`..ops.bind`); the graph then had 36 placeholders
  (``L['self']._modules['<attention>']._buffers['scaling_attn_masks']`` and three more), and the
  op node carries the attention module's path, which is how the pass pairs it with the SDPA;
* 1 graph, 1 backend call for 2 blocks x 3 timesteps (``unique_graphs`` 1): the guards check
  the buffers' shape, dtype and device, not their identity or values, so each block's own
  masks reached the compiled code (values 0, 1, 0, 1, ... per call), and the timestep buffer's
  in-place update did not recompile;
* rebinding every block's masks to new tensors of the same shape: no recompile (1 graph);
  of another shape (another resolution): one new graph (2), shared by all blocks again.

So buffers keep one shape per resolution for every layer (masks are padded to the most levels
of any layer), and the timestep buffer is written in place, never rebound, while its shape holds.

A plan in tile order (``contract/token_order.py``) needs the tokens permuted once before the
blocks and back once after, which the full-graph path does in its graph (``order_pass.py``).
A block graph holds neither end, so here forward hooks on the family's ``ORDER_SITES`` modules
do it eagerly, outside the compiled blocks: the patch embedding's ``[B, C, F, H, W]`` output is
rearranged so that Wan's ``flatten(2)`` reads its tokens in the plan's order, the RoPE module's
``[1, S, 1, D]`` tables are gathered alike, and the output projection's ``[B, S, C_out]`` is
gathered back to raster order. The blocks are token-wise except for attention and RoPE, so the
output is the full-graph compile's (a test checks it against the full graph).
"""

from __future__ import annotations

import logging
import math
import re
import warnings

import torch

from ..contract.masks import launch_order, num_blocks
from ..contract.token_order import TokenOrder, inverse_permutation, permutation
from ..contract.validate import check_site_fits_kernel
from ..errors import PlanMismatchError
from ..kernels.launch import launch_order_enabled
from ..models.graph import node_value as _val
from ..models.registry import adapter_for
from ..ops.bind import BIND_TABLES

log = logging.getLogger("scaling_attn_compile")

# Buffer names on each self-attention module, in bind_tables' argument order.
BUFFERS = ("scaling_attn_masks", "scaling_attn_level_table", "scaling_attn_bucket_bounds",
           "scaling_attn_timestep", "scaling_attn_launch_order")


def _bind_hook(module, args):
    masks, level_table, bounds, timestep, order = (getattr(module, n) for n in BUFFERS)
    if masks is not None:
        torch.ops.scaling_attn.bind_tables(masks, level_table, bounds, timestep, order)


class RegionalTables:
    """The per-layer tables of one transformer, kept on its self-attention modules; see the
    module docstring. Made by :meth:`ScalingAttnBackend.attach`; :meth:`detach` undoes it."""

    def __init__(self, backend, transformer):
        ad = adapter_for(transformer, "scaling_attn_backend.attach")
        # Its functions, not the module: a model holding this hook may be deep-copied.
        self._forward_inputs, self._forward_grid = ad.forward_inputs, ad.forward_grid
        if backend.parallel is not None or backend.head_range is not None:
            raise PlanMismatchError(
                "scaling_attn_backend.attach: regional compilation with parallel=/head_range= "
                "(Ulysses heads) is not supported yet; compile the whole transformer with "
                "torch.compile(transformer, backend=backend) instead")
        if backend.model_check is not None:  # no block graph holds every layer's weights
            from .model_check import module_parameters

            backend.model_check.check_params(module_parameters(transformer))
        self.backend, self.transformer = backend, transformer
        self.modules = ad.self_attention_modules(transformer)
        self.num_layers = len(self.modules)
        self.grid: tuple[int, int, int] | None = None
        self._key = None
        self._layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._timestep: torch.Tensor | None = None
        self._handles = []
        self._perm: torch.Tensor | None = None  # the plan's token order at this grid, or None
        self._inv: torch.Tensor | None = None
        self._order_sites = ad.ORDER_SITES
        self._order_modules = self._find_order_modules(transformer, ad.ORDER_SITES)
        for m in self.modules:
            for name in BUFFERS:
                # persistent=False: not in state_dict, so saving the model saves no tables.
                m.register_buffer(name, None, persistent=False)
            self._handles.append(m.register_forward_pre_hook(_bind_hook))
        self._handles.append(transformer.register_forward_pre_hook(self._update, with_kwargs=True))
        if self._order_modules is not None:
            emb, rope, out = self._order_modules
            self._handles += [emb.register_forward_hook(self._embedding_hook),
                              rope.register_forward_hook(self._rope_hook),
                              out.register_forward_hook(self._output_hook)]

    @staticmethod
    def _find_order_modules(transformer, sites):
        """The (embedding, RoPE, output projection) modules the token order is applied at, or
        ``None`` where the family has no ``ORDER_SITES`` or this model has modules the hooks
        would not permute (VACE's control embedding): then a tile-order plan is refused."""
        if sites is None:
            return None
        names = dict(transformer.named_modules())

        def one(pattern):
            hits = [m for n, m in names.items() if n and re.search(pattern, "self." + n)]
            return hits[0] if len(hits) == 1 else None

        if any(one(p) is not None for p in sites.extra_embeddings):
            return None
        found = tuple(one(p) for p in (sites.embedding, sites.rope_tables, sites.output))
        return None if any(m is None for m in found) else found

    # Token-order hooks (tile-order plans; no-ops for raster and inside a whole-model compile,
    # whose graph permutes by itself): outside the compiled blocks, eager.
    def _active(self) -> bool:
        return self._perm is not None and not torch.compiler.is_compiling()

    def _embedding_hook(self, _module, _args, out):
        if not self._active():
            return None
        if out.dim() != 5 or math.prod(out.shape[2:]) != self._perm.numel():
            raise PlanMismatchError(
                f"scaling_attn_backend: the patch embedding gave {tuple(out.shape)}, not "
                f"[B, C, F, H, W] over the grid {self.grid}; a tile-order plan cannot be "
                "applied to it regionally")
        # flatten(2) of the result reads the tokens in the plan's order.
        return out.flatten(2).index_select(2, self._perm).view(out.shape)

    def _rope_hook(self, _module, _args, out):
        if not self._active():
            return None
        if isinstance(out, torch.Tensor):
            return out.index_select(1, self._perm)
        return type(out)(t.index_select(1, self._perm) for t in out)  # Wan: (cos, sin)

    def _output_hook(self, _module, _args, out):
        return out.index_select(1, self._inv) if self._active() else None

    def detach(self) -> None:
        """Remove the hooks and buffers; the model is as before :meth:`attach`."""
        for h in self._handles:
            h.remove()
        for m in self.modules:
            for name in BUFFERS:
                m._buffers.pop(name, None)
        self._handles = []
        if self in self.backend.attached:
            self.backend.attached.remove(self)
        if self.backend.current is self:
            self.backend.current = None

    def _tables(self, grid, device):
        """Each layer's ``(masks, level_table, bucket_bounds, launch_order)``, masks padded to
        the most levels of any layer (repeating the last level: the level table never points
        there), so every block's buffers have one shape and the one block graph fits them all.
        ``launch_order`` is ``None`` under ``SCALING_ATTN_LAUNCH_ORDER=0``."""
        tables, per_layer = self.backend.tables_for(grid, device)
        if len(per_layer) != self.num_layers:
            raise PlanMismatchError(
                f"scaling_attn_backend: the model has {self.num_layers} self-attention layers, "
                f"the plan has {len(per_layer)}; use the plan made for this model")
        order = TokenOrder.parse(getattr(tables, "token_order", None))
        if not order.is_raster and self._order_modules is None:
            raise PlanMismatchError(
                f"scaling_attn_backend: the plan's blocks are in {order} order, which regional "
                f"compilation of {type(self.transformer).__name__} cannot run (no token-order "
                "sites, or a VACE control embedding); compile the whole transformer, or extract "
                "a raster plan (scaling-attn west --token-order raster)")
        self._perm = self._inv = None
        if not order.is_raster:
            self._perm = permutation(tuple(grid), order).to(device)
            self._inv = inverse_permutation(tuple(grid), order).to(device)
        levels = max(m.shape[1] for m, _, _ in per_layer)
        s, with_order = math.prod(grid), launch_order_enabled()
        out = []
        for m, lt, b in per_layer:
            if m.shape[1] < levels:
                m = torch.cat([m] + [m[:, -1:]] * (levels - m.shape[1]), 1)
            out.append((m, lt, b, launch_order(m, lt, s) if with_order else None))
        return out

    @torch.no_grad()
    def _update(self, _module, args, kwargs):
        """Transformer forward pre-hook: the tables for this call's grid, and its timestep."""
        if torch.compiler.is_compiling():  # a whole-model compile binds its own constants
            return
        hidden, timestep = self._forward_inputs(args, kwargs)
        be = self.backend
        if be.grid is not None:
            grid = be.grid
        elif be.patch_size is not None and getattr(hidden, "dim", lambda: 0)() == 5:
            grid = tuple(s // p for s, p in zip(hidden.shape[2:], be.patch_size, strict=True))
        else:  # the family's reading of the call (Wan: hidden_states [B, C, F, H, W])
            grid = self._forward_grid(self.transformer, args, kwargs)
        key = (tuple(grid), str(hidden.device))
        if key != self._key:
            self._layers, self._key, self.grid = self._tables(grid, hidden.device), key, tuple(grid)
        if timestep is None:
            timestep = torch.zeros((), device=hidden.device)
        elif not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, device=hidden.device)
        if timestep.dim() == 2 and self._perm is not None:
            raise PlanMismatchError(
                "scaling_attn_backend: a per-token timestep (Wan2.2 TI2V) with a tile-order "
                "plan is not supported by regional compilation yet; compile the whole "
                "transformer, or extract a raster plan (scaling-attn west --token-order raster)")
        if timestep.dim() == 2:  # per token (B, S), Wan2.2 TI2V-5B: the step's is the max
            timestep = timestep.amax(1)
        ts = self._timestep
        if ts is None or ts.shape != timestep.shape or ts.dtype != timestep.dtype or (
                ts.device != hidden.device):
            # A new shape recompiles the block once; same-shape steps only copy in place.
            self._timestep = ts = torch.empty_like(timestep, device=hidden.device)
        ts.copy_(timestep)
        for m, tabs in zip(self.modules, self._layers, strict=True):
            # Rebound only when another resolution, or model.to(...) (which copies buffers per
            # module), replaced them; an identity check per layer otherwise.
            masks, lt, bounds, order = tabs
            for name, t in zip(BUFFERS, (masks, lt, bounds, ts, order), strict=True):
                if m._buffers.get(name) is not t:
                    m._buffers[name] = t
        be.current = self


def module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def rewrite_block_sites(gm: torch.fx.GraphModule, sites: list[tuple], report, *, attached,
                        head_dim, energy, op, precision: str = "bf16",
                        warn_stacklevel: int = 4) -> None:
    """The regional FX pass: each self-attention site of a block graph (no layer index) becomes
    the op bound to the ``bind_tables`` arguments of the same module (graph inputs: the block's
    buffers). ``attached``: the :class:`RegionalTables` whose forward is running. Sites with no
    tables attached stay dense with a warning. ``precision`` ``"int8"``/``"fp8"``: ``op`` is the
    8-bit op, which takes the precision as its last argument and has no launch order."""
    g = gm.graph
    binds = {module_path(n): n for n in g.nodes if n.target in BIND_TABLES}
    for n, _layer, path, qn, kn, vn, scale in sites:
        bind = binds.get(path)
        if bind is None or attached is None:
            warnings.warn(
                f"scaling_attn_backend: {path} is a transformer block compiled on its own "
                "(regional compilation) without the plan's tables; it runs dense. Call "
                "backend.attach(transformer) before transformer.compile_repeated_blocks("
                "backend=backend)", stacklevel=warn_stacklevel)
            report.left_dense["regional block without attached tables"] = (
                report.left_dense.get("regional block without attached tables", 0) + 1)
            continue
        q, masks, ts = _val(qn), _val(bind.args[0]), _val(bind.args[3])
        b, h, s = q.shape[:3]
        grid = attached.grid
        if math.prod(grid) != s or masks.shape[0] != h or masks.shape[2] != num_blocks(s):
            raise PlanMismatchError(
                f"scaling_attn_backend: {path} runs {h} heads over S={s} tokens; the attached "
                f"tables are for {masks.shape[0]} heads over the grid {grid} "
                f"(S={math.prod(grid)}); use the plan made for this model")
        check_site_fits_kernel(path, q, head_dim)
        if not (ts.dim() == 0 or (ts.dim() == 1 and ts.shape[0] in (1, b))):
            raise PlanMismatchError(
                f"scaling_attn_backend: the timestep must be a tensor of shape ({b},) or (), "
                f"got {tuple(ts.shape)} (a per-token timestep, as in Wan2.2 TI2V, is not "
                "supported)")
        args = (qn, kn, vn, *bind.args[:3], bind.args[3], scale)
        filtered = ()
        if energy is not None:
            per_layer = {energy(layer, s) for layer in range(attached.num_layers)}
            if len(per_layer) != 1:
                raise PlanMismatchError(
                    "scaling_attn_backend: the energy filter differs per layer "
                    f"({sorted(per_layer)}), which one compiled block cannot hold; compile the "
                    "whole transformer, or use one threshold for every layer")
            (rule, threshold), = per_layer
            filtered = (rule, threshold) if rule else ()
        order = bind.args[4] if len(bind.args) > 4 else bind.kwargs.get("launch_order")
        kwargs = {"launch_order": order} if order is not None else {}
        if precision != "bf16":  # the 8-bit op takes no launch order
            args, kwargs = (*args, precision, *filtered), {}
        else:
            args = (*args, *filtered)
        with g.inserting_before(n):
            new = g.call_function(op, args, kwargs)
        new.meta.update(n.meta)
        new.meta["example_value"] = torch.empty_like(q)
        n.replace_all_uses_with(new)
        g.erase_node(n)
        report.block_sites += 1
    report.grid = attached.grid if attached is not None and report.block_sites else report.grid
    report.seq_len = math.prod(report.grid) if report.grid else None


def drop_bind_calls(gm: torch.fx.GraphModule) -> int:
    """Erase the ``bind_tables`` markers (they have no outputs; a whole-model graph binds its
    own constants). Returns how many there were."""
    binds = [n for n in gm.graph.nodes if n.target in BIND_TABLES]
    for n in binds:
        gm.graph.erase_node(n)
    return len(binds)
