"""The HTML page of what a run retrieved: queries, top 10 before and after reranking, matches.

One self-contained file (images embedded as base64 JPEG, inline CSS and SVG, no script, no
network), readable offline and in an MLflow artifact view:

- for a sample of queries (evenly spread over the evaluated queries), the query image and
  its top 10 gallery images before reranking (the single-vector stage 1) and after (two-stage
  late interaction, or exhaustive late interaction), each with its score, correct ones
  framed green and marked ✓, wrong ones red;
- for one chosen query (the first sampled query whose top 1 after reranking is correct, else
  the first), the token-to-token matches of late interaction drawn on the query and its top-1
  image, like the study's Fig 5: each query token is joined to the gallery token with which
  it has its maximum similarity, coloured by that similarity.

Token positions. Instance tokens are aggregates, not patches, so each token is placed at the
grid cell of the patch token most similar to it (cosine). For raw selection that is exactly
the selected patch; for instance tokens it is in practice the seed (z_k = l2norm(seed + mean
of its cluster) stays closest to its seed) and always a patch that the token represents. The
matches are drawn from the un-quantized tokens.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from craterlab.report.marks import UNTRAINED_NOTE, weights_mark
from craterlab.results import is_untrained

THUMB_PX = 112
MATCH_PX = 256


@dataclass
class Hit:
    """One retrieved gallery image as shown on the page."""

    gallery: int
    score: float | None
    correct: bool


def config_title(view: Mapping[str, str], dataset: str = "") -> str:
    """The page title: the run's configuration in a line ("synthetic-tiny · vit_small... ·
    pooling cls · instance (fps, hard) K=32 · fp32 · S=100")."""
    parts = [dataset or view.get("dataset", "-"), view.get("backbone", "-")]
    parts.append(f"pooling {view.get('pooling', '-')}")
    tokens = view.get("tokens", "-")
    if view.get("aggregator") == "none" and view.get("selector") == "none":
        parts.append("no tokens")
    else:
        assign = view.get("assign", "-")
        if assign not in ("-", "hard") and tokens.endswith(")"):
            tokens = f"{tokens[:-1]}, {assign})"
        parts.append(f"{tokens} K={view.get('k', '-')}")
        parts.append(str(view.get("quantizer", "-")))
        parts.append(f"S={view.get('shortlist', '-')}")
    if view.get("train", "-") not in ("-", "none"):
        parts.append(f"fine-tuned {view['train']} {view.get('augment', '-')}")
    return " · ".join(p for p in parts if p and p != "-")


def sample_queries(evaluable: Sequence[int], n: int) -> list[int]:
    """``n`` query indices spread evenly over ``evaluable`` (deterministic, in order)."""
    if n <= 0 or not evaluable:
        return []
    picks = np.linspace(0, len(evaluable) - 1, num=min(n, len(evaluable))).round().astype(int)
    return [int(evaluable[i]) for i in dict.fromkeys(picks.tolist())]


def token_positions(tokens: torch.Tensor, patches: torch.Tensor, grid: tuple[int, int]):
    """(K, 2) (x, y) in [0, 1] of each token: the centre of its most similar patch's cell."""
    t = torch.nn.functional.normalize(tokens.float(), dim=-1)
    p = torch.nn.functional.normalize(patches.float(), dim=-1)
    best = (t @ p.T).argmax(dim=1)
    rows, cols = grid
    x = (best % cols).float().add(0.5).div(cols)
    y = torch.div(best, cols, rounding_mode="floor").float().add(0.5).div(rows)
    return torch.stack([x, y], dim=1)


def token_matches(query: torch.Tensor, gallery: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query token, the index of its max-similarity gallery token and that similarity."""
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    g = torch.nn.functional.normalize(gallery.float(), dim=-1)
    sims = q @ g.T
    best = sims.max(dim=1)
    return best.indices, best.values


def _real(tokens: Any, i: int) -> torch.Tensor:
    vectors = tokens.vectors[i]
    mask = getattr(tokens, "mask", None)
    return vectors if mask is None else vectors[mask[i].bool()]


def data_uri(image: Any, size: int) -> str:
    image = image.convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _color(similarity: float, low: float, high: float) -> str:
    """A hue from red (``low``) to green (``high``)."""
    share = 1.0 if high - low < 1e-9 else (similarity - low) / (high - low)
    return f"hsl({int(120 * min(max(share, 0.0), 1.0))},90%,45%)"


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.6em}
.banner{background:#fde2e1;border:1px solid #c33;padding:.5em .8em;margin:.8em 0}
.query{background:#fff;border:1px solid #ddd;padding:.6em;margin:1em 0}
.qhead{display:flex;gap:1em;align-items:center}
.row{display:flex;gap:6px;align-items:flex-start;margin:.4em 0}
.row .label{width:9em;font-size:.85em;color:#555}
figure{margin:0;text-align:center;font-size:.75em}
figure img{display:block;border:3px solid #bbb}
figure.correct img{border-color:#1a9c3a} figure.wrong img{border-color:#d33}
figure.correct figcaption::before{content:"\\2713 ";color:#1a9c3a;font-weight:bold}
figure.wrong figcaption::before{content:"\\2717 ";color:#d33}
figure.missed img{border-color:#e8a33d;border-style:dashed}
.row.relevant{border-top:1px dashed #ccc;padding-top:.3em}
.matches svg{background:#fff;border:1px solid #ddd}
.legend{font-size:.85em;color:#555;max-width:60em}
"""


def figure_html(uri: str, caption: str, cls: str, title: str) -> str:
    return (
        f'<figure class="{cls}"><img class="thumb" src="{uri}" alt="{html.escape(title)}" '
        f'title="{html.escape(title)}" width="{THUMB_PX}" height="{THUMB_PX}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _hits(
    ranking: Any, q: int, top: int, gallery_ids: Sequence[int], relevant: frozenset[int]
) -> list[Hit]:
    indices = ranking.indices[q, :top].tolist()
    scores = getattr(ranking, "scores", None)
    out = []
    for rank, g in enumerate(indices):
        if g < 0:
            continue
        score = None if scores is None else float(scores[q, rank])
        out.append(Hit(int(g), score, int(gallery_ids[g]) in relevant))
    return out


def _shortlist_hits(ranking: Any, q, top, gallery_ids, relevant) -> list[Hit]:
    return [
        Hit(int(g), None, int(gallery_ids[g]) in relevant)
        for g in ranking.shortlist[q, :top].tolist()
        if g >= 0
    ]


def match_svg(
    query_uri: str,
    gallery_uri: str,
    q_pos: torch.Tensor,
    g_pos: torch.Tensor,
    best: torch.Tensor,
    sims: torch.Tensor,
) -> str:
    """Two images side by side with a line from every query token to its matched token."""
    size, gap = MATCH_PX, 40
    width = 2 * size + gap
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{size}" '
        f'viewBox="0 0 {width} {size}" role="img" aria-label="late-interaction token matches">',
        f'<image href="{query_uri}" x="0" y="0" width="{size}" height="{size}"/>',
        f'<image href="{gallery_uri}" x="{size + gap}" y="0" width="{size}" height="{size}"/>',
    ]
    low, high = float(sims.min()), float(sims.max())
    for i in range(len(best)):
        x1, y1 = (q_pos[i] * size).tolist()
        gx, gy = (g_pos[int(best[i])] * size).tolist()
        x2 = gx + size + gap
        color = _color(float(sims[i]), low, high)
        title = f"query token {i} -> gallery token {int(best[i])}: similarity {float(sims[i]):.3f}"
        parts.append(
            f'<g class="match"><title>{title}</title>'
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{gy:.1f}" stroke="{color}" '
            f'stroke-width="1.5" stroke-opacity="0.85"/>'
            f'<circle cx="{x1:.1f}" cy="{y1:.1f}" r="3.5" fill="{color}"/>'
            f'<circle cx="{x2:.1f}" cy="{gy:.1f}" r="3.5" fill="{color}"/></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def build_run_page(
    dataset: Any,
    rankings: Mapping[str, Any],
    *,
    before: str | None,
    after: str | None,
    query_tokens: Any,
    gallery_tokens: Any,
    query_features: Any,
    gallery_features: Any,
    n_queries: int = 6,
    top: int = 10,
    title: str = "craterlab run",
    weights: str = "unknown",
) -> str:
    """The page as an HTML string (see the module docstring for what it shows)."""
    gallery = list(dataset.records("gallery"))
    queries = list(dataset.records("query"))
    gallery_ids = [r.crater_id for r in gallery]
    present = set(gallery_ids)
    after = after or next(iter(rankings))
    after_ranking = rankings[after]
    before_ranking = rankings.get(before) if before else None
    evaluable = [i for i, r in enumerate(queries) if set(r.relevant_ids) & present]
    chosen = sample_queries(evaluable, n_queries)
    thumbs: dict[tuple[str, int], str] = {}

    def thumb(split: str, i: int) -> str:
        if (split, i) not in thumbs:
            record = (gallery if split == "gallery" else queries)[i]
            thumbs[(split, i)] = data_uri(dataset.load_image(record), THUMB_PX)
        return thumbs[(split, i)]

    def hit_row(label: str, hits: list[Hit]) -> str:
        figs = []
        for rank, h in enumerate(hits, start=1):
            score = "score -" if h.score is None else f"{h.score:.3f}"
            rec = gallery[h.gallery]
            figs.append(
                figure_html(
                    thumb("gallery", h.gallery),
                    f"#{rank} {score}",
                    "correct" if h.correct else "wrong",
                    f"{rec.image_id} (crater id {rec.crater_id})",
                )
            )
        return (
            f'<div class="row"><div class="label">{html.escape(label)}</div>{"".join(figs)}</div>'
        )

    def relevant_row(q: int, relevant: frozenset[int]) -> str:
        """Every gallery image of the query's relevance set, with its rank after reranking."""
        order = after_ranking.indices[q].tolist()
        rank_of = {int(g): r for r, g in enumerate(order, start=1) if g >= 0}
        figs = []
        for g, crater in enumerate(gallery_ids):
            if int(crater) not in relevant:
                continue
            rank = rank_of.get(g)
            found = rank is not None and rank <= top
            where = f"rank {rank}" if rank is not None else f"beyond rank {len(order)}"
            figs.append(
                figure_html(
                    thumb("gallery", g),
                    where,
                    "correct" if found else "missed",
                    f"{gallery[g].image_id} (crater id {crater})",
                )
            )
        label = f"relevant gallery images (rank after, {after})"
        return (
            f'<div class="row relevant"><div class="label">{html.escape(label)}</div>'
            f"{''.join(figs)}</div>"
        )

    blocks = []
    for q in chosen:
        rec = queries[q]
        relevant = frozenset(int(i) for i in rec.relevant_ids)
        rows = []
        if before_ranking is not None:
            rows.append(
                hit_row(
                    f"before reranking ({before})",
                    _hits(before_ranking, q, top, gallery_ids, relevant),
                )
            )
        elif getattr(after_ranking, "shortlist", None) is not None:
            rows.append(
                hit_row(
                    "before reranking (stage-1 order)",
                    _shortlist_hits(after_ranking, q, top, gallery_ids, relevant),
                )
            )
        rows.append(
            hit_row(
                f"after reranking ({after})", _hits(after_ranking, q, top, gallery_ids, relevant)
            )
        )
        rows.append(relevant_row(q, relevant))
        q_fig = figure_html(thumb("query", q), "query", "query", rec.image_id)
        ids = ", ".join(str(i) for i in sorted(relevant))
        n_rel = sum(1 for i in gallery_ids if int(i) in relevant)
        blocks.append(
            f'<section class="query" data-query="{html.escape(rec.image_id)}">'
            f'<div class="qhead">{q_fig}<div><b>{html.escape(rec.image_id)}</b><br>'
            f"relevant crater id{'s' if len(relevant) > 1 else ''}: "
            f'<span class="ids">{html.escape(ids)}</span> ({n_rel} relevant gallery '
            f"image{'s' if n_rel != 1 else ''})</div></div>{''.join(rows)}</section>"
        )

    match_html = ""
    if chosen and query_tokens is not None and gallery_tokens is not None:

        def top1_correct(q: int) -> bool:
            hits = _hits(after_ranking, q, 1, gallery_ids, frozenset(queries[q].relevant_ids))
            return bool(hits) and hits[0].correct

        pick = next((q for q in chosen if top1_correct(q)), chosen[0])
        g = int(after_ranking.indices[pick, 0])
        q_tok, g_tok = _real(query_tokens, pick), _real(gallery_tokens, g)
        best, sims = token_matches(q_tok, g_tok)
        q_pos = token_positions(q_tok, query_features.tokens[pick], query_features.grid)
        g_pos = token_positions(g_tok, gallery_features.tokens[g], gallery_features.grid)
        svg = match_svg(
            data_uri(dataset.load_image(queries[pick]), MATCH_PX),
            data_uri(dataset.load_image(gallery[g]), MATCH_PX),
            q_pos,
            g_pos,
            best,
            sims,
        )
        correct = int(gallery_ids[g]) in set(queries[pick].relevant_ids)
        match_html = (
            f"<h2>Late-interaction token matches: {html.escape(queries[pick].image_id)} and its "
            f"top-1 {html.escape(gallery[g].image_id)} ({'correct' if correct else 'wrong'}, "
            f"score {float(sims.mean()):.3f})</h2>"
            f'<div class="matches">{svg}</div><p class="legend">Each of the {len(best)} query '
            "tokens (left) is joined to the gallery token (right) with which it has its maximum "
            "similarity; the late-interaction score is the mean of these maxima. Colour: "
            f"similarity, red ({float(sims.min()):.3f}) to green ({float(sims.max()):.3f}). "
            "A token sits at the patch most similar to it (for instance tokens, in practice "
            "their seed).</p>"
        )

    banner = (
        f'<div class="banner">{html.escape(UNTRAINED_NOTE)}</div>' if is_untrained(weights) else ""
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)} — retrieved</title><style>{CSS}</style></head><body>"
        f"<h1>What was retrieved — {html.escape(title)} {html.escape(weights_mark(weights))}</h1>"
        f"{banner}<p>{len(chosen)} of {len(queries)} queries, top {top}. Green ✓: a gallery "
        "image of a crater in the query's relevance set (its relevant crater ids); red ✗: not. "
        "The last row of each query shows every relevant gallery image, the images that "
        f"should have been found, with its rank after reranking (dashed orange: not in the "
        f"top {top}).</p>"
        f"{''.join(blocks)}{match_html}</body></html>\n"
    )
