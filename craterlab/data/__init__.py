"""Built-in datasets: the synthetic benchmark, the CraterBench-R release and CSV manifests.

Registered through :func:`register_datasets` like any plugin's datasets. Each dataset
implements :class:`craterlab.types.CraterDataset`.
"""

from __future__ import annotations

from craterlab.hookspecs import hookimpl
from craterlab.lazy import lazy_exports

__all__ = ["CraterBenchR", "ManifestDataset", "SyntheticCraters", "register_datasets"]

__getattr__ = lazy_exports(
    __name__,
    {
        "CraterBenchR": "craterlab.data.craterbench",
        "ManifestDataset": "craterlab.data.manifest",
        "SyntheticCraters": "craterlab.data.synthetic",
    },
)


@hookimpl
def register_datasets(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "synthetic",
        "craterlab.data.synthetic:SyntheticCraters",
        "Procedural crater benchmark (CraterBench-R protocol), rendered lazily from a seed",
    )
    register(
        "craterbench_r",
        "craterlab.data.craterbench:CraterBenchR",
        "The CraterBench-R release (Mars CTX; jfang/CraterBench-R), downloaded if absent",
    )
    register(
        "manifest",
        "craterlab.data.manifest:ManifestDataset",
        "Your own crater crops listed in a CSV (image_id,path,crater_id,role[,relevant_ids])",
    )
