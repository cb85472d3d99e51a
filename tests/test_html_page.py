"""The run's HTML retrieval page: content checked in Python, then loaded in a real Chromium."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BROWSER_ARGS, CHROMIUM
from PIL import Image

from craterlab.report.pages import build_run_page, sample_queries, token_matches, token_positions
from craterlab.types import Features, ImageRecord, Ranking, Tokens

N_GALLERY, N_QUERY, GRID, DIM, K = 12, 5, (4, 4), 8, 3


class TinyDataset:
    """Six craters x 2 gallery crops, five queries; images are flat colours (no rendering)."""

    name = "tiny"

    def __init__(self) -> None:
        self.gallery = [ImageRecord(f"g{i}", crater_id=i // 2) for i in range(N_GALLERY)]
        self.query = [
            ImageRecord(f"q{i}", crater_id=i, relevant_ids=frozenset({i})) for i in range(N_QUERY)
        ]

    def records(self, split: str):
        return {"gallery": self.gallery, "query": self.query}.get(split, [])

    def load_image(self, record: ImageRecord) -> Image.Image:
        shade = (37 * int(record.image_id[1:]) + (0 if record.image_id[0] == "g" else 120)) % 255
        return Image.new("RGB", (64, 64), (shade, 255 - shade, 90))

    def identity(self) -> str:
        return "tiny"


def make_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gallery_patches = torch.randn(N_GALLERY, GRID[0] * GRID[1], DIM, generator=g)
    query_patches = torch.randn(N_QUERY, GRID[0] * GRID[1], DIM, generator=g)
    # raw selection: tokens are patches 0, 5 and 10 of each image
    chosen = torch.tensor([0, 5, 10])
    q_tokens = Tokens(query_patches[:, chosen].clone())
    g_tokens = Tokens(gallery_patches[:, chosen].clone())
    scores = torch.einsum("qkd,gjd->qgkj", q_tokens.vectors, g_tokens.vectors).amax(-1).mean(-1)
    order = scores.argsort(dim=1, descending=True)
    after = Ranking(order, scores.gather(1, order), shortlist=order[:, :10])
    single = torch.randn(N_QUERY, N_GALLERY, generator=g)
    s_order = single.argsort(dim=1, descending=True)
    before = Ranking(s_order, single.gather(1, s_order))
    features = {
        "query": Features(query_patches[:, 0], query_patches, None, GRID),
        "gallery": Features(gallery_patches[:, 0], gallery_patches, None, GRID),
    }
    return {"single": before, "two_stage": after}, (q_tokens, g_tokens), features


def page(n_queries: int = 4, weights: str = "random (offline)") -> tuple[str, dict]:
    rankings, tokens, features = make_inputs()
    html = build_run_page(
        TinyDataset(),
        rankings,
        before="single",
        after="two_stage",
        query_tokens=tokens[0],
        gallery_tokens=tokens[1],
        query_features=features["query"],
        gallery_features=features["gallery"],
        n_queries=n_queries,
        title="tiny run",
        weights=weights,
    )
    return html, rankings


def test_sample_queries_is_even_and_deterministic():
    assert sample_queries(list(range(10)), 3) == [0, 4, 9]  # linspace(0, 9, 3) rounded
    assert sample_queries([2, 5], 6) == [2, 5]
    assert sample_queries([], 3) == [] and sample_queries([1], 0) == []


def test_page_shows_queries_top10_before_and_after_with_correct_marks():
    html, rankings = page()
    sections = re.findall(r'<section class="query" data-query="(q\d+)">(.*?)</section>', html)
    assert [q for q, _ in sections] == ["q0", "q1", "q3", "q4"]  # 4 of 5, evenly spread
    dataset = TinyDataset()
    for qid, body in sections:
        q = int(qid[1:])
        assert len(re.findall(r'<div class="row">', body)) == 2  # before and after
        body, relevant_row = body.split('<div class="row relevant">')
        figures = re.findall(r'<figure class="(correct|wrong)">.*?title="g(\d+) ', body)
        assert len(figures) == 20
        for mode, chunk in zip(("single", "two_stage"), (figures[:10], figures[10:]), strict=True):
            expected = rankings[mode].indices[q, :10].tolist()
            assert [int(g) for _, g in chunk] == expected
            for cls, g in chunk:  # marked correct exactly when the gallery crater is relevant
                correct = dataset.gallery[int(g)].crater_id in dataset.query[q].relevant_ids
                assert cls == ("correct" if correct else "wrong")
        score = f"{float(rankings['two_stage'].scores[q, 0]):.3f}"
        assert f"#1 {score}" in body
        # the images that should have been found: every relevant gallery image, with its rank
        relevant = dataset.query[q].relevant_ids
        shown = re.findall(r'<figure class="(correct|missed)">.*?title="g(\d+) .*?'
                           r"<figcaption>rank (\d+)</figcaption>", relevant_row)  # fmt: skip
        expected = [g for g, r in enumerate(dataset.gallery) if r.crater_id in relevant]
        assert [int(g) for _, g, _ in shown] == expected and expected
        order = rankings["two_stage"].indices[q].tolist()
        for cls, g, rank in shown:
            assert int(rank) == order.index(int(g)) + 1
            assert cls == ("correct" if int(rank) <= 10 else "missed")
        ids = ", ".join(str(i) for i in sorted(relevant))
        label = "relevant crater ids" if len(relevant) > 1 else "relevant crater id"
        assert f'{label}: <span class="ids">{ids}</span>' in html
    assert "relevant craters:" not in html  # an id is not a count


def test_page_is_self_contained_and_marks_untrained_weights():
    html, _ = page()
    assert "NOTE: untrained (random) backbone weights" in html and "[random weights]" in html
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert "<script" not in html
    trained, _ = page(weights="pretrained (hub)")
    assert "untrained" not in trained and "[pretrained weights]" in trained


def test_match_drawing_joins_each_query_token_to_its_best_gallery_token():
    html, rankings = page()
    lines = re.findall(r"query token (\d+) -> gallery token (\d+): similarity (-?[\d.]+)", html)
    assert len(lines) == K
    match = re.search(r"matches: (q\d+) and its top-1 (g\d+)", html)
    q, g = int(match.group(1)[1:]), int(match.group(2)[1:])
    assert g == int(rankings["two_stage"].indices[q, 0])
    _, tokens, _ = make_inputs()
    qt = torch.nn.functional.normalize(tokens[0].vectors[q], dim=-1)
    gt = torch.nn.functional.normalize(tokens[1].vectors[g], dim=-1)
    sims = qt @ gt.T  # independent: the brute-force argmax of every query token
    for i, j, s in lines:
        assert int(j) == int(sims[int(i)].argmax())
        assert float(s) == pytest.approx(float(sims[int(i)].max()), abs=1e-3)


def test_token_positions_of_raw_selection_are_the_selected_patches():
    patches = torch.randn(GRID[0] * GRID[1], DIM, generator=torch.Generator().manual_seed(3))
    selected = [0, 5, 10, 15, 3]
    pos = token_positions(patches[selected], patches, GRID)
    for (x, y), p in zip(pos.tolist(), selected, strict=True):
        assert (x, y) == pytest.approx(((p % 4 + 0.5) / 4, (p // 4 + 0.5) / 4))
    best, sims = token_matches(patches[selected], patches)
    assert best.tolist() == selected and np.allclose(sims.numpy(), 1.0, atol=1e-5)


# ------------------------------------------------------------------ a real browser


def test_page_in_headless_chromium(tmp_path: Path):
    if CHROMIUM is None:
        pytest.skip(
            "no chromium executable on PATH: install Debian's chromium "
            "(apt-get update && apt-get install -y chromium) to run the browser test"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )
    html, _ = page(n_queries=3)
    path = tmp_path / "results.html"
    path.write_text(html, encoding="utf-8")
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        tab = browser.new_page(viewport={"width": 1600, "height": 1000})
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(path.as_uri())
        tab.wait_for_load_state("load")
        assert tab.locator("section.query").count() == 3
        # query + top 10 before + top 10 after + its 2 relevant gallery crops
        assert tab.locator("section.query img.thumb").count() == 3 * (1 + 20 + 2)
        assert tab.locator("section.query .row.relevant figure").count() == 3 * 2
        loaded = tab.evaluate(
            "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
        )
        assert loaded, "an embedded thumbnail did not decode"
        assert tab.locator(".matches svg g.match").count() == K
        tab.screenshot(path=str(tmp_path / "results.png"), full_page=True)
        browser.close()
    assert errors == []
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_page_title_names_the_runs_configuration():
    from craterlab.report.pages import config_title
    from craterlab.report.runs import run_view

    cfg = {
        "backbone.name": "timm_vit",
        "backbone.model": "vit_small_patch16_224",
        "backbone.pretrained_tag": "dino",
        "pooling.name": "cls",
        "selector.name": "attention",
        "aggregator.name": "instance",
        "aggregator.seeds": "fps",
        "aggregator.assign": "soft2",
        "k": "32",
        "quantizer.name": "int8",
        "shortlist": "100",
        "train.name": "none",
    }
    title = config_title(run_view(cfg), "synthetic-tiny")
    assert title == (
        "synthetic-tiny · vit_small_patch16_224.dino · pooling cls · instance (fps, soft2) K=32"
        " · int8 · S=100"
    )
    single = {**cfg, "selector.name": "none", "aggregator.name": "none", "pooling.name": "gem"}
    assert config_title(run_view(single), "craterbench_r").endswith("pooling gem · no tokens")
    html, _ = page()
    assert "<title>tiny run — retrieved</title>" in html
