"""Regenerate this folder's example manifest: a few synthetic crater crops + manifest.csv.

    python examples/manifest/make_example.py

The images come from the built-in synthetic generator (seed 0), so the example is exactly
reproducible. The CSV shows every column: role gallery/query/train, relevant_ids (a query
whose view also shows a neighbouring catalogued crater lists both ids) and view_type.
"""

from __future__ import annotations

import csv
from pathlib import Path

from craterlab.data.synthetic import SyntheticCraters

HERE = Path(__file__).resolve().parent
SIZE = 96  # small images keep the example in the repository tiny


def main() -> None:
    ds = SyntheticCraters(size="small", image_size=SIZE, views_per_query=2, train_views=0, seed=0)
    all_queries = ds.records("query")
    # one query crater whose views show a neighbour too (several relevant ids) + one plain one
    multi = next(q.crater_id for q in all_queries if len(q.relevant_ids) > 1)
    plain = next(q.crater_id for q in all_queries if q.crater_id != multi)
    queries = [q for q in all_queries if q.crater_id in (multi, plain)]
    query_craters = sorted({q.crater_id for q in queries})
    relevant = set().union(*(q.relevant_ids for q in queries))
    train = [r for r in ds.records("train") if r.view_type == "2x"][:2]
    train_craters = {r.crater_id for r in train}
    others = [c for c in ds.train_identities().tolist() if c not in train_craters][:3]
    gallery_craters = sorted(relevant | set(query_craters) | set(others))
    gallery = [r for r in ds.records("gallery") if r.crater_id in gallery_craters]
    (HERE / "images").mkdir(exist_ok=True)
    rows = []
    for role, records in (("gallery", gallery), ("query", queries), ("train", train)):
        for r in records:
            name = f"{role}_{r.image_id}.jpg"
            ds.load_image(r).save(HERE / "images" / name, quality=90)
            rel = (
                ";".join(f"crater{c:03d}" for c in sorted(r.relevant_ids))
                if role == "query"
                else ""
            )
            rows.append(
                {
                    "image_id": f"{role}_{r.image_id}",
                    "path": f"images/{name}",
                    "crater_id": f"crater{r.crater_id:03d}",
                    "role": role,
                    "relevant_ids": rel,
                    "view_type": r.view_type,
                }
            )
    with open(HERE / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {HERE / 'manifest.csv'}")


if __name__ == "__main__":
    main()
