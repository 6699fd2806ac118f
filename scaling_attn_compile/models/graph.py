"""What a model adapter reads off a Dynamo graph: node values, module paths, input sources, and
the sites the token-order step needs. Family-agnostic: no module path of any model is named here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def module_paths(node: torch.fx.Node) -> list[str]:
    return [str(p) for p, _ in (node.meta.get("nn_module_stack") or {}).values()]


def node_value(node) -> Any:
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else node


def is_static(x) -> bool:
    return isinstance(x, int) and not isinstance(x, torch.SymInt)


def source_name(node: torch.fx.Node) -> str:
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    try:
        return source.name() if callable(getattr(source, "name", None)) else str(source.name)
    except Exception:  # noqa: BLE001 - a source without a name is just not matched by name
        return ""


def is_param_or_buffer(node: torch.fx.Node) -> bool:
    name = source_name(node)
    return "_parameters" in name or "_buffers" in name


def timestep_placeholder(gm: torch.fx.GraphModule, embed_module: str | None,
                         exclude: tuple[str, ...] = ("encoder",)) -> torch.fx.Node | None:
    """The transformer's ``timestep`` placeholder: by its source (``L['kwargs']['timestep']``) or
    a placeholder name containing ``timestep`` and none of ``exclude``; failing that (a
    positional call), the first non-parameter placeholder reached walking back from the nodes
    of ``embed_module`` (the family's sinusoidal timestep embedding; ``None``: by name only)."""
    for n in gm.graph.nodes:
        if n.op != "placeholder" or is_param_or_buffer(n):
            continue
        if re.search(r"\[['\"]timestep['\"]\]$", source_name(n)) or (
                "timestep" in n.name and not any(x in n.name for x in exclude)):
            return n
    if embed_module is None:
        return None
    seen = set()
    todo = [x for n in gm.graph.nodes if any(embed_module in p for p in module_paths(n))
            for x in n.all_input_nodes]
    while todo:
        x = todo.pop(0)
        if x in seen:
            continue
        seen.add(x)
        if x.op == "placeholder" and not is_param_or_buffer(x):
            return x
        todo.extend(x.all_input_nodes)
    return None


def find_conv3d(gm: torch.fx.GraphModule, module: str) -> torch.fx.Node | None:
    """The first Conv3d call inside the module named ``module`` (a family's patch embedding)."""
    pattern = rf"(?<!\w){module}"
    return next((n for n in gm.graph.nodes if n.op == "call_function"
                 and n.target in (torch.conv3d, F.conv3d)
                 and any(re.search(pattern, p) for p in module_paths(n))), None)


def conv3d_output_grid(conv: torch.fx.Node | None, module: str) -> tuple[tuple | None, str]:
    """The token grid ``(F, H, W)``: the last three sizes of a patch-embedding Conv3d's
    ``[B, C, F, H, W]`` output (whatever its kernel, stride or padding), and where it came from;
    ``(None, why)`` when there is no such node or it is not 5-D."""
    if conv is None:
        return None, f"no {module} Conv3d in the graph"
    out = node_value(conv)
    if out is None or len(out.shape) != 5:
        return None, f"{module} output is not 5-D"
    return tuple(out.shape[2:]), f"{module} output {tuple(out.shape)}"


@dataclass(frozen=True)
class OrderSites:
    """Where a transformer's token sequence starts and ends in the graph (module path regexes)."""

    embedding: str  # the (patch embedding) Conv3d whose output becomes the [B, S, C] tokens
    rope_tables: str  # the module whose outputs are the per-token RoPE tables [1, S, 1, D]
    output: str  # the token-wise output projection [B, S, C_out]
    # Other Conv3d embeddings whose tokens join the video tokens (VACE's control tokens): each is
    # permuted like the main one, after its layout ops and any padding concatenation.
    extra_embeddings: tuple[str, ...] = ()
