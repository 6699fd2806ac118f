"""Evidence of attention structure: per-head entropy and locality of a Wan model's self-attention.

For each self-attention layer and head, at one diffusion timestep, averaged over queries and
videos (S tokens on the token grid ``(F, H, W)``, f-major order as Wan flattens them):

- ``entropy``: ``-sum_j p_j log p_j`` in nats; ``entropy_norm`` = entropy / log S (1 = uniform).
- ``frame<k>``: softmax mass on keys within ``k`` latent frames of the query (``frame0`` = same frame).
- ``radius<r>``: mass on keys within spatial distance ``r`` tokens (any frame: a space-time tube).
- ``blocks<R>``: fraction of 128-token KV blocks a 128-row query block needs to hold ``R`` of its
  pooled softmax mass (the density block-sparse attention needs for that recall; lower = sparser).
- ``top<P>``: share of a query block's pooled mass that its top ``P``% of KV blocks hold (WEST's
  measure of concentration on the block-pooled map; ``top25`` = mass in the best quarter).

Each metric also has its value under uniform attention (``uniform_stats``) for chance level.

q and k are captured exactly as diffusers' ``WanAttnProcessor`` makes them (``to_q``/``to_k``,
``norm_q``/``norm_k``, heads unflattened, 3D RoPE applied) by a forward pre-hook, and attention
probabilities are formed over query chunks so no ``S x S`` tensor per head is ever whole.

    python -m scaling_attn_compile.tiny.attention_stats --model assets-dir-or-"random" --grid 8x32x32 --t 0.5
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager

import torch

from ..models.wan import compute_weight

# ----------------------------------------------------------------------------- capture


@contextmanager
def collect_qk(model, layers: list[int] | None = None):
    """Context manager: while active, each forward of ``model`` stores ``{layer: (q, k)}`` (float32,
    ``(B, H, S, D)``, detached) of the self-attention layer ``layer`` into the yielded dict (last call wins).

    A thin wrapper over :func:`scaling_attn_compile.models.wan_capture.capture_qk`, the one place that
    recomputes q/k exactly as diffusers' ``WanAttnProcessor`` does.
    """
    from ..models.wan_capture import capture_qk as capture

    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(cap) -> None:
        store[cap.layer] = (cap.q.float(), cap.k.float())

    with capture(model, keep, layers=layers):
        yield store


# ----------------------------------------------------------------------------- statistics


def _coords(tgrid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    F, H, W = tgrid
    f, y, x = torch.meshgrid(torch.arange(F, device=device), torch.arange(H, device=device),
                             torch.arange(W, device=device), indexing="ij")
    return f.flatten(), y.flatten(), x.flatten()


def _metrics(p: torch.Tensor, qi: torch.Tensor, coords, frames, radii) -> dict[str, torch.Tensor]:
    """Row sums of p ``(B, H, c, S)`` (queries ``qi`` ``(c,)``) -> per-metric ``(B, H, c)``."""
    f, y, x = coords
    df = (f[qi, None] - f[None, :]).abs()
    d2 = (y[qi, None] - y[None, :]).square() + (x[qi, None] - x[None, :]).square()
    out = {f"frame{k}": (p * (df <= k)).sum(-1) for k in frames}
    out.update({f"radius{r}": (p * (d2 <= r * r)).sum(-1) for r in radii})
    return out


def head_stats(q: torch.Tensor, k: torch.Tensor, tgrid: tuple[int, int, int], *,
               frames=(0, 1, 2), radii=(1, 2, 4), recalls=(0.9, 0.99), block: int = 128,
               tops=(25,), max_elems: int = 1 << 24) -> dict[str, torch.Tensor]:
    """Per-head attention statistics, each ``(H,)`` float64 (means over batch and queries).

    q, k: ``(B, H, S, D)`` with ``S = F*H*W`` of the token grid ``tgrid``. Softmax scale
    ``1/sqrt(D)`` (SDPA's default, what Wan uses). Works on q's device; peak extra memory is about
    ``4 * max_elems`` floats.
    """
    B, Hh, S, D = q.shape
    if S != math.prod(tgrid):
        raise ValueError(f"tgrid: {tgrid} has {math.prod(tgrid)} tokens, q has S={S}")
    coords = _coords(tgrid, q.device)
    nb = -(-S // block)
    # Query chunks are whole 128-row blocks so block masses pool inside one chunk.
    chunk = max(block, (max_elems // max(B * Hh * S, 1)) // block * block)
    sums: dict[str, torch.Tensor] = {}
    block_mass = torch.zeros(B, Hh, nb, nb, dtype=torch.float64, device=q.device)
    kt = k.transpose(-1, -2)
    for i0 in range(0, S, chunk):
        i1 = min(S, i0 + chunk)
        logits = (q[:, :, i0:i1] @ kt) * (D ** -0.5)
        p = logits.softmax(-1)  # (B, H, c, S)
        m = _metrics(p, torch.arange(i0, i1, device=q.device), coords, frames, radii)
        m["entropy"] = torch.special.entr(p).sum(-1)
        for name, v in m.items():
            sums[name] = sums.get(name, 0) + v.double().sum((0, 2))
        # Pool to (query block, KV block): pad keys to nb*block, rows to whole blocks.
        pk = torch.nn.functional.pad(p, (0, nb * block - S)).unflatten(-1, (nb, block)).sum(-1)
        rows = i1 - i0
        pk = torch.nn.functional.pad(pk, (0, 0, 0, (-rows) % block)).unflatten(2, (-1, block)).sum(3)
        block_mass[:, :, i0 // block: i0 // block + pk.shape[2]] += pk.double()
        del logits, p, pk
    out = {name: v / (B * S) for name, v in sums.items()}
    out["entropy_norm"] = out["entropy"] / math.log(S)
    srt = block_mass.sort(-1, descending=True).values.cumsum(-1)
    total = srt[..., -1:]
    for r in recalls:
        need = (srt < r * total).sum(-1) + 1  # blocks to reach recall r, (B, H, nb)
        out[f"blocks{r:g}"] = (need.double() / nb).mean((0, 2))
    for pct in tops:
        k = max(1, math.ceil(pct / 100 * nb))
        out[f"top{pct:g}"] = (srt[..., k - 1] / total[..., 0]).mean((0, 2))
    return out


def uniform_stats(tgrid: tuple[int, int, int], *, frames=(0, 1, 2), radii=(1, 2, 4),
                  recalls=(0.9, 0.99), block: int = 128, tops=(25,)) -> dict[str, float]:
    """The same metrics for uniform attention (chance level), as floats."""
    S = math.prod(tgrid)
    coords = _coords(tgrid, "cpu")
    acc: dict[str, float] = {}
    for i0 in range(0, S, 256):
        qi = torch.arange(i0, min(S, i0 + 256))
        p = torch.full((1, 1, len(qi), S), 1.0 / S, dtype=torch.float64)
        for name, v in _metrics(p, qi, coords, frames, radii).items():
            acc[name] = acc.get(name, 0.0) + v.sum().item() / S
    nb = -(-S // block)
    out = {**acc, "entropy": math.log(S), "entropy_norm": 1.0}
    # Uniform mass per KV block is proportional to its size: the full blocks come first.
    sizes = sorted([min(block, S - j * block) for j in range(nb)], reverse=True)
    for r in recalls:
        c, n = 0.0, 0
        while c < r * S - 1e-9:
            c += sizes[n]
            n += 1
        out[f"blocks{r:g}"] = n / nb
    for pct in tops:
        out[f"top{pct:g}"] = sum(sizes[: max(1, math.ceil(pct / 100 * nb))]) / S
    return out


@torch.no_grad()
def model_attention_stats(model, grid: tuple[int, int, int] = (8, 32, 32), t: float = 0.5, *,
                          n: int = 2, seed: int = 0, captions: list[str] | None = None,
                          encoder_path=None, **kw) -> dict[int, dict[str, torch.Tensor]]:
    """``{layer: {metric: (H,)}}`` of ``model`` (a tiny Wan) at noise level ``t`` in [0, 1].

    The input is what the model sees while denoising at ``t``: ``x_t = (1 - t) x0 + t noise`` with
    ``x0`` ``n`` toy videos of pixel ``grid`` (held-out captions unless given), their captions as
    text, ``timestep = 1000 t``. ``kw`` goes to ``head_stats``.
    """
    from .tiny_wan import encode_captions, initial_noise, token_grid
    from .toy_video import sample_batch

    p = compute_weight(model)
    x0, caps = sample_batch(seed, n, grid, p.device, captions=captions, held_out=captions is None)
    noise = initial_noise(n, grid, seed + 10_000).to(p.device)
    xt = ((1 - t) * x0 + t * noise).to(p.dtype)
    emb = encode_captions(caps, device=p.device, dtype=p.dtype, path=encoder_path)
    ts = torch.full((n,), 1000.0 * t, device=p.device)
    with collect_qk(model) as qk:
        model(hidden_states=xt, timestep=ts, encoder_hidden_states=emb, return_dict=False)
    tg = token_grid(grid)
    return {i: head_stats(q, k, tg, **kw) for i, (q, k) in sorted(qk.items())}


def summarize(stats: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean over layers and heads of each metric."""
    names = next(iter(stats.values())).keys()
    return {m: torch.stack([s[m] for s in stats.values()]).mean().item() for m in names}


def markdown_table(columns: dict[str, dict[str, float]],
                   metrics=("entropy_norm", "frame0", "frame1", "radius1", "radius2", "radius4",
                            "blocks0.9", "blocks0.99")) -> str:
    """A metric-by-column markdown table, e.g. columns ``{"trained": ..., "random init": ...,
    "uniform": ...}`` of ``summarize``/``uniform_stats`` dicts."""
    head = "| metric | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    rows = [f"| {m} | " + " | ".join(f"{c.get(m, float('nan')):.3f}" for c in columns.values()) + " |"
            for m in metrics]
    return head + "\n".join(rows) + "\n"


def per_head_table(stats: dict[int, dict[str, torch.Tensor]],
                   metrics=("entropy_norm", "frame0", "radius2", "blocks0.9")) -> str:
    """Markdown: one row per (layer, head)."""
    lines = ["| layer | head | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for i, s in stats.items():
        for h in range(len(s[metrics[0]])):
            lines.append(f"| {i} | {h} | " + " | ".join(f"{s[m][h].item():.3f}" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="tiny-Wan directory (default: shipped), or 'random'")
    ap.add_argument("--grid", default="8x32x32", help="pixel grid FxHxW")
    ap.add_argument("--t", type=float, nargs="+", default=[0.9, 0.5, 0.1])
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--per-head", action="store_true")
    a = ap.parse_args(argv)
    from .tiny_wan import load_tiny_wan, make_tiny_wan

    grid = tuple(int(v) for v in a.grid.lower().split("x"))
    model = (make_tiny_wan().to(a.device).eval() if a.model == "random"
             else load_tiny_wan(a.device, path=a.model))
    cols = {"uniform": uniform_stats(grid[:1] + (grid[1] // 2, grid[2] // 2))}
    for t in a.t:
        st = model_attention_stats(model, grid, t, n=a.n)
        cols[f"t={t:g}"] = summarize(st)
        if a.per_head:
            print(f"t={t:g}\n" + per_head_table(st))
    print(markdown_table(cols))


if __name__ == "__main__":
    main()
