"""Render two synthetic observations of one place, each a tile plus its crater catalog.

    python examples/workflows/make_observations.py [OUT_DIR]     # default: outputs/observations

Writes ``a.png``/``a.csv`` and ``b.png``/``b.csv``: B is shifted by (24, -16) pixels and lit
from another sun azimuth. The catalogs list x, y, diameter in pixels of their own tile and the
same ids for the same craters. Then run the commands of examples/workflows/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from craterlab.workflows.demo import render_observation


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/observations")
    a = render_observation(out / "a", sun_azimuth=270.0, noise_seed=1)
    b = render_observation(out / "b", centre=(19.0, 14.0), sun_azimuth=250.0, noise_seed=2)
    for name, obs in (("A", a), ("B", b)):
        x, y = obs.origin
        print(f"{name}: {obs.image} + {obs.catalog}: {obs.craters} craters, origin {x:g} {y:g}")


if __name__ == "__main__":
    main()
