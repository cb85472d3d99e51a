"""Backbones: every conf/backbone/*.yaml builds with random weights (no downloads), gives the
right token, attention and grid shapes, and the attention is the last block's CLS->patch
softmax averaged over heads; weights fall back / fail loudly offline."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image

from craterlab import devices, precision_probe
from craterlab.backbones import TimmViT, timm_cnn, timm_vit
from craterlab.devices import autocast, compute_dtype, cpu_flags_from_cpuinfo, resolve_precision
from craterlab.errors import ConfigError, CraterlabError
from craterlab.plugins import get_registry
from craterlab.types import ImageRecord

CONF = Path(__file__).resolve().parent.parent / "conf" / "backbone"
CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml"))

# Tokens per image and dim each config must give (the study's table).
EXPECTED = {
    "dino_s16": (196, 384), "dino_s8": (784, 384), "dino_b16": (196, 768), "dino_b8": (784, 768),
    "dinov2_s14": (256, 384), "dinov2_b14": (256, 768),
    "dinov3_s16": (256, 384), "dinov3_b16": (256, 768),
    "dinov3_l16_lvd": (256, 1024), "dinov3_l16_sat": (256, 1024),
    "dinov3_7b16_lvd": (256, 4096), "dinov3_7b16_sat": (256, 4096),
    "mae_b16": (196, 768), "clip_b16": (196, 768), "augreg_s16": (196, 384),
    "vit_b16": (196, 768), "deit_s16": (196, 384), "deit_b16": (196, 768),
    "deit3_s16": (196, 384), "deit3_b16": (196, 768),
    "marsdino_s": (196, 384), "marsdino_b": (196, 768),
    "resnet18": (49, 512), "resnet50": (49, 2048), "resnet101": (49, 2048),
    "convnext_t": (49, 768), "efficientnet_b0": (49, 1280), "densenet121": (49, 1024),
    "vgg16": (49, 512), "mobilenetv3_l": (49, 960),
}  # fmt: skip

# Really instantiated (seeded random init + forward) in the default test run: one small model
# per code path (timm ViT, ViT at another image size, Eva with registers, the MarsDINO factory,
# a CNN). The others of the same classes and the base-size models take seconds each on 2 cores
# (slow marker); ViT-L and 7B are only checked on the meta device (architecture, shapes).
REAL_FAST = ["dino_s16", "dinov2_s14", "dinov3_s16", "marsdino_s", "resnet18"]
META_ONLY = {"dinov3_l16_lvd", "dinov3_l16_sat", "dinov3_7b16_lvd", "dinov3_7b16_sat"}
REAL_SLOW = [c for c in CONFIGS if c not in REAL_FAST and c not in META_ONLY]


def config(name: str, **overrides: object) -> dict:
    cfg = OmegaConf.merge(
        OmegaConf.create({"allow_random_weights": False}),
        {"backbone": OmegaConf.load(CONF / f"{name}.yaml")},
    )
    node = OmegaConf.to_container(cfg, resolve=True)["backbone"]
    # fp32: these tests compare against fp32 references recomputed by hand
    node.update({"weights": "random", "precision": "fp32", **overrides})
    return node


def test_every_study_backbone_has_a_config() -> None:
    assert sorted(EXPECTED) == CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_config_names_a_real_timm_model_and_tag(name: str) -> None:
    raw = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    assert raw["name"] in ("timm_vit", "timm_cnn", "marsdino")
    if raw["name"] != "marsdino":
        assert timm.is_model(raw["model"]), raw["model"]
        full = f"{raw['model']}.{raw['pretrained_tag']}"
        assert timm.list_pretrained(full) == [full]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_shapes_on_meta_device(name: str) -> None:
    """Every config (7B included) builds and runs on the meta device: no memory, no compute."""
    with torch.device("meta"):
        backbone = get_registry().build("backbone", config(name))
        size = backbone.data_config["input_size"]
        feats = backbone.encode(torch.empty(2, *size))
    tokens, dim = EXPECTED[name]
    assert backbone.dim == dim
    assert feats.tokens.shape == (2, tokens, dim)
    assert feats.cls.shape == (2, dim)
    assert feats.grid[0] * feats.grid[1] == tokens
    if backbone.has_attention:
        assert feats.attn is not None and feats.attn.shape == (2, tokens)
    else:
        assert feats.attn is None


def reference_attention(backbone: TimmViT, images: torch.Tensor) -> torch.Tensor:
    """Last-block CLS->patch attention recomputed by hand, head by head."""
    model = backbone.model
    seen = {}
    block = model.blocks[-1]
    hook = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        model.forward_features(images)
        hook.remove()
        x = block.norm1(seen["x"])
        attn = block.attn
        b, n, _ = x.shape
        q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        heads = []
        for h in range(attn.num_heads):
            logits = torch.einsum("bd,bnd->bn", q[:, h, 0, :], k[:, h]) * attn.scale
            heads.append(torch.softmax(logits, dim=-1))
        mean = torch.stack(heads).mean(0)[:, backbone.num_prefix_tokens :]
    return mean / mean.sum(-1, keepdim=True)


def check_real(name: str) -> None:
    backbone = get_registry().build("backbone", config(name))
    assert backbone.weights_status == "random (requested)"
    size = backbone.data_config["input_size"]
    images = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    feats = backbone.encode(images)
    tokens, dim = EXPECTED[name]
    assert feats.tokens.shape == (1, tokens, dim) and feats.cls.shape == (1, dim)
    assert feats.tokens.dtype == torch.float32 and torch.isfinite(feats.tokens).all()
    if backbone.has_attention:
        assert torch.allclose(feats.attn.sum(-1), torch.ones(1), atol=1e-5)
        assert (feats.attn >= 0).all()
        if isinstance(backbone.model, timm.models.VisionTransformer):  # (Eva uses RoPE)
            ref = reference_attention(backbone, images)
            assert torch.allclose(feats.attn, ref, atol=1e-5)
        # CLS = the final-norm'ed class token; register/prefix tokens are dropped
        with torch.no_grad():
            out = backbone.model.forward_features(images)
        assert torch.allclose(feats.cls, out[:, 0], atol=1e-5)
        assert torch.allclose(feats.tokens, out[:, backbone.num_prefix_tokens :], atol=1e-5)
    else:
        with torch.no_grad():
            fmap = backbone.model.forward_features(images)
        ref = fmap.flatten(2).transpose(1, 2)
        assert torch.allclose(feats.tokens, ref, atol=1e-5)
        assert torch.allclose(feats.cls, ref.mean(1), atol=1e-5)


@pytest.mark.parametrize("name", REAL_FAST)
def test_config_real_forward(name: str) -> None:
    check_real(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_SLOW)
def test_config_real_forward_base_models(name: str) -> None:
    check_real(name)


def test_random_weights_are_seeded() -> None:
    a = timm_vit("test_vit", "r160_in1k", weights="random", seed=3)
    b = timm_vit("test_vit", "r160_in1k", weights="random", seed=3)
    c = timm_vit("test_vit", "r160_in1k", weights="random", seed=4)
    pa, pb, pc = (next(iter(x.model.parameters())) for x in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.identity() == b.identity() != c.identity()


@pytest.mark.parametrize(
    ("factory", "model", "tag"),
    [(timm_vit, "test_vit", "r160_in1k"), (timm_cnn, "resnet18", None)],
)
def test_random_weights_are_made_on_first_use_equal_to_eager_ones(factory, model, tag) -> None:
    """A seeded random backbone builds its weights only when first used (a run whose features
    are cached never pays the init), and they equal timm's eager model under the same seed."""
    lazy = factory(model, tag, weights="random", seed=3, precision="fp32")
    identity, dim, grid = lazy.identity(), lazy.dim, lazy.grid
    assert not lazy.materialized
    assert next(lazy._model.parameters()).is_meta  # the architecture only, no memory
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        name = f"{model}.{tag}" if tag else model
        eager = timm.create_model(name, pretrained=False, num_classes=0).eval()
    size = lazy.data_config["input_size"]
    images = torch.randn(2, *size)
    feats = lazy.encode(images)
    assert lazy.materialized and lazy.identity() == identity
    assert (lazy.dim, lazy.grid) == (dim, grid)
    with torch.inference_mode():
        ref = eager.forward_features(images)
    if factory is timm_vit:
        ref = ref[:, eager.num_prefix_tokens :]
    else:
        ref = ref.flatten(2).transpose(1, 2)
    # (the ViT's last block computes attention explicitly to read it: equal up to rounding)
    assert torch.allclose(feats.tokens, ref.float(), atol=1e-5)
    assert all(
        torch.equal(a, b)
        for a, b in zip(lazy.model.state_dict().values(), eager.state_dict().values(), strict=True)
    )


class FourImages:
    """Four deterministic grey 40x40 crops."""

    name = "four"

    def records(self, split: str) -> list[ImageRecord]:
        return [ImageRecord(f"{split}-{i}", i) for i in range(4)]

    def load_image(self, record: ImageRecord) -> Image.Image:
        rng = np.random.default_rng(record.crater_id)
        return Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).convert("RGB")

    def identity(self) -> str:
        return "four-v1"


def test_a_cache_hit_never_makes_the_random_weights(tmp_path: Path) -> None:
    from craterlab.backbones.extract import extract_features

    def extract(backbone: TimmViT) -> tuple:
        return extract_features(
            backbone, FourImages(), "gallery", device="cpu", cache_dir=tmp_path, progress=False
        )

    first, info = extract(timm_vit("test_vit", "r160_in1k", weights="random", precision="fp32"))
    assert not info.cache_hit
    again = timm_vit("test_vit", "r160_in1k", weights="random", precision="fp32")
    second, info = extract(again)
    assert info.cache_hit and not again.materialized
    assert torch.equal(first.tokens, second.tokens)


def test_transform_follows_pretrained_config() -> None:
    from PIL import Image

    dino = timm_vit("vit_small_patch16_224", "dino", weights="random")
    with torch.device("meta"):  # only CLIP's config is read: no weights needed
        clip = timm_vit("vit_base_patch16_clip_224", "openai", weights="random")
    assert dino.data_config["interpolation"] == "bicubic"
    assert dino.data_config["crop_pct"] == 0.9
    image = Image.new("RGB", (300, 200), (255, 0, 0))
    x = dino.transform(image)
    assert x.shape == (3, 224, 224)
    mean, std = dino.data_config["mean"], dino.data_config["std"]
    assert torch.allclose(x[0], torch.full((224, 224), (1 - mean[0]) / std[0]), atol=1e-4)
    assert clip.data_config["mean"] != dino.data_config["mean"]  # CLIP's own normalization
    assert dino.transform(Image.new("L", (50, 50))).shape == (3, 224, 224)


def test_forward_features_has_gradients() -> None:
    backbone = timm_vit("test_vit", "r160_in1k", weights="random")
    backbone.model.requires_grad_(True)
    feats = backbone.forward_features(torch.randn(1, 3, 160, 160))
    (feats.cls.sum() + feats.attn[:, 0].sum()).backward()
    assert backbone.model.blocks[0].attn.qkv.weight.grad is not None
    with torch.no_grad():
        assert not backbone.encode(torch.randn(1, 3, 160, 160)).cls.requires_grad


# --------------------------------------------------------------------------- weights


def test_offline_pretrained_fails_fast_with_the_fix(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(CraterlabError, match="allow_random_weights=true"):
        timm_vit("vit_small_patch16_224", "dino")
    assert time.perf_counter() - t0 < 10


def test_unreachable_hub_without_offline_flag_fails_fast(monkeypatch, tmp_path) -> None:
    from craterlab.backbones import weights

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.setattr(weights, "_REACHABLE", {})
    t0 = time.perf_counter()
    backbone = timm_vit("test_vit", "r160_in1k", allow_random_weights=True)
    assert time.perf_counter() - t0 < 15
    assert backbone.weights_status.startswith("random (fallback: pretrained weights for")
    assert "127.0.0.1" in backbone.weights_status


def test_fallback_to_random_is_loud(monkeypatch, caplog) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = timm_vit("test_vit", "r160_in1k", allow_random_weights=True)
    assert backbone.weights_status.startswith("random (fallback")
    assert any("RANDOM WEIGHTS" in r.message and r.levelname == "WARNING" for r in caplog.records)
    assert backbone.identity()["weights"] == {"weights": "random", "seed": 0}


def test_pretrained_weights_load_from_the_local_hub_cache(monkeypatch, tmp_path) -> None:
    """Weights already in the HF cache load offline, without any request."""
    import huggingface_hub.constants as hc
    from safetensors.torch import save_file

    source = timm.create_model("test_vit.r160_in1k", pretrained=False, num_classes=0)
    rev = "a" * 40
    repo = tmp_path / "models--timm--test_vit.r160_in1k"
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    save_file(source.state_dict(), repo / "snapshots" / rev / "model.safetensors")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = timm_vit("test_vit", "r160_in1k")
    assert backbone.weights_status == "pretrained"
    for (k, v), (k2, v2) in zip(
        backbone.model.state_dict().items(), source.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)


def dino_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> None:
    """A DINO-style training checkpoint: teacher/student, module.backbone. prefixes, head."""
    teacher = {f"module.backbone.{k}": v.clone() for k, v in state.items()}
    teacher["module.head.mlp.0.weight"] = torch.randn(16, 384)
    teacher["module.head.last_layer.weight_g"] = torch.ones(1, 16)
    student = {k: torch.zeros_like(v) for k, v in teacher.items()}
    torch.save({"teacher": teacher, "student": student, "epoch": 3}, path)


@pytest.fixture(scope="module")
def vit_s_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return timm.create_model("vit_small_patch16_224", num_classes=0).state_dict()


def test_marsdino_loads_a_dino_checkpoint(tmp_path, vit_s_state) -> None:
    path = tmp_path / "marsdino_s.pth"
    dino_checkpoint(path, vit_s_state)
    backbone = get_registry().build(
        "backbone", {"name": "marsdino", "size": "s", "weights": str(path)}
    )
    assert backbone.weights_status == f"checkpoint:{path}"
    state = backbone.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in vit_s_state.items())
    ident = backbone.identity()["weights"]
    assert ident["weights"] == "checkpoint" and len(ident["sha256"]) == 64
    student = get_registry().build(
        "backbone", {"name": "marsdino", "weights": str(path), "checkpoint_key": "student"}
    )
    assert torch.count_nonzero(student.model.blocks[0].attn.qkv.weight) == 0
    assert student.identity() != backbone.identity()


@pytest.fixture(scope="module")
def test_vit_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return timm.create_model("test_vit", num_classes=0).state_dict()


def test_checkpoint_that_does_not_fit_is_refused(tmp_path, test_vit_state) -> None:
    """The checkpoint checks are architecture-independent: a tiny ViT keeps the files small."""

    def build(path: Path) -> None:
        get_registry().build(
            "backbone", {"name": "timm_vit", "model": "test_vit", "weights": str(path)}
        )

    bad = dict(test_vit_state)
    bad["blocks.3.mlp.fc1.weight"] = torch.randn(100, 64)  # one mismatched tensor
    dino_checkpoint(tmp_path / "bad.pth", bad)
    with pytest.raises(CraterlabError, match=r"shape mismatch in blocks.3.mlp.fc1.weight") as err:
        build(tmp_path / "bad.pth")
    assert "does not fit test_vit" in str(err.value)
    patch8 = dict(test_vit_state)
    patch8["patch_embed.proj.weight"] = torch.randn(64, 3, 8, 8)  # another patch size
    dino_checkpoint(tmp_path / "p8.pth", patch8)
    with pytest.raises(CraterlabError, match="patch_embed.proj.weight"):
        build(tmp_path / "p8.pth")
    missing = {k: v for k, v in test_vit_state.items() if not k.startswith("blocks.5.")}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(CraterlabError, match=r"missing key\(s\) \(e.g. blocks.5"):
        build(tmp_path / "missing.pth")
    with pytest.raises(CraterlabError, match="does not exist") as err:
        get_registry().build("backbone", {"name": "marsdino", "weights": str(tmp_path / "nope")})
    assert "marsdino_s" in str(err.value)


def test_marsdino_without_weights(monkeypatch) -> None:
    with pytest.raises(CraterlabError, match="not on a public hub"):
        get_registry().build("backbone", {"name": "marsdino", "size": "s"})
    backbone = get_registry().build(
        "backbone", {"name": "marsdino", "size": "s", "allow_random_weights": True}
    )
    assert backbone.weights_status.startswith("random (fallback")


def test_invalid_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="timm has no model"):
        get_registry().build("backbone", {"name": "timm_vit", "model": "vit_smal_patch16_224"})
    with pytest.raises(ConfigError, match="precision"):
        get_registry().build(
            "backbone", {"name": "timm_vit", "model": "vit_small_patch16_224", "precision": "x"}
        )
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, fp16"):
        timm_vit("test_vit", weights="random", precision="f32")


# --------------------------------------------------------------------------- precision

AMX = frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"})
AVX512_ONLY = frozenset({"avx512f", "avx512_bf16"})  # bf16 instructions, no matrix units
NO_BF16 = frozenset({"avx512f", "avx2"})


@pytest.fixture
def probe_says(monkeypatch):
    """Make the bf16 probe measure given (fp32 ms, bf16 ms) instead of timing this machine."""

    def set_times(fp32_ms: float, bf16_ms: float) -> None:
        monkeypatch.setattr(precision_probe, "measure", lambda: (fp32_ms, bf16_ms))
        precision_probe._cached_probe.cache_clear()

    yield set_times
    precision_probe._cached_probe.cache_clear()


def test_auto_precision_is_bf16_only_where_the_probe_measured_it_faster(
    probe_says, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("CRATERLAB_PROBE_CACHE", str(tmp_path / "probe.json"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    probe_says(20.0, 10.0)  # bf16 2x faster
    assert resolve_precision("auto", cpu, AMX) == "bf16"
    assert resolve_precision("auto", cpu, AVX512_ONLY) == "bf16"  # no AMX, still measured faster
    assert resolve_precision("auto", cpu, frozenset()) == "fp32"  # no bf16 arithmetic at all
    assert resolve_precision("auto", cpu, NO_BF16) == "fp32"
    assert resolve_precision("auto", cuda, frozenset()) == "bf16"
    probe_says(10.0, 9.5)  # bf16 barely faster: not worth its rounding
    monkeypatch.setenv("CRATERLAB_PROBE_CACHE", str(tmp_path / "other.json"))
    assert resolve_precision("auto", cpu, AVX512_ONLY) == "fp32"
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_precision(explicit, cpu, AMX) == explicit
        assert resolve_precision(explicit, cpu, NO_BF16) == explicit


def test_autocast_and_compute_dtype_follow_the_device() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    cpu = torch.device("cpu")
    with autocast("fp32", cpu):
        assert (a @ b).dtype == torch.float32
    with autocast("bf16", cpu):
        assert (a @ b).dtype == torch.bfloat16
    assert compute_dtype(cpu) == torch.float32
    assert compute_dtype(torch.device("cuda")) == torch.float16  # tensor cores


def test_cpu_flags_come_from_cpuinfo() -> None:
    text = "processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n"
    assert cpu_flags_from_cpuinfo(text) == {"fpu", "avx512f", "amx_bf16", "amx_tile"}
    assert cpu_flags_from_cpuinfo("model name\t: some cpu\n") == frozenset()


def test_identity_names_the_precision_actually_used(monkeypatch, probe_says, tmp_path) -> None:
    """The feature cache hashes identity(): bf16 and fp32 features never share an entry."""
    monkeypatch.setenv("CRATERLAB_PROBE_CACHE", str(tmp_path / "probe.json"))
    probe_says(20.0, 10.0)
    backbone = timm_vit("test_vit", "r160_in1k", weights="random")  # precision=auto
    monkeypatch.setattr(devices, "cpu_flags", lambda: AVX512_ONLY)
    with_bf16 = backbone.identity()
    monkeypatch.setattr(devices, "cpu_flags", lambda: NO_BF16)
    without = backbone.identity()
    assert with_bf16["precision"] == "bf16" and without["precision"] == "fp32"
    fp32 = timm_vit("test_vit", "r160_in1k", weights="random", precision="fp32")
    assert fp32.identity() == without != with_bf16


@pytest.mark.parametrize("factory", [timm_vit, timm_cnn])
def test_bf16_autocast_on_cpu_stays_close_to_fp32(factory) -> None:
    model = "test_vit" if factory is timm_vit else "test_resnet"
    fp32 = factory(model, "r160_in1k", weights="random", precision="fp32")
    bf16 = factory(model, "r160_in1k", weights="random", precision="bf16")
    images = torch.randn(3, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    a, b = fp32.encode(images), bf16.encode(images)
    assert b.tokens.dtype == b.cls.dtype == torch.float32  # outputs are upcast
    assert not torch.equal(a.tokens, b.tokens)  # the forward really ran in bf16
    cos = torch.nn.functional.cosine_similarity(a.tokens, b.tokens, dim=-1)
    assert cos.min() > 0.99, cos.min()
    if bf16.has_attention:
        torch.testing.assert_close(b.attn.sum(-1), torch.ones(3))
        assert (a.attn - b.attn).abs().max() < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_matches_cpu() -> None:
    backbone = timm_vit("vit_small_patch16_224", "dino", weights="random")
    images = torch.randn(4, 3, 224, 224)
    cpu = backbone.encode(images)
    gpu = backbone.to("cuda").encode(images.cuda())
    assert backbone.identity()["precision"] == "bf16"
    assert gpu.tokens.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(cpu.tokens, gpu.tokens.cpu(), dim=-1)
    assert cos.min() > 0.98
    assert torch.allclose(gpu.attn.sum(-1).cpu(), torch.ones(4), atol=1e-4)
