"""The paper's numbers: every cell of Tables 2-13 and the text's figures, each keyed by the
full configuration, found for a run only when every key field and the metric match."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from craterlab.errors import CraterlabError
from craterlab.report.paper import KEYS, load_cells, lookup, run_key
from craterlab.report.runs import run_view

CONF = Path(__file__).resolve().parent.parent / "conf"

# Result cells per table as the paper prints them: rows x metric columns, less its dashes.
TABLE_SIZES = {
    "table2": 11 * 4,  # 11 backbones x R@1 R@5 R@10 mAP
    "table3": 8 * 4,  # 8 rows x (DINO, MarsDINO) x (R@1, mAP)
    "table4": 2 * (3 + 4 * 4 + 2),  # per backbone: stage 1 (R@1 mAP time), 4 S x 4, full LI
    "table5": 30 * 4,
    "table6": 22 * 8,  # 22 ViTs x 4 poolings x (R@1, mAP)
    "table7": 11 * 4,
    "table8": 7 * 4,
    "table9": 5 * 8 + 3,  # 5 K x 4 assignments x (R@1, mAP) + raw mAP at K = 4, 16, 64
    "table10": 5 * 8 + 3,
    "table11": 5 * 8,
    "table12": 5 * 3,  # 5 quantizers x (bytes/token, DINO mAP, MarsDINO mAP)
    "table13": 5 * 6,
}


def options(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml")}


def test_every_cell_of_tables_2_to_13_is_there_once():
    cells = load_cells()
    counts = Counter(c.table for c in cells)
    assert {t: n for t, n in counts.items() if t != "text"} == TABLE_SIZES
    assert sum(TABLE_SIZES.values()) == 657
    assert counts["text"] >= 30  # the figures quoted in the running text
    keys = Counter((c.table, c.key) for c in cells)
    assert [k for k, n in keys.items() if n > 1] == []


def test_every_key_names_real_options():
    allowed = {
        "backbone": options("backbone"),
        "weights": options("baseline"),
        "pooling": options("pooling"),
        "selector": options("selector"),
        "aggregator": {"none", "instance", "kmeans", "medoids", "vlad"},
        "seeds": {"attention", "fps"},
        "assign": {"hard", "soft2", "soft4", "dense", "best"},
        "quantizer": options("quantizer"),
        "mode": {"single", "exhaustive", "two_stage"},
    }
    for cell in load_cells():
        fields = cell.fields
        assert tuple(fields) == KEYS
        for name, ok in allowed.items():
            value = fields[name]
            parts = value.split("+") if cell.table == "text" else [value]
            if name == "selector" and value == "attention-random":
                continue  # a difference between two selectors (Sec. 5.2.1)
            if name == "backbone" and value == "marsdino_b-dino_b16":
                continue
            assert value == "-" or set(parts) <= ok, (cell.source, name, value)
        assert fields["k"] in {"-", "best"} or fields["k"].isdigit()


def test_tables_agree_on_shared_cells_except_where_the_paper_differs():
    """The same configuration printed in two tables has the same number, but for the three
    places where the paper prints two (kept as printed, each table with its own)."""
    values = defaultdict(set)
    for cell in load_cells():
        if cell.table != "text":
            values[cell.key].add(cell.value)
    differ = {
        (dict(k)["backbone"], dict(k)["k"], dict(k)["mode"])
        for k, v in values.items()
        if len(v) > 1
    }
    assert differ == {
        ("dino_s16", "-", "single"),  # CLS mAP: .420 (Tables 2, 3, 5, 6), .422 (Table 4)
        ("marsdino_s", "-", "single"),  # GeM mAP: .412, .413 (Table 4)
        ("dino_s16", "64", "exhaustive"),  # FPS/hard K=64 mAP: .760 (Table 3), .759 (Table 9)
    }


# ------------------------------------------------------------------ runs meet cells

DINO_S = {
    "backbone.name": "timm_vit",
    "backbone.model": "vit_small_patch16_224",
    "backbone.pretrained_tag": "dino",
}
MARS_S = {"backbone.name": "marsdino", "backbone.size": "s"}
MARS_B = {"backbone.name": "marsdino", "backbone.size": "b"}


def view(backbone: dict, mode: str, **kw) -> dict[str, str]:
    cfg = {
        **backbone,
        "pooling.name": "cls",
        "selector.name": "attention",
        "aggregator.name": "instance",
        "aggregator.seeds": "fps",
        "aggregator.assign": "hard",
        "k": "16",
        "quantizer.name": "fp32",
        "shortlist": "100",
        "train.name": "none",
        "dataset.name": "craterbench_r",
    }
    cfg.update({key.replace("__", "."): str(v) for key, v in kw.items()})
    return {**run_view(cfg), "mode": mode}


def value(v: dict[str, str], metric: str, table: str | None = None) -> float | None:
    cell = lookup(v, metric, table=table)
    return None if cell is None else cell.value


def test_table6_rows_get_their_own_pooling_not_the_cls_row():
    for pooling, r1, m in (
        ("cls", 0.374, 0.553),
        ("mean", 0.369, 0.540),
        ("max", 0.344, 0.511),
        ("gem", 0.369, 0.544),
    ):
        v = view(MARS_B, "single", pooling__name=pooling)
        assert (value(v, "R@1", "table6"), value(v, "mAP", "table6")) == (r1, m)
        assert value(v, "R@10") == (0.503 if pooling == "cls" else None)  # only Table 2/5's row


def test_assignment_rows_of_tables_9_and_10():
    for assign, mAP in (("hard", 0.623), ("soft2", 0.612), ("soft4", 0.582), ("dense", 0.457)):
        v = view(DINO_S, "exhaustive", aggregator__assign=assign)
        assert value(v, "mAP", "table9") == mAP
    mars = view(
        MARS_S, "exhaustive", aggregator__seeds="attention", k=32, aggregator__assign="soft4"
    )
    assert value(mars, "mAP", "table10") == 0.577
    raw = view(DINO_S, "exhaustive", aggregator__name="none", k=64)
    assert value(raw, "mAP", "table9") == 0.716
    assert value(view(DINO_S, "exhaustive", k=8, aggregator__assign="soft2"), "R@1") == 0.219


def test_table4_time_is_the_mean_total_per_query_and_each_backbone_has_its_own():
    dino = view(DINO_S, "two_stage", k=32)
    mars = view(MARS_S, "two_stage", k=32, pooling__name="gem", aggregator__seeds="attention")
    assert value(dino, "ms_per_query") == 3.6 and value(mars, "ms_per_query") == 3.4
    assert value(dino, "latency_rerank_p50_ms") is None  # no such number in the paper
    assert value({**dino, "shortlist": "500"}, "R@S") == 0.629
    assert value(view(DINO_S, "single"), "ms_per_query") == 0.6
    assert value(view(DINO_S, "single"), "mAP", "table4") == 0.422
    assert value(view(DINO_S, "single"), "mAP", "table2") == 0.420
    assert value(view(DINO_S, "exhaustive", k=32), "R@1", "table4") == 0.514
    # the 89-94% range spans both backbones: not one backbone's value
    assert value(dino, "mAP_recovered") is None


def test_tables_12_and_13_and_the_fine_tuning_figures():
    for quantizer, extra, mAP in (("fp16", {}, 0.726), ("pq", {"quantizer__m": 96}, 0.715)):
        v = view(DINO_S, "exhaustive", k=32, quantizer__name=quantizer, **extra)
        assert value(v, "mAP", "table12") == mAP
    mean = view(
        DINO_S, "single", k=64, pooling__name="instance", pooling__reduce="mean",
        pooling__seeds="attention", pooling__assign="best",
    )  # fmt: skip
    assert value(mean, "mAP", "table13") == 0.322
    assert value({**mean, "pooling": "instance_max"}, "mAP", "table13") == 0.268
    tuned = view(MARS_S, "single", train__name="triplet", train__augment="single_crop")
    assert run_key(tuned)["weights"] == "triplet_single"
    assert value(tuned, "mAP") == 0.318
    li = view(MARS_S, "exhaustive", k=32, aggregator__seeds="attention", train__name="triplet")
    li["augment"] = "single_crop"
    assert value(li, "mAP") == 0.530


def test_a_key_that_differs_in_one_field_finds_nothing():
    base = view(DINO_S, "exhaustive")
    assert value(base, "mAP") == 0.623
    assert value({**base, "quantizer": "int8"}, "mAP") is None  # Table 12 is at K=32 only
    assert value({**base, "k": "12"}, "mAP") is None
    assert value(view(DINO_S, "exhaustive", train__name="supcon"), "mAP") is None
    assert run_key(base)["pooling"] == "-" and run_key(base)["selector"] == "-"


def test_a_malformed_row_is_named(tmp_path: Path):
    bad = tmp_path / "numbers.yaml"
    bad.write_text(
        "tables:\n  table9:\n    columns: [{metric: mAP}, {metric: R@1}]\n"
        "    groups:\n      - rows:\n          - {label: '4', k: 4, values: [.1]}\n"
    )
    with pytest.raises(CraterlabError, match=r"table9, row '4' has 1 values for 2 columns"):
        load_cells(bad)
    bad.write_text("text:\n  - {section: '5', backbone: x, colour: red, metric: mAP, value: 1}\n")
    with pytest.raises(CraterlabError, match="unknown key field"):
        load_cells(bad)
