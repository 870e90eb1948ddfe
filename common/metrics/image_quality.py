"""Sample-quality metrics for image generators that need no downloads.

* An **evaluation classifier** (a small MLP) trained once on the server-held classifier
  part of the test split (:func:`server_classifier`). Its penultimate layer is the
  feature space for the Fréchet distance, and its predictions label generated images.
* **Classifier-FID**: the Fréchet distance between Gaussians fitted to the features of
  real images of the test split's quality part and of generated images,
  ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})``. It uses this classifier, not
  Inception, so its values are comparable only within privfed.
* **TSTR**: train on synthetic, test on real. A logistic regression fitted on generated
  images and their labels, scored on the real images of the quality part.
* **Class distribution**: the share of generated images per predicted class, and its
  total-variation distance to the real class distribution (representation bias:
  ``TV = 1/2 sum_c |p_gen(c) - p_real(c)|``, 0 when every class is as frequent as in the
  real data, 1 when the generator only makes classes the data does not have).

The classifier and the metrics use only the server's test split (half to train the
classifier, half to measure), never a site's image, so they need a server that holds
labelled data: in privfed, the simulation (:func:`server_classifier`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import linalg
from torch import nn

from common.deploy.fileio import write_atomically
from common.errors import ConfigError

if TYPE_CHECKING:
    from common.tasks.images import ImageTask


class EvalClassifier(nn.Module):
    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.out = nn.Linear(64, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


def train_classifier(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int = 0, epochs: int = 300
) -> EvalClassifier:
    """Full-batch Adam on the given real images (a second on digits)."""
    with torch.random.fork_rng(), torch.enable_grad():  # callers may be inside no_grad
        torch.manual_seed(seed)
        clf = EvalClassifier(x.shape[1], num_classes)
        opt = torch.optim.Adam(clf.parameters(), lr=3e-3, weight_decay=1e-4)
        for _ in range(epochs):
            opt.zero_grad()
            nn.functional.cross_entropy(clf(x), y).backward()
            opt.step()
    return clf.eval()


def cached_classifier(
    path: Path | None, x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int = 0
) -> EvalClassifier:
    """Load the run's evaluation classifier from ``path``, or train it and save it there."""
    if path is not None and path.is_file():
        clf = EvalClassifier(x.shape[1], num_classes)
        clf.load_state_dict(torch.load(path, weights_only=True))
        return clf.eval()
    clf = train_classifier(x, y, num_classes, seed)
    if path is not None:
        state = clf.state_dict()
        write_atomically(path, lambda fh: torch.save(state, fh))
    return clf


def server_classifier(task: ImageTask, num_classes: int | None = None) -> EvalClassifier:
    """The run's evaluation classifier, trained once on the server-held classifier part.

    Its training images are ``task.classifier_data()``: a keyed half of the server's own
    test split, never a site's image, so it is a function of server data alone. It is
    trained without noise, which is fine for data the server holds; it may therefore be
    written to the run directory (``eval-classifier.pt``) and may decide things about the
    run (the GAN's collapse guard, class-rebalanced sampling), because it carries nothing
    about any site. Its metrics are measured on the other half, ``task.quality_data()``.
    ``num_classes`` defaults to the largest label + 1.
    """
    clf = getattr(task, "_eval_classifier", None)
    if clf is None:
        data = task.classifier_data()
        if data.y is None:
            raise ConfigError("data.source", "the generators' quality metrics need labelled images")
        if len(data) == 0:
            raise ConfigError("federation.central-eval", "the evaluation classifier needs the server's test split")
        k = num_classes if num_classes is not None else int(data.y.max()) + 1
        path = task.artifacts_dir / "eval-classifier.pt" if task.artifacts_dir is not None else None
        clf = task._eval_classifier = cached_classifier(path, data.x, data.y, k, task.cfg.federation.seed)
    return clf


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` and ``b``."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    # ReLU features have dead units, so the covariances are singular: a tiny ridge keeps
    # the matrix square root well defined (as the reference FID code does on failure).
    ridge = np.eye(a.shape[1]) * 1e-6
    cov_a, cov_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def tstr_accuracy(x_syn: np.ndarray, y_syn: np.ndarray, x_real: np.ndarray, y_real: np.ndarray) -> float:
    """Accuracy on real images of a logistic regression trained on synthetic ones."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y_syn)) < 2:
        return float(np.mean(y_real == y_syn[0])) if len(y_syn) else 0.0
    clf = LogisticRegression(max_iter=1000).fit(x_syn, y_syn)
    return float(clf.score(x_real, y_real))


def class_shares(labels: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    return counts / max(counts.sum(), 1.0)


@torch.no_grad()
def predicted_shares(clf: EvalClassifier, x: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(the classifier's label for each image, the share of images per label)."""
    predicted = clf(x).argmax(1).numpy()
    return predicted, class_shares(predicted, num_classes)


def real_shares(labels: torch.Tensor | None, num_classes: int) -> np.ndarray:
    """The class distribution of real images; uniform when they carry no labels."""
    if labels is None:
        return np.full(num_classes, 1 / num_classes)
    return class_shares(labels.numpy(), num_classes)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(p - q).sum())
