"""The wheel carries the configs, so an installed craterlab runs outside a checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import CONF, ROOT


def test_wheel_contains_every_config(tmp_path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("craterlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"craterlab/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert expected and expected <= names
    assert "craterlab/__main__.py" in names
