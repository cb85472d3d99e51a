"""An HTML page of search results: each query crop beside its top hits, for a quick look.

The page a user opens after ``python -m craterlab search ... --html``: one self-contained
file (thumbnails embedded, the run page's CSS, no script, no network). A hit whose crater
label equals the query's is framed green (a manifest with ``crater_id`` gives the labels;
a folder of crops has none, so nothing is marked). A crop whose file has moved or no longer
decodes is shown as its path and the reason, so the page is still written.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from craterlab.data.images import open_rgb
from craterlab.errors import DataError
from craterlab.report.marks import UNTRAINED_NOTE, weights_mark
from craterlab.report.pages import CSS, THUMB_PX, data_uri, figure_html
from craterlab.results import is_untrained
from craterlab.workflows.items import Item
from craterlab.workflows.results import SearchHits

MAX_QUERIES = 50
"""Queries shown by default: every one would make a page of thousands of thumbnails."""


def _thumbnail(item: Item | None, item_id: str, caption: str, cls: str) -> str:
    """A crop's thumbnail, or a box naming it and why it cannot be shown."""
    if item is None:
        return _missing(caption, f"{item_id}: not in the index or the queries", "")
    try:
        uri = data_uri(open_rgb(item.path), THUMB_PX)
    except DataError as exc:
        return _missing(caption, f"{item.path}: cannot be shown", str(exc))
    return figure_html(uri, caption, cls, f"{item.id} (crater {item.crater})")


def _missing(caption: str, text: str, why: str) -> str:
    return (
        f'<figure class="missing" title="{html.escape(why)}"><figcaption>'
        f"{html.escape(caption)}<br>{html.escape(text)}</figcaption></figure>"
    )


def search_page(
    hits: SearchHits,
    queries: Sequence[Item],
    gallery: Sequence[Item],
    *,
    title: str = "craterlab search",
    weights: str = "unknown",
    max_queries: int = MAX_QUERIES,
) -> str:
    """The page as an HTML string: the first ``max_queries`` queries and their ranked hits."""
    query_of = {it.id: it for it in queries}
    gallery_of = {it.id: it for it in gallery}
    by_query = hits.by_query()
    labelled = any(it.crater != it.id for it in queries)  # a folder's crater label is its id
    blocks = []
    for qid, rows in list(by_query.items())[:max_queries]:
        query = query_of.get(qid)
        figures = []
        for h in rows:
            hit = gallery_of.get(h.gallery_id)
            same = labelled and query is not None and hit is not None
            same = same and hit.crater == query.crater  # type: ignore[union-attr]
            caption = f"#{h.rank} {h.score:.3f}"
            figures.append(_thumbnail(hit, h.gallery_id, caption, "correct" if same else "hit"))
        crater = f"crater {query.crater}" if labelled and query is not None else ""
        blocks.append(
            f'<section class="query" data-query="{html.escape(qid)}"><div class="qhead">'
            f"{_thumbnail(query, qid, 'query', 'query')}<div><b>{html.escape(qid)}</b><br>"
            f'{html.escape(crater)}</div></div><div class="row">{"".join(figures)}</div>'
            "</section>"
        )
    shown = min(len(by_query), max_queries)
    top = max((len(r) for r in by_query.values()), default=0)
    more = f" (the first {shown}; the CSV and JSON hold all)" if shown < len(by_query) else ""
    legend = (
        "Green ✓: a hit with the query's crater label."
        if labelled
        else "The queries carry no crater labels (a folder of crops), so no hit is marked."
    )
    banner = (
        f'<div class="banner">{html.escape(UNTRAINED_NOTE)}</div>' if is_untrained(weights) else ""
    )
    skipped = (
        f"<p>{len(hits.skipped)} query crop(s) could not be decoded and were skipped: "
        f"{html.escape(', '.join(hits.skipped[:20]))}</p>"
        if hits.skipped
        else ""
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}"
        "figure.hit img{border-color:#bbb} figure.missing{width:112px;font-size:.7em}"
        "</style></head><body>"
        f"<h1>{html.escape(title)} {html.escape(weights_mark(weights))}</h1>{banner}"
        f"<p>{len(by_query)} queries{more}, top {top} by late-interaction score. {legend}</p>"
        f"{skipped}{''.join(blocks)}</body></html>\n"
    )
