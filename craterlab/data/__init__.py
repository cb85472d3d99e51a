"""Built-in datasets: the synthetic benchmark, the CraterBench-R release and CSV manifests.

Registered through :func:`register_datasets` like any plugin's datasets. Each dataset
implements :class:`craterlab.types.CraterDataset`.
"""

from __future__ import annotations

from craterlab.data.craterbench import CraterBenchR
from craterlab.data.manifest import ManifestDataset
from craterlab.data.synthetic import SyntheticCraters
from craterlab.hookspecs import hookimpl

__all__ = ["CraterBenchR", "ManifestDataset", "SyntheticCraters", "register_datasets"]


@hookimpl
def register_datasets(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "synthetic",
        SyntheticCraters,
        "Procedural crater benchmark (CraterBench-R protocol), rendered lazily from a seed",
    )
    register(
        "craterbench_r",
        CraterBenchR,
        "The CraterBench-R release (Mars CTX; jfang/CraterBench-R), downloaded if absent",
    )
    register(
        "manifest",
        ManifestDataset,
        "Your own crater crops listed in a CSV (image_id,path,crater_id,role[,relevant_ids])",
    )
