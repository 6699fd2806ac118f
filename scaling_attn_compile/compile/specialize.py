"""Compile a Dynamo graph that has symbolic sizes once per concrete shape.

``torch.compile(transformer, backend=...)`` without ``dynamic=False`` compiles the first
resolution with static shapes; at the second one Dynamo's *automatic dynamic* recompiles with the
changed sizes symbolic (and ``dynamic=True`` does so from the start). Block masks exist per
static latent grid, so the sparse rewrite cannot run on such a graph. Rather than fail
(``BackendCompilerFailed``, what the README snippet did at a second resolution), the backend
returns :class:`PerShape`: at the first call with new sizes it copies the graph, puts the
concrete sizes in for its size inputs, re-propagates fake tensors (so every node's
``example_value`` is static again) and compiles that copy the normal way. Each resolution then
costs one compile, as with ``dynamic=False``; Dynamo itself does not recompile.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx.node import map_aggregate

log = logging.getLogger("scaling_attn_compile")

# Compiled shapes kept per graph, oldest dropped first: Dynamo's default recompile_limit is 8,
# so dynamic=False would run a ninth resolution eager.
MAX_SHAPES = 8


def _symbolic(x) -> bool:
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    return isinstance(x, torch.Tensor) and any(not isinstance(d, int) for d in x.shape)


def is_symbolic(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    """Does the graph take size inputs or tensors with symbolic sizes?"""
    if any(_symbolic(x) for x in example_inputs):
        return True
    return any(_symbolic(n.meta.get("example_value")) for n in gm.graph.nodes
               if n.op == "placeholder")


class _FakeProp(torch.fx.Interpreter):
    """Runs the graph on fake tensors and records each result as Dynamo's ``example_value``."""

    def run_node(self, n):
        result = super().run_node(n)
        if n.op != "output":
            n.meta["example_value"] = result
        return result


def _substitute(node: torch.fx.Node, value) -> None:
    """Every use of ``node`` becomes the Python constant ``value``."""
    for user in list(node.users):
        swap = lambda a, node=node: value if a is node else a  # noqa: E731
        user.args = map_aggregate(user.args, swap)
        user.kwargs = map_aggregate(user.kwargs, swap)


def scalar_positions(gm: torch.fx.GraphModule) -> list[int]:
    """Placeholders that carry a Python float as a 0-d tensor (``dynamic=True`` does this to
    float attributes such as a LayerNorm's ``eps``; the graph calls ``.item()`` on them)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, n in enumerate(placeholders)
            if getattr(n.meta.get("grapharg"), "pass_arg_as_tensor", False)]


def specialize(gm: torch.fx.GraphModule, args: Sequence[Any], int_positions: Sequence[int],
               scalars: Sequence[int] = ()) -> torch.fx.GraphModule:
    """A static copy of ``gm`` for ``args``: the size inputs at ``int_positions`` and the
    wrapped scalars at ``scalars`` become constants (and leave the signature), and node
    metadata is re-propagated with static fakes. Node metadata other than ``example_value``
    (module stack, sources) is kept."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = torch.fx.Graph()
    env: dict = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    for old, copied in env.items():  # AOT reads each placeholder's source (static inputs)
        if hasattr(old, "_dynamo_source"):
            copied._dynamo_source = old._dynamo_source
    new = torch.fx.GraphModule(gm, graph)
    new.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = dict(gm._param_name_to_source)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for i in int_positions:
        _substitute(placeholders[i], args[i])
        graph.erase_node(placeholders[i])
    for i in scalars:
        node, value = placeholders[i], args[i]
        for user in list(node.users):
            if user.op == "call_method" and user.target == "item":
                _substitute(user, value.item())
                graph.erase_node(user)
        if node.users:  # also used as a tensor: a constant buffer of the same value
            name = f"_specialized_scalar_{i}"
            new.register_buffer(name, value.detach().clone())
            with graph.inserting_before(node):
                node.replace_all_uses_with(graph.get_attr(name))
        graph.erase_node(node)
    new.recompile()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    skip = set(int_positions) | set(scalars)
    fakes = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a
             for i, a in enumerate(args) if i not in skip]
    with mode:
        _FakeProp(new).run(*fakes)
    return new


class PerShape:
    """The callable handed back to Dynamo for a graph with symbolic sizes.

    ``compile_static(gm, example_inputs) -> callable`` is the backend's path for static graphs;
    it runs at the first call with each new set of sizes (at most :data:`MAX_SHAPES` kept).
    """

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 compile_static: Callable):
        self.gm = gm
        self.compile_static = compile_static
        self.int_positions = [i for i, x in enumerate(example_inputs)
                              if isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)]
        self.scalars = scalar_positions(gm)
        self._skip = set(self.int_positions) | set(self.scalars)
        # Tensors with symbolic sizes: their sizes are also in the key (Dynamo lifts each free
        # size as an int input, so this is belt and braces).
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.sym_tensors = [i for i, n in enumerate(placeholders)
                            if isinstance(n.meta.get("example_value"), torch.Tensor)
                            and _symbolic(n.meta["example_value"])]
        self.compiled: OrderedDict[tuple, Callable] = OrderedDict()

    def __call__(self, *args):
        key = (tuple(int(args[i]) for i in self.int_positions),
               tuple(tuple(args[i].shape) for i in self.sym_tensors),
               tuple(args[i].item() for i in self.scalars))
        fn = self.compiled.get(key)
        if fn is None:
            log.info("graph with symbolic sizes: compiling it for sizes %s", key)
            static = specialize(self.gm, args, self.int_positions, self.scalars)
            tensors = [a for i, a in enumerate(args) if i not in self._skip]
            fn = self.compile_static(static, tensors)
            if len(self.compiled) >= MAX_SHAPES:
                self.compiled.popitem(last=False)
            self.compiled[key] = fn
        else:
            self.compiled.move_to_end(key)
        return fn(*[a for i, a in enumerate(args) if i not in self._skip])
