"""Metric-learning losses against loop-based computations of their definitions, plus limits."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from craterlab import train
from craterlab.errors import ConfigError
from craterlab.registry import Registry
from craterlab.train.losses import ArcFaceLoss, BatchHardTripletLoss, SupConLoss


@pytest.fixture
def registry() -> Registry:
    """A registry filled only by craterlab.train's own hook (independent of other plugins)."""
    reg = Registry()
    train.register_losses(register=partial(reg.register, "loss"))
    return reg


def batch(seed: int = 0, n_classes: int = 3, per_class: int = 3, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_classes * per_class, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    perm = torch.randperm(len(labels), generator=g)
    return emb[perm], labels[perm]


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- references


def supcon_ref(emb: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    z = [unit(row) for row in emb.tolist()]
    y = labels.tolist()
    losses = []
    for i in range(len(z)):
        pos = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        if not pos:
            continue
        denom = sum(math.exp(dot(z[i], z[a]) / t) for a in range(len(z)) if a != i)
        losses.append(-sum(math.log(math.exp(dot(z[i], z[p]) / t) / denom) for p in pos) / len(pos))
    return sum(losses) / len(losses)


def arcface_ref(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s, m) -> float:
    x = [unit(row) for row in emb.tolist()]
    w = [unit(row) for row in weight.tolist()]
    total = 0.0
    for i, yi in enumerate(labels.tolist()):
        logits = []
        for j in range(len(w)):
            c = dot(x[i], w[j])
            if j == yi:
                theta = math.acos(c)
                c = math.cos(theta + m) if theta + m < math.pi else c - m * math.sin(m)
            logits.append(s * c)
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        total += lse - logits[yi]
    return total / len(x)


def triplet_ref(emb: torch.Tensor, labels: torch.Tensor, margin: float, soft: bool) -> float:
    z = [unit(row) for row in emb.tolist()]
    y = labels.tolist()

    def d(a, b):
        return math.sqrt(sum((u - v) ** 2 for u, v in zip(z[a], z[b], strict=True)))

    losses = []
    for i in range(len(z)):
        pos = [d(i, p) for p in range(len(z)) if p != i and y[p] == y[i]]
        neg = [d(i, n) for n in range(len(z)) if y[n] != y[i]]
        if not pos or not neg:
            continue
        gap = max(pos) - min(neg)
        losses.append(math.log1p(math.exp(gap)) if soft else max(0.0, gap + margin))
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------- definitions


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_supcon_matches_loop(seed, t):
    emb, labels = batch(seed)
    labels[0] = 7  # one anchor without positives: skipped
    got = SupConLoss(temperature=t)(emb, labels)
    assert got.item() == pytest.approx(supcon_ref(emb, labels, t), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("margin", [0.5, 0.2])
def test_arcface_matches_loop(seed, margin):
    emb, labels = batch(seed, n_classes=4)
    loss = ArcFaceLoss(scale=8.0, margin=margin, num_classes=4, dim=emb.shape[1]).double()
    with torch.no_grad():  # put one target class opposite its sample: theta + m > pi branch
        loss.weight[labels[0]] = -emb[0]
    got = loss(emb, labels)
    ref = arcface_ref(emb, loss.weight.detach(), labels, 8.0, margin)
    assert got.item() == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_matches_loop(seed, soft):
    emb, labels = batch(seed)
    labels[0] = 9  # an anchor without positives: skipped
    got = BatchHardTripletLoss(margin=0.3, soft=soft)(emb, labels)
    assert got.item() == pytest.approx(triplet_ref(emb, labels, 0.3, soft), rel=1e-6)


# --------------------------------------------------------------------------- limits


def test_no_pairs_give_a_zero_loss_with_gradients():
    emb = torch.randn(4, 5, requires_grad=True)
    distinct = torch.arange(4)
    same = torch.zeros(4, dtype=torch.long)
    for loss, labels in [
        (SupConLoss(), distinct),
        (BatchHardTripletLoss(), distinct),
        (BatchHardTripletLoss(), same),
    ]:
        out = loss(emb, labels)
        assert out.item() == 0.0
        out.backward()
        assert torch.equal(emb.grad, torch.zeros_like(emb))
        emb.grad = None


def test_supcon_reaches_log_of_positive_count_when_classes_collapse():
    # Each class collapsed onto one axis, classes orthogonal: as t -> 0 every anchor's loss is
    # -log(1 / n_pos) = log(n_pos), the SupCon minimum for that batch.
    per_class, n_classes = 4, 3
    emb = torch.eye(n_classes).repeat_interleave(per_class, dim=0)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    got = SupConLoss(temperature=0.01)(emb, labels)
    assert got.item() == pytest.approx(math.log(per_class - 1), abs=1e-5)


def test_arcface_without_margin_is_scaled_cosine_softmax():
    emb, labels = batch(2, n_classes=4)
    loss = ArcFaceLoss(scale=16.0, margin=0.0, num_classes=4, dim=6).double()
    cos = (
        torch.nn.functional.normalize(emb, dim=-1)
        @ torch.nn.functional.normalize(loss.weight, dim=-1).T
    )
    expected = torch.nn.functional.cross_entropy(16.0 * cos, labels)
    assert loss(emb, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_arcface_margin_raises_the_loss():
    emb, labels = batch(3, n_classes=4)
    plain = ArcFaceLoss(scale=16.0, margin=0.0, num_classes=4, dim=6).double()
    margin = ArcFaceLoss(scale=16.0, margin=0.5, num_classes=4, dim=6).double()
    margin.load_state_dict(plain.state_dict())
    assert margin(emb, labels).item() > plain(emb, labels).item()


def test_arcface_binds_lazily_from_the_first_batch():
    loss = ArcFaceLoss()
    assert not loss.bound and list(loss.parameters()) == []
    emb, labels = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 4, 4])
    loss(emb, labels).backward()
    assert loss.weight.shape == (5, 5) and loss.weight.grad is not None


def test_arcface_rejects_more_identities_than_configured():
    with pytest.raises(ValueError, match="num_classes=3"):
        ArcFaceLoss(num_classes=3).bind(5, 8)
    with pytest.raises(ValueError, match="labels in"):
        ArcFaceLoss(num_classes=3, dim=4)(torch.randn(2, 4), torch.tensor([0, 3]))


def test_triplet_is_zero_when_classes_are_separated_by_the_margin():
    emb = torch.tensor([[1.0, 0.0], [0.99, 0.05], [-1.0, 0.0], [-0.99, 0.05]])
    labels = torch.tensor([0, 0, 1, 1])
    assert BatchHardTripletLoss(margin=0.2)(emb, labels).item() == 0.0


def test_triplet_gradient_is_finite_for_duplicate_embeddings():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    BatchHardTripletLoss()(emb, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize(
    "make", [lambda: SupConLoss(0.1), lambda: ArcFaceLoss(16.0, 0.3), BatchHardTripletLoss]
)
def test_a_few_steps_reduce_the_loss_on_a_toy_problem(make):
    torch.manual_seed(0)
    loss = make()
    emb = torch.nn.Parameter(torch.randn(12, 8))
    labels = torch.arange(4).repeat_interleave(3)
    loss(emb, labels)  # binds arcface's class weights before the optimizer sees them
    opt = torch.optim.Adam([emb, *loss.parameters()], lr=0.05)
    first = None
    for _ in range(30):
        value = loss(emb, labels)
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    assert loss(emb, labels).item() < 0.5 * first


# --------------------------------------------------------------------------- registry


def test_losses_are_registered_with_their_schemas(registry):
    assert registry.names("loss") == ["arcface", "late_interaction", "supcon", "triplet"]
    assert registry.build("loss", {"name": "supcon"}).temperature == 0.1
    arc = registry.build("loss", {"name": "arcface"})
    assert (arc.scale, arc.margin) == (64.0, 0.5)
    assert registry.build("loss", {"name": "triplet", "margin": 0}).margin == 0.0


def test_bad_loss_configs_name_the_fix(registry):
    with pytest.raises(ConfigError, match="Valid keys: temperature"):
        registry.build("loss", {"name": "supcon", "temp": 0.1})
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        registry.build("loss", {"name": "supcon", "temperature": 0.0})
    with pytest.raises(ConfigError, match="margin must be >= 0"):
        registry.build("loss", {"name": "triplet", "margin": -1.0})
