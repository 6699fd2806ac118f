"""The FX step that runs a Wan transformer in a plan's token order (``token_order.py``).

Wan's blocks are token-wise except for self-attention and RoPE, so the whole stack can run on
permuted tokens at zero per-layer cost. In the Dynamo graph, after the self-attention rewrite
(:func:`backend.rewrite_self_attention`), this step inserts

* ``index_select(1, perm)`` on the patch embedding's ``[B, S, C]`` tokens (after Wan's
  ``flatten(2).transpose(1, 2).contiguous()``);
* ``index_select(1, perm)`` on both RoPE tables ``freqs_cos``/``freqs_sin`` ``[1, S, 1, D]``;
* ``index_select(1, perm)`` on a per-token ``timestep`` ``[B, S]`` (Wan2.2 TI2V), if any;
* ``index_select(1, inv)`` on the output projection's ``[B, S, C_out]``, before the unpatchify
  reshape. After, not before, the projection: it is token-wise too, and its output has
  ``C_out = 16 * 1 * 2 * 2 = 64`` channels against ``5120`` going in at 14B (80x fewer bytes).

Cross-attention is untouched (its keys are text, or CLIP image tokens for I2V); I2V's image
latents are concatenated to ``hidden_states`` in channels before the patch embedding, so they
are permuted with the tokens. Any other non-parameter graph input with ``S`` tokens on dim 1 is
an unknown per-token input: a clear error, never silently left in raster order.

Why permute in the graph rather than have the kernel load rows through the permutation: the
graph does it twice per step (two gathers of the hidden states, ~1.5 GB of traffic at 14B/720p
in bf16, well under a millisecond on an H200 against a 5.4 s step), while a gathering kernel
pays an indirect load for every q/k/v row of every layer (40 layers x 2 CFG passes) and the
RoPE and output would still need the same order.

The module names are the graph's adapter's (its ``ORDER_SITES``, e.g. Wan's ``WAN_SITES``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..contract.token_order import TokenOrder, inverse_permutation, permutation
from ..errors import TokenOrderError
from ..models.graph import OrderSites
from ..models.registry import adapter_for_graph

# Layout ops between the patch embedding Conv3d and the [B, S, C] tokens.
_LAYOUT_METHODS = {"flatten", "transpose", "contiguous", "permute", "reshape", "view"}
BUFFER_PREFIX = "scaling_attn_token_"


def _paths(n: torch.fx.Node) -> list[str]:
    return [str(p) for p, _ in (n.meta.get("nn_module_stack") or {}).values()]


def _in(n: torch.fx.Node, pattern: str) -> bool:
    return any(re.search(pattern, p) for p in _paths(n))


def _named(pattern: str) -> str:
    """The module name a site regex matches, for messages (``\\Wname\\W*$`` -> ``name``)."""
    return re.findall(r"\w+", pattern.replace("\\W", " "))[-1]


def _shape(n) -> tuple | None:
    v = n.meta.get("example_value") if isinstance(n, torch.fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _fail(what: str) -> TokenOrderError:
    return TokenOrderError(
        f"scaling_attn_backend: the plan's blocks are in tile order, but {what}; compile the "
        "whole transformer in one graph (torch.compile(..., fullgraph=True)), or use a "
        "raster-order plan (scaling-attn west --token-order raster)")


def _index_after(gm, node: torch.fx.Node, index: torch.fx.Node, dim: int) -> torch.fx.Node:
    """Insert ``node.index_select(dim, index)`` right after ``node`` (after ``index`` for a
    graph input, which precedes the index buffer); reroute ``node``'s other users to it."""
    users = [u for u in node.users]
    with gm.graph.inserting_after(index if node.op == "placeholder" else node):
        new = gm.graph.call_function(torch.index_select, (node, dim, index))
    v = node.meta.get("example_value")
    new.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
    if isinstance(v, torch.Tensor):
        new.meta["example_value"] = v.clone()  # same shape, dtype and device
    for u in users:
        u.replace_input_with(node, new)
    return new


def _token_start(gm, sites: OrderSites, S: int) -> torch.fx.Node:
    conv = next((n for n in gm.graph.nodes if n.op == "call_function"
                 and n.target in (torch.conv3d, F.conv3d) and _in(n, sites.embedding)), None)
    if conv is None:
        raise _fail(f"the graph has no {_named(sites.embedding)} Conv3d")
    cur = conv
    while len(cur.users) == 1:
        (u,) = cur.users
        name = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
        if name not in _LAYOUT_METHODS:
            break
        cur = u
    shape = _shape(cur)
    if shape is None or len(shape) != 3 or shape[1] != S:
        raise _fail(f"the patch embedding's tokens are not [B, S={S}, C] (got {shape})")
    return cur


def _extra_starts(gm, sites: OrderSites, S: int) -> list[torch.fx.Node]:
    """The [B, S, C] tokens of each extra embedding (VACE's control tokens): after the Conv3d's
    layout ops and the concatenation that pads them to S tokens."""
    out = []
    for pattern in sites.extra_embeddings:
        for conv in [n for n in gm.graph.nodes if n.op == "call_function"
                     and n.target in (torch.conv3d, F.conv3d) and _in(n, pattern)]:
            cur = conv
            while len(cur.users) == 1:
                (u,) = cur.users
                name = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
                if name not in _LAYOUT_METHODS | {"cat"}:
                    break
                cur = u
            shape = _shape(cur)
            if shape is None or len(shape) != 3 or shape[1] != S:
                raise _fail(f"the {_named(pattern)} tokens are not [B, S={S}, C] (got {shape})")
            out.append(cur)
    return out


def _rope_tables(gm, sites: OrderSites, S: int) -> list[torch.fx.Node]:
    inside = {n for n in gm.graph.nodes if n.op != "placeholder" and _in(n, sites.rope_tables)}
    outs = [n for n in inside if any(u not in inside for u in n.users)]
    if not outs:
        raise _fail("the graph has no RoPE module outputs")
    bad = [(n.name, _shape(n)) for n in outs
           if _shape(n) is None or len(_shape(n)) != 4 or _shape(n)[1] != S]
    if bad:
        raise _fail(f"the RoPE outputs are not [1, S={S}, 1, D] (got {bad})")
    return outs


def _token_end(gm, sites: OrderSites, S: int) -> torch.fx.Node:
    lin = [n for n in gm.graph.nodes if n.op == "call_function" and _in(n, sites.output)
           and _shape(n) is not None and len(_shape(n)) == 3]
    if not lin:
        raise _fail(f"the graph has no {_named(sites.output)}")
    cur = lin[-1]
    # Follow token-wise 3-D successors (e.g. a context-parallel gather of the projection's output).
    while len(cur.users) == 1 and (s := _shape(next(iter(cur.users)))) is not None and len(s) == 3:
        cur = next(iter(cur.users))
    if _shape(cur)[1] != S:
        raise _fail(f"{_named(sites.output)}'s output is not [B, S={S}, C] (got {_shape(cur)})")
    return cur


def apply_token_order(gm: torch.fx.GraphModule, grid, order, *, timestep=None,
                      register_constant=None, fake_mode=None,
                      sites: OrderSites | None = None) -> bool:
    """Make the graph run its tokens in ``order`` at ``grid`` (see the module doc), in place.

    ``timestep``: the transformer's timestep placeholder (``backend.find_timestep``);
    ``register_constant(gm, name, tensor, fake_mode) -> get_attr node`` registers the
    permutation buffers (``backend._register_constant``). Returns False for raster order
    (nothing done), True otherwise. Raises :class:`TokenOrderError`.
    """
    if sites is None:  # the graph's family's module names
        sites = adapter_for_graph(gm).ORDER_SITES
    order = TokenOrder.parse(order)
    if order.is_raster:
        return False
    grid = tuple(int(x) for x in grid)
    S = grid[0] * grid[1] * grid[2]
    start = _token_start(gm, sites, S)
    ropes = _rope_tables(gm, sites, S)
    end = _token_end(gm, sites, S)
    extras = _extra_starts(gm, sites, S)
    skip = {start, end, *ropes, *extras, timestep}
    for n in gm.graph.nodes:  # unknown per-token graph inputs would stay in raster order
        s = _shape(n)
        if (n.op == "placeholder" and n not in skip and s is not None and len(s) >= 2
                and s[1] == S and not any(w in n.name for w in ("_parameters", "_buffers",
                                                               "encoder"))):
            raise TokenOrderError(
                f"scaling_attn_backend: graph input {n.name} {s} looks per-token (S={S} on dim "
                "1) and tile order does not know how to permute it; use a raster-order plan "
                "(scaling-attn west --token-order raster)")
    device = start.meta["example_value"].device
    perm = permutation(grid, order).to(device)
    inv = inverse_permutation(grid, order).to(device)
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        p_node = register_constant(gm, BUFFER_PREFIX + "perm", perm, fake_mode)
        i_node = register_constant(gm, BUFFER_PREFIX + "inv", inv, fake_mode)
    _index_after(gm, start, p_node, 1)
    for x in extras:
        _index_after(gm, x, p_node, 1)
    for r in ropes:
        _index_after(gm, r, p_node, 1)
    ts = _shape(timestep) if timestep is not None else None
    if ts is not None and len(ts) == 2 and ts[1] == S:  # per-token timestep (Wan2.2 TI2V)
        _index_after(gm, timestep, p_node, 1)
    _index_after(gm, end, i_node, 1)
    gm.graph.lint()
    gm.recompile()
    return True
