"""Class counts and the constants of class-rebalanced sampling (``gan.class-target``).

A site's ``class.<c>.n`` are counts of its validation labels: additive sums (the server
adds them up), outside epsilon like every task's validation metrics. A class with fewer
than ``gan.min-group-size`` (k) validation images at the site is not sent, with
complementary suppression (the withheld classes hold >= k images together, so the
validation count minus the sent counts never isolates a small class). Rebalancing itself
is post-processing of the released generator.
"""

from __future__ import annotations

import numpy as np
import torch

from common.metrics.fairness import suppressed_groups

# Class-rebalanced sampling (gan.class-target): every conditioning label keeps at
# least this share of its even share of the samples, so no class vanishes from TSTR's data,
# and the label mix leaves the target only where each unit of shift buys >= SHIFT_COST
# units of class TV (a generator that ignores its labels is not skewed for nothing).
MIN_LABEL_SHARE = 0.2
SHIFT_COST = 0.5
# Latent seeds: the calibration batch (where each label lands) is never the evaluated one.
CALIBRATION_SEED, EVAL_SEED = 1111, 4321


def class_counts(labels: torch.Tensor | None, num_classes: int, min_group_size: int = 1) -> dict[str, float]:
    """``class.<c>.n`` per class: what a site sends for the real class distribution.

    Classes under ``min_group_size`` images are withheld with complementary suppression.
    An empty class counts as small (telling 0 from 1 image apart is what suppression is
    for); with ``min_group_size = 1`` nothing is withheld, zeros included.
    """
    if labels is None:
        return {}
    counts = np.bincount(labels.cpu().numpy(), minlength=num_classes)[:num_classes]
    sizes = {str(c): float(v) for c, v in enumerate(counts)}
    hidden = suppressed_groups(sizes, min_group_size) if min_group_size > 1 else set()
    return {f"class.{c}.n": float(v) for c, v in enumerate(counts) if str(c) not in hidden}


def counts_vector(sums: dict[str, float], num_classes: int) -> np.ndarray:
    # >= 0: under metrics.dp the counts are noisy and can come out negative (post-processing).
    return np.maximum(np.array([sums.get(f"class.{c}.n", 0.0) for c in range(num_classes)]), 0.0)


def is_class_count(key: str) -> bool:
    return key.startswith("class.") and key.endswith(".n")
