"""Is the compiled model the one a plan was calibrated for? Checked from the Dynamo graph.

A backend called as ``torch.compile(transformer, backend=scaling_attn_backend(plan))`` never
sees the transformer, only Dynamo graphs. Their parameters are there, though: placeholders with
``..._modules['blocks']._modules['0']..._parameters['weight']`` sources and the real tensors as
example inputs (or graph attributes, with ``inline_inbuilt_nn_modules=False``). So:

* **config**: the plan's recorded ``model_config`` is built on the meta device and every
  parameter and buffer of the graph must have the shape it has there (this tells ffn, text,
  frequency, head and patch sizes apart; heads, head_dim and layers are checked again by the
  rewrite). Names the plan's model lacks are a mismatch too (an I2V image embedder).
* **weights**: when the graph holds every self-attention q/k weight the adapter names
  (the plan's family's ``fingerprint_names``), their sampled fingerprint
  (:func:`~scaling_attn_compile.models.fingerprint.fingerprint_tensors`) must equal the plan's.

LoRA adapters (peft's ``lora_A``/``lora_B`` and ``base_layer``) are skipped: their base
weights are the model's. What to do on a mismatch is the backend's ``check_model`` option.

Not seen from a graph: config keys that change no shape (``eps``, ``qk_norm`` variants of one
size) on the same weights, and parameters the plan's model has but the graph lacks (a graph need
not use every parameter, so absence proves nothing). Another checkpoint still differs in its
weights fingerprint.
"""

from __future__ import annotations

import logging
import re

import torch

from ..errors import PlanModelMismatch
from ..models.fingerprint import fingerprint_tensors
from ..models.registry import adapter_for_class

log = logging.getLogger("scaling_attn_compile")

CHECK_MODES = ("weights", "config", False)  # the backend's check_model option
_TOKEN = re.compile(r"\['([^']+)'\]|\[\"([^\"]+)\"\]|\.(\w+)|\[(\d+)\]")
_SKIP_TOKENS = {"__dict__", "_modules", "_parameters", "_buffers", "base_layer"}


def _tokens(source: str) -> list[str]:
    return [next(g for g in m if g) for m in _TOKEN.findall(source)]


def graph_parameters(gm: torch.fx.GraphModule, example_inputs, top_level: set[str]
                     ) -> dict[str, torch.Tensor]:
    """``{"<block>.<i>.<attention>.to_q.weight": tensor, ...}``: the model parameters and buffers
    of a Dynamo graph, named as in ``model.named_parameters()``. ``top_level``: the model's child
    names (its blocks, its patch embedding, ...); a path's root (``L['self']``, or a pipeline
    attribute) is everything before the first of them."""
    out: dict[str, torch.Tensor] = {}

    def add(tokens: list[str], value) -> None:
        # scaling_attn_* buffers: the tables regional compilation attaches (regional.py).
        if not isinstance(value, torch.Tensor) or any(t.startswith(("lora_", "scaling_attn_"))
                                                      for t in tokens):
            return
        tokens = [t for t in tokens if t not in _SKIP_TOKENS]
        start = next((i for i, t in enumerate(tokens) if t in top_level), None)
        if start is not None:
            out[".".join(tokens[start:])] = value

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs, strict=False):
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = getattr(source, "name", "")  # a method on torch 2.11, a property on 2.13
        name = str(name() if callable(name) else name)
        if "_parameters" in name or "_buffers" in name:
            add(_tokens(name), value)
    fqn = gm.meta.get("dynamo_flat_name_to_original_fqn", {})  # attributes, not inputs
    for flat, value in [*gm.named_parameters(), *gm.named_buffers()]:
        if flat in fqn:
            add(fqn[flat].split("."), value)
    return out


def module_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's parameters and buffers by name, LoRA adapters left out (as in a graph)."""
    return {k.replace(".base_layer", ""): v for k, v in
            [*model.named_parameters(), *model.named_buffers()]
            if "lora_" not in k and not k.rsplit(".", 1)[-1].startswith("scaling_attn_")}


class ModelCheck:
    """The plan's model, rebuilt once on the meta device, against each graph's parameters."""

    def __init__(self, plan, mode):
        if mode not in CHECK_MODES:
            raise ValueError(f"scaling_attn_backend: check_model must be 'weights' (default), "
                             f"'config' (allow other weights of this architecture, e.g. a "
                             f"fine-tune or LoRA) or False, got {mode!r}")
        self.plan, self.mode = plan, mode
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._warned: set[str] = set()

    @property
    def adapter(self):
        """The plan's family: it names the layers and the weights to fingerprint."""
        name = getattr(getattr(self.plan, "meta", None), "model_class", "")
        return adapter_for_class(str(name), default=True)

    @staticmethod
    def applies(plan) -> bool:
        """Only plans that record their model (a :class:`Plan`) can be checked."""
        meta = getattr(plan, "meta", None)
        return isinstance(getattr(meta, "model_config", None), dict) and bool(
            getattr(meta, "config_fingerprint", None))

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def expected_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Parameter and buffer shapes of ``model_class(**model_config)``, or None if that
        class cannot be built here (then only the weights are checked)."""
        if self._shapes is None:
            meta = self.plan.meta
            try:
                import diffusers

                cls = getattr(diffusers, meta.model_class)
                with torch.device("meta"):
                    model = cls(**meta.model_config)
            except Exception as e:  # noqa: BLE001 - any failure means "cannot check shapes"
                self._warn_once("build", "scaling_attn_backend: cannot rebuild the plan's %s "
                                "to check parameter shapes (%s); only the weights fingerprint "
                                "is checked", meta.model_class, e)
                self._shapes = {}
                return None
            self._shapes = {k: tuple(v.shape) for k, v in
                            [*model.named_parameters(), *model.named_buffers()]}
        return self._shapes or None

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> None:
        """Raise :class:`PlanModelMismatch` (or log, per ``mode``) if the graph's model is not
        the plan's."""
        if self.mode is False:
            self._warn_once("off", "scaling_attn_backend: check_model=False: the plan is not "
                            "checked against the compiled model")
            return
        expected = self.expected_shapes()
        top = {k.split(".")[0] for k in expected} if expected else {self.adapter.LAYERS_ROOT}
        self.check_params(graph_parameters(gm, example_inputs, top))

    def check_params(self, params: dict[str, torch.Tensor]) -> None:
        """The check on ``{name: tensor}`` named as in ``model.named_parameters()``: a graph's
        (:func:`graph_parameters`), or a whole model's (:func:`module_parameters`, for
        regional compilation, where no one graph holds every layer)."""
        if self.mode is False:
            self._warn_once("off", "scaling_attn_backend: check_model=False: the plan is not "
                            "checked against the compiled model")
            return
        expected = self.expected_shapes()
        if not params:
            return  # not the plan's kind of model at all: the rewrite will say so
        meta = self.plan.meta
        if expected:
            diffs = []
            for name, t in params.items():
                want = expected.get(name)
                if want is None:
                    diffs.append((name, f"{name} is in the model, not in the plan's"))
                elif tuple(t.shape) != want:
                    diffs.append((name, f"{name} is {tuple(t.shape)} in the model, {want} in "
                                        f"the plan's"))
            if diffs:
                root = self.adapter.LAYERS_ROOT + "."
                layers = {".".join(k.split(".")[:2]) for k in expected if k.startswith(root)}
                keys = sorted({"num_layers" if n.startswith(root) and
                               ".".join(n.split(".")[:2]) not in layers else
                               next((k for p, k in self.adapter.PARAM_HINTS if p in n), "other")
                               for n, _ in diffs})
                shown = "; ".join(d for _, d in diffs[:2])
                more = f"; +{len(diffs) - 2} more" if len(diffs) > 2 else ""
                raise PlanModelMismatch(
                    f"scaling_attn_backend: the plan was calibrated for another model config "
                    f"(differs in {', '.join(keys)}: {shown}{more}); extract a plan for this "
                    f"model with `scaling-attn west`, or pass check_model=False to use it anyway")
        want_fp = meta.weights_fingerprint
        names = self.adapter.fingerprint_names(meta.num_layers, meta.model_config)
        if want_fp is None or not all(n in params for n in names):
            return  # a graph without every layer (graph breaks): the shapes had to do
        got_fp = fingerprint_tensors([params[n] for n in names])
        if got_fp is None or got_fp == want_fp:
            return
        if self.mode == "weights":
            raise PlanModelMismatch(
                f"scaling_attn_backend: same architecture but other weights than the plan's "
                f"(attention fingerprint {got_fp}, plan {want_fp}); WEST topology is "
                f"weight-encoded: extract a plan for this checkpoint with `scaling-attn west`, "
                f"or pass check_model='config' to reuse it deliberately (a fine-tune or LoRA "
                f"of the calibrated model)")
        self._warn_once("weights", "scaling_attn_backend: the model's weights differ from the "
                        "plan's (attention fingerprint %s, plan %s); using the plan anyway "
                        "(check_model='config')", got_fp, want_fp)
