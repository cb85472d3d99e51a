"""Late interaction: the reference math against loops, and every engine and kernel against
the reference (fp32 exactly, bf16/int8 within their rounding)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from craterlab.errors import ConfigError
from craterlab.plugins import get_registry
from craterlab.retrieval import cpu_engine, gather_engine
from craterlab.retrieval.cpu_engine import KERNELS, GalleryCodes, rerank_blocks, run_blocks
from craterlab.retrieval.late_interaction import late_interaction, late_interaction_pairs
from craterlab.retrieval.matchers import Cosine, LateInteraction
from craterlab.testing import random_tokens
from craterlab.types import Tokens

ROOT = Path(__file__).resolve().parents[1]


def li_loops(q: Tokens, g: Tokens) -> torch.Tensor:
    """(1/Kq) sum_i max_j <q_i, g_j> over real tokens, by explicit loops in float64."""
    out = torch.empty(len(q), len(g), dtype=torch.float64)
    for a in range(len(q)):
        qi = [i for i in range(q.vectors.shape[1]) if q.mask is None or q.mask[a, i]]
        for b in range(len(g)):
            gj = [j for j in range(g.vectors.shape[1]) if g.mask is None or g.mask[b, j]]
            if not gj:
                out[a, b] = float("-inf")
                continue
            total = 0.0
            for i in qi:
                total += max(
                    float(torch.dot(q.vectors[a, i].double(), g.vectors[b, j].double())) for j in gj
                )
            out[a, b] = total / max(1, len(qi))
    return out


def masked(t: Tokens, seed: int) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(t.vectors.shape[:2], generator=g) > 0.3
    mask[:, 0] = True
    return Tokens(t.vectors, mask)


def close(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    """Same -inf pattern, finite values within ``atol``."""
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and not got.isnan().any()
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin].double(), want[fin].double(), atol=atol, rtol=0)


@pytest.fixture
def qg() -> tuple[Tokens, Tokens]:
    q = masked(random_tokens(5, 4, 8, seed=1), seed=2)
    g = masked(random_tokens(9, 6, 8, seed=3), seed=4)
    g.mask[3] = False  # an empty gallery item scores -inf
    return q, g


def test_reference_equals_loops_with_masks(qg) -> None:
    q, g = qg
    ref = li_loops(q, g)
    close(late_interaction(Tokens(q.vectors.double(), q.mask), g), ref, 1e-12)
    cand = torch.tensor([[0, 3, 8, -1], [1, 1, 2, 0], [7, 6, 5, 4], [2, 0, 3, 8], [8, 7, 6, -1]])
    want = ref.gather(1, cand.clamp(min=0)).masked_fill(cand < 0, float("-inf"))
    close(late_interaction_pairs(Tokens(q.vectors.double(), q.mask), g, cand), want, 1e-12)


def test_no_mask_equals_all_true_mask() -> None:
    q, g = random_tokens(3, 4, 8, seed=5), random_tokens(6, 5, 8, seed=6)
    q2 = Tokens(q.vectors, torch.ones(3, 4, dtype=torch.bool))
    g2 = Tokens(g.vectors, torch.ones(6, 5, dtype=torch.bool))
    li = LateInteraction("cpu")
    torch.testing.assert_close(li.score(q2, g2), li.score(q, g))
    close(li.score(q, g), li_loops(q, g), 1e-5)


@pytest.mark.parametrize("workers", [1, 2])
def test_fp32_kernel_equals_reference_in_any_blocking(qg, workers: int) -> None:
    """Threaded, buffer-reusing fp32 CPU paths (tiny blocks and tiles) == the definition."""
    q, g = qg
    ref = li_loops(q, g)
    codes = GalleryCodes(g.vectors, None, g.mask)
    for cache in (64, 1 << 20):  # one gallery image per tile, then one tile
        close(cpu_engine.score(KERNELS["fp32"], q, codes, workers, cache), ref, 1e-5)
    cand = torch.tensor([[0, 2, 8, -1], [3, 3, 1, 0], [7, 6, 5, 4], [1, 0, 2, 8], [8, 7, 6, -1]])
    want = ref.gather(1, cand.clamp(min=0)).masked_fill(cand < 0, float("-inf"))
    for block in (1, 2 * 6 * 8 * 4, 1 << 20):  # one candidate, a slice, all in one block
        close(cpu_engine.rerank(KERNELS["fp32"], q, codes, cand, workers, block), want, 1e-5)
    half = GalleryCodes(g.vectors.half(), None, g.mask)  # fp16 rows, upcast per block
    want_half = li_loops(q, Tokens(g.vectors.half().float(), g.mask))
    close(cpu_engine.score(KERNELS["fp32"], q, half, workers), want_half, 1e-5)


@pytest.mark.parametrize("workers", [1, 2])
def test_bf16_kernel_within_bf16_rounding(workers: int) -> None:
    q = masked(random_tokens(6, 8, 64, seed=7), seed=8)
    g = masked(random_tokens(40, 8, 64, seed=9), seed=10)
    ref = li_loops(q, g)
    codes = GalleryCodes(g.vectors, None, g.mask)
    got = cpu_engine.score(KERNELS["bf16"], q, codes, workers, cache_bytes=4096)
    close(got, ref, 0.02)  # unit tokens: |sim| <= 1, bf16 keeps ~3 significant digits
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.8
    cand = torch.arange(40).repeat(6, 1)
    close(cpu_engine.rerank(KERNELS["bf16"], q, codes, cand, workers, 4096), got, 0.0)


def test_gather_engine_equals_reference_tiled(qg) -> None:
    q, g = qg
    ref = li_loops(q, g)
    gather = gather_engine.tokens_gather(g)
    for tile in (64, 1 << 30):
        close(gather_engine.score(q, len(g), gather, torch.device("cpu"), tile), ref, 1e-5)
    cand = torch.tensor([[4, -1], [0, 3], [8, 8], [1, 2], [3, 7]])
    want = ref.gather(1, cand.clamp(min=0)).masked_fill(cand < 0, float("-inf"))
    close(gather_engine.rerank(q, cand, gather, torch.device("cpu"), 1), want, 1e-5)


def test_fp32_kernel_and_gather_engine_agree_bitwise_on_unmasked_data() -> None:
    """Both engines compute fp32 matmuls of the same rows: they agree to float rounding."""
    q, g = random_tokens(7, 5, 32, seed=11), random_tokens(70, 6, 32, seed=12)
    fast = LateInteraction("cpu").score(q, g)
    slow = gather_engine.score(q, len(g), gather_engine.tokens_gather(g), torch.device("cpu"))
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)


def test_cosine_single_vectors_and_pooled_tokens() -> None:
    q, g = random_tokens(3, 1, 8, seed=17), random_tokens(4, 1, 8, seed=18)
    ref = q.vectors[:, 0] @ g.vectors[:, 0].T
    torch.testing.assert_close(Cosine("cpu").score(q, g), ref)
    cand = torch.tensor([[3, 1], [0, 0], [2, 3]])
    torch.testing.assert_close(Cosine("cpu").rerank(q, g, cand), ref.gather(1, cand))
    gk = Tokens(random_tokens(4, 3, 8, seed=19).vectors, torch.tensor([[1, 1, 0]] * 4).bool())
    pooled = torch.nn.functional.normalize(gk.vectors[:, :2].mean(1), dim=-1)
    torch.testing.assert_close(Cosine("cpu").score(q, gk), q.vectors[:, 0] @ pooled.T)


def test_registry_builds_matchers_and_rejects_bad_values() -> None:
    reg = get_registry()
    li = reg.build("matcher", {"name": "late_interaction", "kernel": "bf16"})
    assert isinstance(li, LateInteraction) and li.kernel == "bf16"
    assert isinstance(reg.build("matcher", {"name": "cosine", "device": "cpu"}), Cosine)
    with pytest.raises(ConfigError, match="tile_mb"):
        reg.build("matcher", {"name": "late_interaction", "tile_mb": 0})
    with pytest.raises(ConfigError, match="device"):
        reg.build("matcher", {"name": "late_interaction", "device": "tpu"})
    with pytest.raises(ConfigError, match="kernel"):
        reg.build("matcher", {"name": "late_interaction", "kernel": "fp8"})


def test_int8_kernel_on_a_float_store_says_what_to_do() -> None:
    q, g = random_tokens(2, 3, 8, seed=1), random_tokens(4, 3, 8, seed=2)
    with pytest.raises(ConfigError, match="quantizer=int8"):
        LateInteraction("cpu", kernel="int8").score(q, g)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    q, g = random_tokens(8, 4, 32, seed=20), random_tokens(40, 6, 32, seed=21)
    cpu = LateInteraction("cpu").score(q, g)
    gpu = LateInteraction("cuda").score(q, g)
    torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=0)


def test_run_blocks_runs_every_block_and_restores_threads() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    run_blocks(seen.append, 7, workers=2)
    assert sorted(seen) == list(range(7))
    assert torch.get_num_threads() == before
    with pytest.raises(ZeroDivisionError):  # a worker's error reaches the caller
        run_blocks(lambda b: 1 // (b - 3), 5, workers=2)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("nq", "s", "block_bytes"), [(7, 5, 64), (3, 50, 64), (4, 9, 10**6)])
def test_rerank_blocks_cover_every_pair_once_within_budget(nq, s, block_bytes) -> None:
    candidate_bytes = 8
    nblocks, bounds = rerank_blocks(nq, s, candidate_bytes, block_bytes)
    seen = torch.zeros(nq, s, dtype=torch.int64)
    for b in range(nblocks):
        q0, q1, c0, c1 = bounds(b)
        seen[q0:q1, c0:c1] += 1
        assert (q1 - q0) * (c1 - c0) * candidate_bytes <= max(block_bytes, candidate_bytes)
    assert (seen == 1).all()


def test_no_module_imports_another_modules_private_names() -> None:
    """``from craterlab.x import _name`` crosses a module's boundary: nowhere in craterlab."""
    offenders = []
    for path in (ROOT / "craterlab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("craterlab"):
                offenders += [
                    f"{path.relative_to(ROOT)}: {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and a.name != "__version__"
                ]
    assert offenders == []
