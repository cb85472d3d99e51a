"""``python -m craterlab plan --bytes-per-image B --ms-per-query T``: the Pareto front of the
measured runs and the best configuration within the budget (:mod:`craterlab.sweeps.plan`)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from craterlab.errors import CraterlabError
from craterlab.results import default_uri
from craterlab.sweeps.plan import (
    Candidate,
    best_within,
    group_by_dataset,
    pareto_front,
    read_candidates,
)


def format_candidates(candidates: Sequence[Candidate]) -> str:
    header = ["mAP", "bytes/img", "ms/query", "mode", "K", "quantizer", "tokens", "S"]
    header += ["backbone", "weights", "dataset"]
    rows = [
        [
            f"{c.map:.4f}",
            f"{c.bytes_per_image:.0f}",
            f"{c.ms_per_query:.3f}",
            c.mode,
            c.setting["K"],
            c.setting["quantizer"],
            c.setting["tokens"],
            c.setting["S"],
            c.setting["backbone"],
            c.setting.get("weights", "unknown"),
            c.setting.get("dataset", "?"),
        ]
        for c in candidates
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m craterlab plan",
        description="Pareto front of measured runs and the best configuration within a budget.",
    )
    parser.add_argument("--bytes-per-image", type=float, required=True, help="storage budget B")
    parser.add_argument("--ms-per-query", type=float, required=True, help="latency budget T")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: outputs/)")
    parser.add_argument("--experiment", default="craterlab", help="MLflow experiment name")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=30.0,
        help="give up on a tracking store that does not answer within this time (default 30)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="choose among the runs on this dataset (as the front prints it, e.g. "
        "craterbench_r or synthetic-small); required when the runs span several datasets",
    )
    args = parser.parse_args(argv)
    if not math.isfinite(args.timeout_s) or args.timeout_s <= 0:
        raise CraterlabError(f"--timeout-s {args.timeout_s:g} is not valid: it must be > 0.")
    uri = args.tracking_uri or default_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise CraterlabError(
            f"There is no MLflow store at {uri}: nothing has been measured yet. Run a sweep "
            "first, or pass --tracking-uri with the store your runs were logged to."
        )
    candidates = read_candidates(uri, args.experiment, args.timeout_s)
    if not candidates:
        raise CraterlabError(
            f"Experiment {args.experiment!r} in {uri} has no finished run that logged mAP, "
            "bytes_per_image and ms_per_query. Run a sweep first (python -m craterlab -m "
            "k=16,32 quantizer=fp32,int8)."
        )
    datasets = sorted({c.setting.get("dataset", "?") for c in candidates})
    if args.dataset is not None:
        if args.dataset not in datasets:
            raise CraterlabError(
                f"--dataset {args.dataset!r} has no measured runs in {uri}, experiment "
                f"{args.experiment!r}; its runs are on: {', '.join(datasets)}."
            )
        candidates = [c for c in candidates if c.setting.get("dataset") == args.dataset]
    print(
        f"{len(candidates)} measured configurations ({len({c.run_id for c in candidates})} "
        f"runs) in {uri}, experiment {args.experiment!r}."
    )
    groups = group_by_dataset(candidates)
    for dataset, members in groups.items():
        front = pareto_front(members)
        print(
            f"\nDataset {dataset} — Pareto front (mAP up, bytes/image down, ms/query down): ",
            end="",
        )
        print(len(front))
        print(format_candidates(front))
    if any(c.setting.get("weights") == "untrained" for c in candidates):
        print(
            "\nNOTE: weights 'untrained' are random backbone weights: their mAP says nothing "
            "about what a trained backbone would reach."
        )
    if len(groups) > 1:
        print(
            f"\nThe runs measured {len(groups)} datasets ({', '.join(groups)}): their mAPs are "
            "not comparable, so no configuration is chosen across them. Pass --dataset NAME "
            "to choose within one."
        )
        return 2
    best = best_within(candidates, args.bytes_per_image, args.ms_per_query)
    budget = f"{args.bytes_per_image:g} bytes/image and {args.ms_per_query:g} ms/query"
    if best is None:
        cheapest = min(candidates, key=lambda c: (c.bytes_per_image, c.ms_per_query))
        print(
            f"\nNo measured configuration fits {budget}. The smallest needs "
            f"{cheapest.bytes_per_image:.0f} bytes/image and {cheapest.ms_per_query:.3f} "
            "ms/query: raise the budget, or measure smaller settings (lower k, quantizer=int8 "
            "or pq48, a smaller shortlist)."
        )
        return 1
    print(f"\nBest within {budget}:")
    print(format_candidates([best]))
    print(f"\n  {best.command()}")
    return 0
