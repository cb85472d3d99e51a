"""The study's figures from run records, as PNG and SVG (matplotlib, Agg backend).

- ``map_vs_k``: mAP against K per token method and backbone (Fig 3);
- ``map_vs_bytes``: mAP against bytes per image per method and mode (Fig 4);
- ``map_vs_parameters``: single-vector mAP (best pooling) against backbone parameters (Fig 2);
- ``shortlist``: mAP, R@S and latency against the shortlist size S, with exhaustive late
  interaction as a reference line (Table 4).

A figure is drawn when its x variable takes at least two values among the runs. A line
joins only runs of one dataset, one backbone and one weights status (each is in its label);
mAP points carry their bootstrap 95% interval as error bars, and the mAP axis starts at 0.
Points of runs with untrained weights are drawn hollow and the title says so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from craterlab.report.marks import weights_label
from craterlab.report.runs import RunRecord

LI_MODES = ("exhaustive", "two_stage")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _float(x: str) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _title(base: str, records: Sequence[RunRecord]) -> str:
    return base + (" [random weights: not comparable]" if any(r.untrained for r in records) else "")


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=120)
    _plt().close(fig)
    return paths


def _marker(untrained: bool) -> dict:
    return {"marker": "o", "markerfacecolor": "none" if untrained else None}


def _li_mode(record: RunRecord) -> str | None:
    return next((m for m in ("exhaustive", "two_stage") if m in record.results), None)


# label -> points (x, mAP, untrained, CI low, CI high)
Series = dict[str, list[tuple[float, float, bool, float | None, float | None]]]


def group(record: RunRecord) -> str:
    """What a line may not mix: dataset, backbone, weights status."""
    view = record.view()
    return f"{view['dataset']} · {view['backbone']} · {weights_label(record.weights)}"


def _point(x: float, metrics: dict, untrained: bool) -> tuple:
    return (x, metrics["mAP"], untrained, metrics.get("mAP_ci_low"), metrics.get("mAP_ci_high"))


def _errors(pts: Sequence[tuple]) -> list[list[float]] | None:
    """Asymmetric error bars from the points' CIs (None when no point has one)."""
    if all(p[3] is None or p[4] is None for p in pts):
        return None
    low = [p[1] - p[3] if p[3] is not None else 0.0 for p in pts]
    high = [p[4] - p[1] if p[4] is not None else 0.0 for p in pts]
    return [low, high]


def _series_plot(
    series: Series,
    records: Sequence[RunRecord],
    out_dir: Path,
    stem: str,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    xscale: dict,
) -> list[Path]:
    """One line per series of (x, mAP, untrained) points, hollow markers for untrained runs;
    nothing when x does not vary."""
    if len({p[0] for pts in series.values() for p in pts}) < 2:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in sorted(series.items()):
        pts.sort(key=lambda p: p[0])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.errorbar(xs, ys, yerr=_errors(pts), label=label, capsize=2, **_marker(pts[0][2]))
    ax.set_ylim(bottom=0.0)
    ax.set_xscale("log", **xscale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(_title(title, records))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out_dir, stem)


def map_vs_k(records: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    return _series_plot(
        k_series(records), records, out_dir, "map_vs_k", title="mAP vs K",
        xlabel="K (tokens per image)", ylabel="mAP (late interaction)", xscale={"base": 2},
    )  # fmt: skip


def k_series(records: Sequence[RunRecord]) -> Series:
    """Fig 3's lines: late-interaction mAP against K, one per token method and group."""
    series: Series = defaultdict(list)
    for r in records:
        k, mode = _float(r.view()["k"]), _li_mode(r)
        if k is None or mode is None or "mAP" not in r.results[mode]:
            continue
        series[f"{r.view()['tokens']} — {group(r)}"].append(_point(k, r.results[mode], r.untrained))
    return series


def map_vs_bytes(records: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    series: Series = defaultdict(list)
    for r in records:
        view = r.view()
        for mode, m in r.results.items():
            b, ap = m.get("bytes_per_image"), m.get("mAP")
            if b is None or ap is None or b <= 0:
                continue
            label = f"{mode}: {view['tokens']} {view['quantizer']}" if mode != "single" else mode
            series[f"{label} — {group(r)}"].append(_point(b, m, r.untrained))
    return _series_plot(
        series, records, out_dir, "map_vs_bytes", title="mAP vs storage",
        xlabel="bytes per image", ylabel="mAP", xscale={},
    )  # fmt: skip


def map_vs_parameters(records: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    best: dict[str, tuple[float, float, bool]] = {}
    for r in records:
        m = r.results.get("single")
        if not r.parameters or m is None or "mAP" not in m:
            continue
        view = r.view()
        name = f"{view['backbone']} ({view['dataset']}, {weights_label(r.weights)})"
        if name not in best or m["mAP"] > best[name][1]:
            best[name] = (float(r.parameters), m["mAP"], r.untrained)
    if len({p for p, _, _ in best.values()}) < 2:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (params, ap, untrained) in sorted(best.items()):
        ax.plot([params / 1e6], [ap], linestyle="none", **_marker(untrained))
        ax.annotate(name, (params / 1e6, ap), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("backbone parameters (millions)")
    ax.set_ylabel("mAP (single vector, best pooling)")
    ax.set_title(_title("mAP vs parameters", records))
    ax.grid(alpha=0.3)
    return _save(fig, out_dir, "map_vs_parameters")


def shortlist(records: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    series: dict[str, list[tuple[float, dict, bool]]] = defaultdict(list)
    reference: dict[str, float] = {}
    for r in records:
        s, view = _float(r.view()["shortlist"]), r.view()
        label = f"{view['tokens']} {view['quantizer']} — {group(r)}"
        if s is not None and "two_stage" in r.results:
            series[label].append((s, r.results["two_stage"], r.untrained))
        if "mAP" in r.results.get("exhaustive", {}):
            reference[label] = r.results["exhaustive"]["mAP"]
    if len({s for pts in series.values() for s, _, _ in pts}) < 2:
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    panels = (
        ("mAP", "mAP"),
        ("R@S", "R@S (shortlist holds a relevant image)"),
        ("ms_per_query", "ms per query"),
    )
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for label, pts in sorted(series.items()):
            pts.sort(key=lambda p: p[0])
            xs = [p[0] for p in pts]
            ys = [p[1].get(key, math.nan) for p in pts]
            yerr = None
            if key == "mAP":
                lows = [p[1].get("mAP_ci_low") for p in pts]
                highs = [p[1].get("mAP_ci_high") for p in pts]
                if all(v is not None for v in lows + highs):
                    yerr = [
                        [y - lo for y, lo in zip(ys, lows, strict=True)],
                        [hi - y for y, hi in zip(ys, highs, strict=True)],
                    ]
            line = ax.errorbar(xs, ys, yerr=yerr, label=label, capsize=2, **_marker(pts[0][2]))
            line = line.lines[0]
            if key == "mAP" and label in reference:
                ax.axhline(reference[label], color=line.get_color(), linestyle="--", linewidth=1)
        ax.set_ylim(bottom=0.0)
        ax.set_xscale("log")
        ax.set_xlabel("shortlist size S")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="dashed: exhaustive LI", title_fontsize=7)
    fig.suptitle(_title("Two-stage retrieval vs S", records))
    return _save(fig, out_dir, "shortlist")


FIGURES = (map_vs_k, map_vs_bytes, map_vs_parameters, shortlist)


def write_figures(records: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    """Every figure the records support, as PNG and SVG files in ``out_dir``."""
    paths: list[Path] = []
    for figure in FIGURES:
        paths += figure(records, out_dir)
    return paths
