"""Checkpoints never run code hidden in them; damaged ones fail with a message naming the file.

Issue 9, items 1 and 9: a ``__reduce__`` payload in a ``.pth`` (local or from ``hf-hub:``) is
refused before anything runs, a DINO-style checkpoint carrying its argparse args still loads,
and empty / truncated / corrupt torch and safetensors files give one-paragraph errors.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from craterlab.backbones import timm_vit
from craterlab.backbones.weights import load_checkpoint_into, read_checkpoint
from craterlab.errors import CraterlabError


class Payload:
    """Pickles as a call to os.system: unpickling it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return timm.create_model("test_vit", num_classes=0).state_dict()


def dino_style(state: dict[str, torch.Tensor], **extra: object) -> dict[str, object]:
    teacher = {f"module.backbone.{k}": v.clone() for k, v in state.items()}
    teacher["module.head.last_layer.weight_g"] = torch.ones(1, 4)
    return {"teacher": teacher, "student": teacher, "epoch": 7, **extra}


def test_payload_in_a_checkpoint_is_refused_and_never_runs(tmp_path, tiny_state) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save(dino_style(tiny_state, hook=Payload(marker)), path)
    model = timm.create_model("test_vit", num_classes=0)
    with pytest.raises(CraterlabError) as err:
        load_checkpoint_into(model, path)
    assert not marker.exists()
    msg = str(err.value)
    assert f"Checkpoint {path} was refused" in msg and "Beware: posix.system" in msg
    assert "safetensors" in msg and "Converting a trusted checkpoint" in msg


def test_the_conversion_command_in_the_message_works(tmp_path, tiny_state) -> None:
    """The one-liner the refusal prints converts a trusted file that then loads."""
    import fractions  # a harmless class that is still not plain data: refused

    path = tmp_path / "trusted.pth"
    torch.save(dino_style(tiny_state, lr=fractions.Fraction(1, 3)), path)
    with pytest.raises(CraterlabError) as err:
        read_checkpoint(path)
    assert "fractions.Fraction" in str(err.value)
    line = next(s for s in str(err.value).splitlines() if s.strip().startswith("python -c"))
    code = line.strip()[len('python -c "') : -1]
    subprocess.run([sys.executable, "-c", code], check=True)
    converted = path.with_suffix(".safetensors")
    model = timm.create_model("test_vit", num_classes=0)
    report = load_checkpoint_into(model, converted)
    assert report.loaded == len(tiny_state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_state.items())


def test_dino_checkpoint_with_its_training_args_loads(tmp_path, tiny_state) -> None:
    args = argparse.Namespace(
        arch="vit_small",
        patch_size=16,
        global_crops_scale=(0.4, 1.0),
        output_dir=pathlib.Path("/tmp/out"),
        lr=np.float64(5e-4),
        seen=np.arange(3),
        dist_url=None,
    )
    path = tmp_path / "dino.pth"
    torch.save(dino_style(tiny_state, args=args), path)
    model = timm.create_model("test_vit", num_classes=0)
    report = load_checkpoint_into(model, path)
    assert report.loaded == len(tiny_state) and report.dropped == ["head.last_layer.weight_g"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_state.items())
    ckpt = read_checkpoint(path)
    assert ckpt["args"].global_crops_scale == (0.4, 1.0)
    assert ckpt["args"].output_dir == pathlib.Path("/tmp/out")


def fake_hub_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """A Hugging Face cache entry (snapshot + refs/main) holding ``files``."""
    rev = "b" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for name, src in files.items():
        (repo / "snapshots" / rev / name).write_bytes(src.read_bytes())


def test_hf_hub_checkpoint_goes_through_the_same_loader(monkeypatch, tmp_path, tiny_state) -> None:
    import huggingface_hub.constants as hc

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.bin"
    torch.save(dino_style(tiny_state, hook=Payload(marker)), evil)
    fake_hub_repo(tmp_path / "hub", "someone/evil", {"pytorch_model.bin": evil})
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CraterlabError, match="was refused"):
        timm_vit("test_vit", weights="hf-hub:someone/evil")
    assert not marker.exists()


def test_safetensors_checkpoint_loads(tmp_path, tiny_state) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({f"module.backbone.{k}": v.contiguous() for k, v in tiny_state.items()}, path)
    model = timm.create_model("test_vit", num_classes=0)
    assert load_checkpoint_into(model, path).loaded == len(tiny_state)
    # the same bytes under another extension are recognised by their header
    other = tmp_path / "w.pth"
    other.write_bytes(path.read_bytes())
    assert set(read_checkpoint(other)) == set(read_checkpoint(path))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_empty_truncated_and_garbage_checkpoints_name_the_file(
    tmp_path, tiny_state, suffix
) -> None:
    from safetensors.torch import save_file

    good = tmp_path / f"good{suffix}"
    if suffix == ".pth":
        torch.save(dino_style(tiny_state), good)
    else:
        save_file({k: v.contiguous() for k, v in tiny_state.items()}, good)
    data = good.read_bytes()
    cases = {
        "empty": (b"", "is empty (0 bytes)"),
        "truncated": (data[: len(data) // 2], "probably truncated or corrupt"),
        "garbage": (b"this is not a checkpoint at all" * 10, "probably truncated or corrupt"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(content)
        with pytest.raises(CraterlabError) as err:
            read_checkpoint(path)
        msg = str(err.value)
        assert f"Checkpoint {path}" in msg and expected in msg, (name, msg)
        assert "\n" not in msg  # one paragraph


def test_checkpoint_that_is_not_a_mapping(tmp_path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CraterlabError, match=r"list.pth holds a list, not a mapping"):
        read_checkpoint(path)
    torch.save({"epoch": 3, "note": "no tensors"}, path)
    model = timm.create_model("test_vit", num_classes=0)
    with pytest.raises(CraterlabError, match=r"checkpoint .*list.pth holds no tensors"):
        load_checkpoint_into(model, path)
