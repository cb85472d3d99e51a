"""craterlab: instance-level crater retrieval experiments (CraterBench-R and beyond)."""

__version__ = "0.1.0"
