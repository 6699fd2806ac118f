"""Which model adapter serves a transformer or a Dynamo graph: the family lookup.

Each family is one adapter module in this folder (``wan``: Wan2.1/2.2, VACE, SkyReels-V2;
``ltx``: LTX-Video; ``hunyuan``: HunyuanVideo) with
the same names (``attention_site``, ``find_timestep``, ``find_latent_grid``, ``is_block_graph``,
``forward_inputs``, ``self_attention_modules``, ``latent_token_grid``, ``num_layers``,
``compute_dtype``, ``SELF_ATTENTION_PATH``, ...) and a table ``SUPPORTED_CLASSES`` of the
diffusers classes it serves. The FX pass, the calibration and the plan ask here, never a family
module directly:

* :func:`adapter_for` (a transformer: by class, through ``torch.compile``'s wrapper);
* :func:`adapter_for_class` (a class name, e.g. a plan's ``model_class``);
* :func:`adapter_for_graph` (a Dynamo graph: by the module classes in its ``nn_module_stack``;
  a graph of no known family's classes is Wan's, whose module paths the pass has always read);
* :func:`capture_for` (the family's q/k capture by processor swap, for the calibration);
* :func:`load_transformer` (a folder by the class its config names, a built-in by name).

A class no adapter knows gets one :class:`~..errors.UnsupportedModelError` naming every
supported class (:func:`check_supported`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from ..errors import UnsupportedModelError
from .fingerprint import _unwrap

# Family adapter modules, in the order their classes are listed in messages; each has a
# capture module ("<family>_capture"). The first is the default of a graph of unknown classes.
FAMILIES = ("wan", "ltx", "hunyuan")


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{name}")


def adapters() -> list[ModuleType]:
    """The family adapter modules, in :data:`FAMILIES` order."""
    return [_module(name) for name in FAMILIES]


def supported_classes() -> dict[str, str]:
    """``{class name: what it is}`` over every family."""
    out: dict[str, str] = {}
    for ad in adapters():
        out.update(ad.SUPPORTED_CLASSES)
    return out


def _refusal(name: str, who: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{who}: model class {name} is not supported; supported: "
                                 f"{', '.join(supported_classes())}")


def adapter_for_class(name: str, who: str = "adapter_for_class", *,
                      default: bool = False) -> ModuleType:
    """The adapter of the diffusers class called ``name``; refused if none serves it (with
    ``default=True``: the first family's, for code that only words messages with it)."""
    for ad in adapters():
        if name in ad.SUPPORTED_CLASSES:
            return ad
    if default:
        return adapters()[0]
    raise _refusal(name, who)


def adapter_for(transformer, who: str = "adapter_for") -> ModuleType:
    """The adapter of ``transformer`` (a diffusers model, or ``torch.compile``'s wrapper of one;
    offload hooks keep the class). Refused with every supported class named if none serves it."""
    return adapter_for_class(type(_unwrap(transformer)).__name__, who)


def check_supported(transformer, who: str) -> None:
    """One clear error for a transformer whose class no adapter knows."""
    adapter_for(transformer, who)


def _class_name(cls) -> str:
    name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return str(name).rsplit(".", 1)[-1]


def graph_classes(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the module classes in a graph's ``nn_module_stack`` entries."""
    out = set()
    for n in gm.graph.nodes:
        for _path, cls in (n.meta.get("nn_module_stack") or {}).values():
            out.add(_class_name(cls))
    return out


def adapter_for_graph(gm: torch.fx.GraphModule) -> ModuleType:
    """The adapter whose module classes (``GRAPH_CLASSES``) the graph's module stack names; a
    graph of none of them (a hand-built module with Wan's paths) is read with Wan's adapter."""
    names = graph_classes(gm)
    for ad in adapters():
        if names & set(getattr(ad, "GRAPH_CLASSES", ())):
            return ad
    return adapters()[0]


def load_transformer(spec: str, **kwargs):
    """Load a transformer of any family (``dtype``, ``device``, ``seed``, ``num_layers`` as
    ``wan.load_transformer``): a folder by the class its ``config.json`` names, a built-in by
    its family's name; anything else (``"tiny"``, a Hub id, errors) goes to Wan's loader."""
    import json
    from pathlib import Path

    from .hub import resolve_model

    path = Path(resolve_model(spec))
    name = None
    for cfg in (path / "transformer" / "config.json", path / "config.json"):
        if cfg.is_file():
            name = json.loads(cfg.read_text()).get("_class_name")
            break
    for ad in adapters()[1:]:
        if name in ad.SUPPORTED_CLASSES or (name is None and spec in ad.BUILTIN_CONFIGS):
            return ad.load_transformer(str(path) if path.is_dir() else spec, **kwargs)
    return adapters()[0].load_transformer(spec, **kwargs)


def capture_for(transformer, who: str = "capture_qk") -> ModuleType:
    """The family's capture module (``capture_qk``, ``LayerCapture``) for ``transformer``."""
    ad = adapter_for(transformer, who)
    return _module(ad.__name__.rsplit(".", 1)[-1] + "_capture")
