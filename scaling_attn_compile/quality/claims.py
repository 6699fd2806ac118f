"""Part 2 of the quality study: do the paper's claims hold on this model?

* topology stability: WEST codes from ``n_sets`` disjoint sets of training captions; IoU of the
  masks (all layers and heads pooled, and the mean per-head IoU) at 0.15/0.25/0.5, pairwise;
  ``p / (2 - p)`` is the IoU two independent random masks of density ``p`` would have;
* resolution transfer: WEST extracted at small grids (8x16x16, 8x16x32 pixels for tiny-wan) from
  set 0's captions, remapped to the main grid and compared with set 0's native extraction there
  (``west.remap_recall``: recall and IoU at 0.25/0.5);
* schedule stability: FAST profiled on ``n_profiles`` different single training captions (same
  WEST plan), fitted at 0.25 and 0.35; pairwise agreement of the chosen level per (layer,
  bucket, head), mean |level index difference|, and the mean per-cell IoU of the chosen masks.
"""

from __future__ import annotations

import time
import warnings
from itertools import combinations

import torch

from ..contract.token_order import NEW_PLAN_ORDER
from ..offline import fast, west
from ..offline.calibrate import calibrate_west, evenly_spaced
from ..tiny.registry import BundledModel


def disjoint_caption_sets(pool: list[str], n_sets: int, per_set: int,
                          seed: int = 7) -> list[list[str]]:
    """``n_sets`` disjoint sets of training captions (seeded shuffle of ``pool``)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(pool), generator=g).tolist()
    need = n_sets * per_set
    if need > len(pool):
        raise ValueError(f"need {need} training captions, have {len(pool)}")
    caps = [pool[i] for i in idx[:need]]
    return [caps[s * per_set:(s + 1) * per_set] for s in range(n_sets)]


def _west(model, spec: BundledModel, captions, grid, steps, capture_steps, seed0, token_order):
    ts = spec.timesteps(steps)
    latent = (model.config.in_channels, *grid)
    with torch.no_grad():
        return calibrate_west(model, [spec.calibration_input(c, seed0 + i)
                                      for i, c in enumerate(captions)], ts, latent_shape=latent,
                              capture_steps=evenly_spaced(steps, capture_steps),
                              guidance_scale=1.0, progress=False, source="bench_quality claims",
                              token_order=token_order)


def _iou_stats(a: torch.Tensor, b: torch.Tensor, p: float) -> dict:
    ma, mb = west.mask_at(a, p), west.mask_at(b, p)
    per_head = [west.mask_iou(ma[i, j], mb[i, j]) for i in range(ma.shape[0])
                for j in range(ma.shape[1])]
    return {"iou_pooled": west.mask_iou(ma, mb), "iou_mean_per_head": sum(per_head) / len(per_head),
            "iou_min_per_head": min(per_head), "density_a": ma.float().mean().item(),
            "density_b": mb.float().mean().item(), "chance_iou": p / (2 - p)}


def run_claims(model, spec: BundledModel, *, grid=None, steps: int = 16, n_sets: int = 3,
               per_set: int = 2, capture_steps: int = 4, small_grids=None,
               n_profiles: int = 3, fast_capture_steps: int = 6,
               fast_targets=(0.25, 0.35), densities=(0.15, 0.25, 0.5),
               token_order: str | None = NEW_PLAN_ORDER, log=print) -> dict:
    """Part 2 of the study: topology stability (WEST on disjoint caption sets), resolution
    transfer (a plan extracted at smaller grids, remapped) and FAST schedule stability.
    ``token_order``: every plan's block order, as :func:`.study.run_quality` takes it (default
    ``"auto"``: tile on a Wan model); the record's ``config.token_order`` is the one that ran."""
    t_start = time.perf_counter()
    grid = tuple(grid or spec.native_grid)
    tgrid = spec.token_grid(grid)
    flat = disjoint_caption_sets(spec.training_pool(), 1, n_sets * per_set + n_profiles)[0]
    sets = [flat[i * per_set:(i + 1) * per_set] for i in range(n_sets)]
    profile_caps = flat[n_sets * per_set:]  # FAST profiles: captions of no WEST set
    plans = [_west(model, spec, s, grid, steps, capture_steps, 3000 + 10 * i, token_order)
             for i, s in enumerate(sets)]
    order = plans[0].meta.token_order  # "auto" resolved: the order every plan here is in
    topo = []
    for i, j in combinations(range(len(plans)), 2):
        for p in densities:
            topo.append({"set_a": i, "set_b": j, "density": p,
                         **_iou_stats(plans[i].codes, plans[j].codes, p)})
    log(f"[claims] topology: {len(sets)} disjoint sets of {per_set}")

    transfer = []
    if small_grids is None:  # half the rows and columns, then half the rows
        F, H, W = grid
        small_grids = ((F, H // 2, W // 2), (F, H // 2, W))
    for sg in small_grids:
        small = _west(model, spec, sets[0], sg, steps, capture_steps, 3000, token_order)
        rr = west.remap_recall(small.codes, spec.token_grid(sg), plans[0].codes, tgrid,
                               densities=(0.25, 0.5), order=order)
        for p, v in rr.items():
            transfer.append({"small_grid": list(sg), "small_token_grid": list(spec.token_grid(sg)),
                             "native_grid": list(grid), "density": p, **v})
    log("[claims] resolution transfer done")

    ts_all = spec.timesteps(steps)
    latent = (model.config.in_channels, *grid)
    codes = plans[0].thresholds(tgrid)
    profiles = []
    with torch.no_grad():
        for i, c in enumerate(profile_caps):
            profiles.append(fast.profile_fidelity(
                plans[0], model, spec.calibration_input(c, 4000 + i),
                timesteps=ts_all, latent_shape=latent, guidance_scale=1.0, progress=False,
                capture_steps=evenly_spaced(steps, fast_capture_steps)))
    sched_rows = []
    for target in fast_targets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheds = [fast.fit_schedule(pr, target) for pr in profiles]
        for i, j in combinations(range(len(scheds)), 2):
            a, b = scheds[i], scheds[j]
            la, lb = a.level_tables.long(), b.level_tables.long()  # (L, NT, H), same levels
            ious = []
            for layer in range(la.shape[0]):
                for bk in range(la.shape[1]):
                    for h in range(la.shape[2]):
                        ma = west.mask_at(codes[layer, h], a.levels[int(la[layer, bk, h])])
                        mb = west.mask_at(codes[layer, h], b.levels[int(lb[layer, bk, h])])
                        ious.append(west.mask_iou(ma, mb))
            sched_rows.append({
                "target_density": target, "profile_a": profile_caps[i],
                "profile_b": profile_caps[j],
                "fit_density_a": a.info["achieved_density"],
                "fit_density_b": b.info["achieved_density"],
                "level_agreement": float((la == lb).double().mean()),
                "within_one_level": float(((la - lb).abs() <= 1).double().mean()),
                "mean_abs_level_diff": float((la - lb).abs().double().mean()),
                "mask_iou_mean": sum(ious) / len(ious)})
    log("[claims] schedule stability done")
    return {"benchmark": "claims", "config": {
                "grid": list(grid), "token_grid": list(tgrid), "steps": steps,
                "calibration_sets": sets, "capture_steps": capture_steps,
                "small_grids": [list(g) for g in small_grids], "profile_captions": profile_caps,
                "fast_capture_steps": fast_capture_steps, "fast_targets": list(fast_targets),
                "levels": list(fast.DEFAULT_LEVELS),
                "token_order": order, "token_order_requested": str(token_order)},
            "topology_stability": topo, "resolution_transfer": transfer,
            "schedule_stability": sched_rows,
            "timings_s": {"total": time.perf_counter() - t_start}}


def claims_tables(res: dict) -> str:
    out = ["| sets | density | IoU pooled | mean per-head IoU | min per-head IoU | chance IoU |",
           "|---|---|---|---|---|---|"]
    for r in res["topology_stability"]:
        out.append(f"| {r['set_a']} vs {r['set_b']} | {r['density']} | {r['iou_pooled']:.3f} | "
                   f"{r['iou_mean_per_head']:.3f} | {r['iou_min_per_head']:.3f} | "
                   f"{r['chance_iou']:.3f} |")
    out += ["", "| extracted at | remapped to | density | recall | IoU |", "|---|---|---|---|---|"]
    for r in res["resolution_transfer"]:
        out.append(f"| {'x'.join(map(str, r['small_grid']))} | "
                   f"{'x'.join(map(str, r['native_grid']))} | {r['density']} | "
                   f"{r['recall']:.3f} | {r['iou']:.3f} |")
    out += ["", "| target | profiles | fit densities | same level | within 1 level | mask IoU |",
            "|---|---|---|---|---|---|"]
    for r in res["schedule_stability"]:
        out.append(f"| {r['target_density']} | {r['profile_a']} / {r['profile_b']} | "
                   f"{r['fit_density_a']:.3f} / {r['fit_density_b']:.3f} | "
                   f"{r['level_agreement']:.3f} | {r['within_one_level']:.3f} | "
                   f"{r['mask_iou_mean']:.3f} |")
    return "\n".join(out)


# ---- CLI -------------------------------------------------------------------------------------------
