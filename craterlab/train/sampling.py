"""P x K class-balanced batches: P identities, K images each (what SupCon and triplet need)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence


def pk_batches(
    labels: Sequence[int],
    classes_per_batch: int,
    images_per_class: int,
    num_batches: int,
    seed: str | int,
) -> list[list[int]]:
    """``num_batches`` batches of indices into ``labels``, each P classes x K images.

    Classes are visited in shuffled rounds (no class twice in a batch); each class's images are
    drawn from a reshuffled queue, so an epoch covers the images evenly; a class with at least K
    images has K distinct ones in every batch, one with fewer repeats some (their augmentations
    differ). P is capped at the number of
    classes. Deterministic in ``seed`` (a per-epoch seed makes resuming exact).
    """
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[int(label)].append(i)
    classes = sorted(by_class)
    p = min(classes_per_batch, len(classes))
    image_queues: dict[int, list[int]] = {c: [] for c in classes}
    class_queue: list[int] = []

    def draw_images(c: int) -> list[int]:
        out: list[int] = []
        while len(out) < images_per_class:
            if not image_queues[c]:
                fresh = rng.sample(by_class[c], len(by_class[c]))
                # Images already in this batch are popped last: a class with >= K images
                # never repeats one within a batch (MPerClassSampler's guarantee).
                image_queues[c] = [i for i in fresh if i in out] + [
                    i for i in fresh if i not in out
                ]
            out.append(image_queues[c].pop())
        return out

    batches = []
    for _ in range(num_batches):
        while len(set(class_queue)) < p:  # a new shuffled round of every class
            class_queue += rng.sample(classes, len(classes))
        chosen: list[int] = []
        rest: list[int] = []
        for c in class_queue:  # first p distinct; a repeat waits for the next batch
            (chosen if len(chosen) < p and c not in chosen else rest).append(c)
        class_queue = rest
        batches.append([i for c in chosen for i in draw_images(c)])
    return batches
