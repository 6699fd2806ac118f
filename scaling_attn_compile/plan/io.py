"""Reading a plan file: :func:`load_plan` checks the format, version, schema and checksums and
returns a :class:`~.plan.Plan`. (Writing is :meth:`Plan.save`; the format is in :mod:`.plan`.)"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..errors import PlanFileError, PlanVersionError
from ..models.fingerprint import config_fingerprint
from . import schema
from .plan import FORMAT, FORMAT_VERSION, META_KEY, FastSchedule, Plan, PlanMeta, _sha256


def load_plan(path, *, device="cpu") -> Plan:
    """Read and validate a plan file written by :meth:`Plan.save`.

    Raises FileNotFoundError, :class:`PlanFileError` (not a plan, truncated, corrupted bytes),
    :class:`PlanVersionError` (other format version), :class:`PlanError` (inconsistent content).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_plan: no plan file at {path}; create one with "
                                f"`scaling-attn west --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for header/size problems
        raise PlanFileError(f"load_plan: {path} is not a readable safetensors file ({e}); it may "
                            f"be truncated or corrupted: re-copy it or re-run `scaling-attn west`") from e
    if META_KEY not in header:
        raise PlanFileError(f"load_plan: {path} has no '{META_KEY}' metadata, so it is not a "
                            f"scaling-attn plan file; create one with `scaling-attn west`")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise PlanFileError(f"load_plan: {path} has corrupted plan metadata ({e}); re-run "
                            f"`scaling-attn west`") from e
    if isinstance(meta, dict) and meta.get("format") != FORMAT:
        raise PlanFileError(f"load_plan: {path} metadata format is {meta.get('format')!r}, "
                            f"expected {FORMAT!r}")
    if isinstance(meta, dict) and meta.get("format_version") != FORMAT_VERSION:
        raise PlanVersionError(f"load_plan: {path} is plan format version "
                               f"{meta.get('format_version')!r}; this scaling_attn_compile reads "
                               f"version {FORMAT_VERSION}. Use a matching package version or "
                               f"re-extract the plan with `scaling-attn west`")
    try:
        schema.check_meta(meta)
    except schema.SchemaError as e:
        raise PlanFileError(f"load_plan: {path} metadata: {e}; the file was edited or written "
                            f"by other code: re-run `scaling-attn west`") from None
    stored = meta.pop(schema.CHECKSUM_KEY, None)
    if stored is None:
        # Files written before the metadata checksum existed (same format version): readable,
        # but nothing vouches for their JSON.
        warnings.warn(f"load_plan: {path} has no metadata checksum (written by an older "
                      f"scaling_attn_compile); its JSON cannot be verified. Re-save it with "
                      f"load_plan(path).save(path)", stacklevel=2)
    elif stored != schema.meta_checksum(meta):
        raise PlanFileError(f"load_plan: {path} metadata fails its sha256 check: the JSON was "
                            f"edited or corrupted; re-copy the file or re-run `scaling-attn west`")
    if config_fingerprint(meta["model_config"]) != meta["config_fingerprint"]:
        raise PlanFileError(f"load_plan: {path} metadata: model_config does not match its "
                            f"config_fingerprint {meta['config_fingerprint']}; the JSON was "
                            f"edited: re-run `scaling-attn west`")
    sums = meta.pop("sha256")
    if set(sums) != set(tensors):
        raise PlanFileError(f"load_plan: {path} tensors {sorted(tensors)} do not match its "
                            f"checksummed list {sorted(sums)}; the file is corrupted")
    for k, t in tensors.items():
        if _sha256(t) != sums[k]:
            raise PlanFileError(f"load_plan: {path} tensor '{k}' fails its sha256 check: the "
                                f"file's bytes are corrupted; re-copy it or re-run `scaling-attn west`")
    sched_meta = meta.pop("schedule", None)
    pm = PlanMeta(**meta)  # the schema admits only PlanMeta's fields here
    if pm.energy_filter is not None:
        from ..ops.energy import EnergyFilter

        try:
            EnergyFilter.from_dict(pm.energy_filter)
        except (TypeError, ValueError, AttributeError) as e:
            raise PlanFileError(f"load_plan: {path} metadata field 'energy_filter' is not a valid "
                                f"EnergyFilter ({e}); re-attach it with plan.with_energy_filter"
                                ) from None
    schedule = None
    if sched_meta is not None:
        need = ("fast.levels", "fast.level_tables", "fast.bucket_bounds")
        if not all(k in tensors for k in need):
            raise PlanFileError(f"load_plan: {path} declares a FAST schedule but lacks tensors "
                                f"{[k for k in need if k not in tensors]}")
        schedule = FastSchedule(tensors["fast.levels"].tolist(), tensors["fast.level_tables"],
                                tensors["fast.bucket_bounds"], sched_meta.get("info", {}))
    if "west.codes" not in tensors:
        raise PlanFileError(f"load_plan: {path} lacks the 'west.codes' tensor")
    plan = Plan(tensors["west.codes"].to(device), pm, schedule)  # __post_init__ checks shapes
    return plan
