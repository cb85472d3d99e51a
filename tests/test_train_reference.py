"""Our losses and P x K sampler against pytorch-metric-learning (a test-only dependency).

Where the definitions match, values and gradients agree to 1e-5 on random embeddings and
labels. Where ours differ on purpose, the test pins the difference:

- batch-hard triplet: ours averages over every anchor that has a positive and a negative
  (Hermans et al. 2017); PML's default ``AvgNonZeroReducer`` averages only the triplets that
  still violate the margin, so its loss does not shrink as the batch gets easier. With PML's
  ``MeanReducer`` the two agree.
- P x K batches: ours visits the classes in shuffled rounds, so over many batches every class
  is drawn equally often (within one); ``MPerClassSampler`` draws the classes of each batch
  independently, so some classes are seen much more often than others. A class with fewer
  than K images gives all of them before repeating one; MPerClassSampler draws such a class
  with replacement.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from craterlab.train.losses import ArcFaceLoss, BatchHardTripletLoss, SupConLoss
from craterlab.train.sampling import pk_batches

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_samplers = pytest.importorskip("pytorch_metric_learning.samplers")
pml_common = pytest.importorskip("pytorch_metric_learning.utils.common_functions")

TOL = 1e-5


def random_batch(seed: int, n: int = 24, dim: int = 16, classes: int = 6):
    """Random embeddings (unnormalized) and labels, including a singleton class."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[0] = classes  # an anchor with no positive: both implementations skip it
    return emb, labels


def value_and_grad(loss_fn, emb: torch.Tensor, *args) -> tuple[float, torch.Tensor]:
    x = emb.clone().requires_grad_(True)
    loss = loss_fn(x, *args)
    loss.backward()
    return loss.item(), x.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
def test_supcon_equals_pml_supconloss(seed, temperature):
    emb, labels = random_batch(seed)
    ours, g_ours = value_and_grad(SupConLoss(temperature), emb, labels)
    ref, g_ref = value_and_grad(pml_losses.SupConLoss(temperature=temperature), emb, labels)
    assert ours == pytest.approx(ref, abs=TOL, rel=TOL)
    assert torch.allclose(g_ours, g_ref, atol=TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("scale", "margin"), [(64.0, 0.5), (16.0, 0.3), (30.0, 0.0)])
def test_arcface_equals_pml_arcfaceloss(seed, scale, margin):
    emb, labels = random_batch(seed, classes=7)
    n_classes, dim = int(labels.max()) + 1, emb.shape[1]
    ours = ArcFaceLoss(scale=scale, margin=margin, num_classes=n_classes, dim=dim)
    # PML's margin is in degrees and its class matrix is (dim, classes): same weights, moved.
    ref = pml_losses.ArcFaceLoss(n_classes, dim, margin=math.degrees(margin), scale=scale)
    with torch.no_grad():
        ref.W.copy_(ours.weight.detach().T)
    v_ours, g_ours = value_and_grad(ours, emb, labels)
    v_ref, g_ref = value_and_grad(ref, emb, labels)
    assert v_ours == pytest.approx(v_ref, abs=TOL, rel=TOL)
    assert torch.allclose(g_ours, g_ref, atol=TOL)


def test_arcface_past_pi_minus_margin_uses_the_same_fallback_as_pml():
    # An embedding opposite its class centre (theta near pi): both use cos(theta) - m sin(m).
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    emb = torch.tensor([[-1.0, 0.05], [0.3, 1.0]])
    labels = torch.tensor([0, 1])
    ours = ArcFaceLoss(scale=8.0, margin=0.5, num_classes=2, dim=2)
    ref = pml_losses.ArcFaceLoss(2, 2, margin=math.degrees(0.5), scale=8.0)
    with torch.no_grad():
        ours.weight.copy_(weight)
        ref.W.copy_(weight.T)
    assert ours(emb, labels).item() == pytest.approx(ref(emb, labels).item(), abs=TOL)


def pml_batch_hard(emb, labels, *, margin, reducer=None, smooth=False):
    kwargs = {"reducer": reducer} if reducer is not None else {}
    loss = pml_losses.TripletMarginLoss(margin=margin, smooth_loss=smooth, **kwargs)
    return loss(emb, labels, pml_miners.BatchHardMiner()(emb, labels))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("margin", [0.05, 0.2, 1.0])
def test_batch_hard_triplet_equals_pml_with_a_mean_reducer(seed, margin):
    emb, labels = random_batch(seed)
    ours, g_ours = value_and_grad(BatchHardTripletLoss(margin), emb, labels)
    ref, g_ref = value_and_grad(
        lambda x, y: pml_batch_hard(x, y, margin=margin, reducer=pml_reducers.MeanReducer()),
        emb,
        labels,
    )
    assert ours == pytest.approx(ref, abs=TOL, rel=TOL)
    assert torch.allclose(g_ours, g_ref, atol=TOL)


def test_soft_margin_triplet_equals_pml_smooth_loss_at_zero_margin():
    emb, labels = random_batch(5)
    ours = BatchHardTripletLoss(margin=0.0, soft=True)(emb, labels).item()
    ref = pml_batch_hard(
        emb, labels, margin=0.0, smooth=True, reducer=pml_reducers.MeanReducer()
    ).item()
    assert ours == pytest.approx(ref, abs=TOL)


def test_triplet_differs_from_pml_default_by_averaging_over_every_valid_anchor():
    # Well-separated classes: most anchors satisfy the margin. PML's default reducer averages
    # only the violating triplets; ours averages over all valid anchors (zeros included).
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(4).repeat_interleave(5)
    emb = centres[labels] + torch.randn(20, 16, generator=g) * 1.5
    margin = 0.3
    z = torch.nn.functional.normalize(emb, dim=-1)
    dist = torch.cdist(z, z)
    same = labels[:, None] == labels[None, :]
    pos = dist.masked_fill(~same | torch.eye(20, dtype=torch.bool), -math.inf).amax(1)
    neg = dist.masked_fill(same, math.inf).amin(1)
    per_anchor = torch.relu(pos - neg + margin)
    nonzero = int((per_anchor > 0).sum())
    assert 0 < nonzero < 20  # the case where the two reductions differ

    ours = BatchHardTripletLoss(margin)(emb, labels).item()
    pml_default = pml_batch_hard(emb, labels, margin=margin).item()
    assert ours == pytest.approx(per_anchor.mean().item(), abs=TOL)
    assert pml_default == pytest.approx(per_anchor.sum().item() / nonzero, abs=TOL)
    assert pml_default == pytest.approx(ours * 20 / nonzero, abs=TOL)
    assert pml_default > ours


# --------------------------------------------------------------------------- P x K sampler


def pml_batches(labels, m, batch_size, n_batches, seed):
    pml_common.NUMPY_RANDOM = np.random.RandomState(seed)
    try:
        sampler = pml_samplers.MPerClassSampler(
            labels, m=m, batch_size=batch_size, length_before_new_iter=batch_size * n_batches
        )
        flat = list(iter(sampler))
    finally:
        pml_common.NUMPY_RANDOM = np.random
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def check_pk_structure(batches, labels, p, k, small_classes_use_every_image):
    """Every batch: p distinct classes x k images; images distinct within a class that has
    at least k of them, repeated only for smaller classes (whose every image ours uses, where
    MPerClassSampler draws with replacement and may repeat one image k times)."""
    sizes = Counter(labels)
    for batch in batches:
        assert len(batch) == p * k
        per_class = Counter(labels[i] for i in batch)
        assert len(per_class) == p and set(per_class.values()) == {k}
        for c in per_class:
            images = [i for i in batch if labels[i] == c]
            if sizes[c] >= k:
                assert len(set(images)) == k
            elif small_classes_use_every_image:
                assert len(set(images)) == sizes[c]


def test_pk_batches_have_mperclasssampler_batch_semantics():
    # 10 classes of 3..8 images and one of 2 (fewer than K: both samplers repeat its images).
    sizes = [3, 4, 5, 6, 7, 8, 4, 5, 6, 2]
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    p, k, n = 4, 3, 60
    check_pk_structure(pk_batches(labels, p, k, n, seed=0), labels, p, k, True)
    check_pk_structure(pml_batches(labels, k, p * k, n, seed=0), labels, p, k, False)


def test_pk_batches_cover_classes_evenly_where_mperclasssampler_does_not():
    labels = [c for c in range(10) for _ in range(4)]
    p, k, n = 4, 2, 50  # 200 class draws over 10 classes: 20 each when even
    ours = Counter(labels[i] for batch in pk_batches(labels, p, k, n, 0) for i in batch[::k])
    theirs = Counter(labels[i] for batch in pml_batches(labels, k, p * k, n, 0) for i in batch[::k])
    assert sum(ours.values()) == sum(theirs.values()) == p * n
    assert max(ours.values()) - min(ours.values()) <= 1
    assert max(theirs.values()) - min(theirs.values()) > 1
