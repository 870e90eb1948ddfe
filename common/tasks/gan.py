"""Conditional GAN on images, with DP on the only network that touches real data.

Quality (server side, on the held-out test split; :mod:`common.metrics.image_quality`):
classifier-FID, train-synthetic-test-real accuracy and the class distribution of
generated images. A run whose samples are not finite, or whose samples all fall in one
class (total mode collapse), ends as a failure.

Discriminator. ``D(x, y) = w . phi(x) + b + e_y . phi(x)``: a projection discriminator
on random features ``phi(x) = relu(A x + c)``. ``A`` and ``c`` are drawn once from a fixed
seed (``gan.feature-seed``), never trained and never fitted to data, so they are
identical at every site and carry no information about anyone; only the head
(``w``, ``b`` and the class embeddings ``e``) is trained. That head has few parameters,
which is what lets DP-SGD noise stay small next to its signal. It has no BatchNorm (no
batch statistics mixing examples), and both trainable layers are ones the fast DP
engine clips exactly (``nn.Linear``, ``nn.Embedding``).

Privacy argument (unit: one image). Per local step:
  1. **D on real data (DP-SGD).** The hinge loss ``relu(1 - D(x, y))`` of each real
     example in a Poisson-sampled batch goes through :meth:`LocalSession.step`: clipped
     per example, noised, accounted. This is the only place real data is read.
  2. **D on fake data.** ``relu(1 + D(G(z, y'), y'))`` on ``batch-size`` generated images
     with random labels: a function of the current (DP) D and G and fresh noise, never
     of a real example, so it has no privacy cost (post-processing).
  3. **G.** ``-D(G(z, y'), y')`` with D fixed: again a function of D, G and noise only.
The site releases D and G; both are post-processing of the DP-SGD outputs of step 1, so
the released pair is (epsilon, delta)-DP for one image with the epsilon the ledger
records for the discriminator's steps. ``tests/test_gan.py`` checks that G's training
is identical whatever the real data is, once D is held fixed.

Class-rebalanced sampling (``gan.class-target``, docs/FAIRNESS.md): the
conditioning labels of evaluated samples are drawn so that the generated classes follow a
target, uniform or the real distribution (from the sites' summed validation class
counts). Post-processing of the released generator; the sites' counts are validation
data, outside epsilon like the VAE's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.data.arrays import ArrayData
from common.errors import ConfigError, TrainingFailure
from common.metrics.fairness import label_weights_for_target, quota_labels, sum_statistics
from common.tasks import register_task
from common.tasks.images import ImageTask

if TYPE_CHECKING:
    from common.config import RunConfig
    from common.privacy.training import LocalSession


CLASS_TARGETS = ("none", "uniform", "real")


@dataclass(frozen=True)
class GANConfig:
    latent_dim: int = 32
    hidden_dim: int = 256
    # Random features of the discriminator (fixed, data-independent).
    features: int = 2048
    feature_seed: int = 1234
    conditional: bool = True
    num_classes: int = 10
    lr_g: float = 2e-3
    g_steps: int = 1
    # Generated images per evaluation (FID, TSTR, class distribution).
    eval_samples: int = 2000
    # A round whose samples put at least this share in one class is total mode collapse ...
    collapse_share: float = 0.99
    # ... and this many collapsed rounds in a row end the run. DP GANs often collapse for a
    # few early rounds and recover (digits at eps=8: collapsed in rounds 4-5, FID 27 by round 11).
    collapse_rounds: int = 5
    # Class proportions of generated samples: none (labels cycled evenly, no correction) |
    # uniform | real (from the sites' summed class counts).
    class_target: str = "none"

    def validate(self) -> None:
        for key, value, low in (
            ("latent-dim", self.latent_dim, 1),
            ("hidden-dim", self.hidden_dim, 1),
            ("features", self.features, 1),
            ("num-classes", self.num_classes, 1),
            ("g-steps", self.g_steps, 1),
        ):
            if value < low:
                raise ConfigError(f"gan.{key}", f"must be >= {low}, got {value}")
        if self.lr_g <= 0:
            raise ConfigError("gan.lr-g", f"must be > 0, got {self.lr_g}")
        if self.eval_samples < 20:
            raise ConfigError("gan.eval-samples", f"must be >= 20, got {self.eval_samples}")
        if not 0 < self.collapse_share <= 1:
            raise ConfigError("gan.collapse-share", f"must be in (0, 1], got {self.collapse_share}")
        if self.collapse_rounds < 1:
            raise ConfigError("gan.collapse-rounds", f"must be >= 1, got {self.collapse_rounds}")
        if self.class_target not in CLASS_TARGETS:
            raise ConfigError(
                "gan.class-target", f"must be one of {', '.join(CLASS_TARGETS)}, got {self.class_target!r}"
            )


class Generator(nn.Module):
    """MLP generator. BatchNorm is fine here (it only ever sees generated images) and uses
    batch statistics only, so the model has no buffers to federate."""

    def __init__(self, latent_dim: int, hidden_dim: int, out_dim: int, num_classes: int, conditional: bool) -> None:
        super().__init__()
        self.latent_dim, self.num_classes, self.conditional = latent_dim, num_classes, conditional
        cond = num_classes if conditional else 0
        self.net = nn.Sequential(
            nn.Linear(latent_dim + cond, hidden_dim),
            nn.BatchNorm1d(hidden_dim, track_running_stats=False),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, track_running_stats=False),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(len(labels), self.latent_dim, generator=generator, device=labels.device)
        if self.conditional:
            z = torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], 1)
        return torch.sigmoid(self.net(z))


class Discriminator(nn.Module):
    """Projection discriminator on fixed random features (see the module docstring)."""

    def __init__(self, in_dim: int, features: int, num_classes: int, conditional: bool, seed: int) -> None:
        super().__init__()
        self.features = nn.Linear(in_dim, features)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.features.weight.copy_(torch.randn(features, in_dim, generator=g) / math.sqrt(in_dim))
            self.features.bias.copy_(torch.rand(features, generator=g) * 0.5 - 0.25)
        self.features.requires_grad_(False)
        self.scale = 4.0 / math.sqrt(features)
        self.head = nn.Linear(features, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.embed = nn.Embedding(num_classes, features) if conditional else None
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        f = F.relu(self.features(x)) * self.scale
        out = self.head(f).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(labels) * f).sum(1)
        return out


class GAN(nn.Module):
    def __init__(self, in_dim: int, p: GANConfig) -> None:
        super().__init__()
        self.in_dim, self.num_classes = in_dim, p.num_classes
        self.generator = Generator(p.latent_dim, p.hidden_dim, in_dim, p.num_classes, p.conditional)
        self.discriminator = Discriminator(in_dim, p.features, p.num_classes, p.conditional, p.feature_seed)


# Class-rebalanced sampling (gan.class-target): every conditioning label keeps at
# least this share of its even share of the samples, so no class vanishes from TSTR's data,
# and the label mix leaves the target only where each unit of shift buys >= SHIFT_COST
# units of class TV (a generator that ignores its labels is not skewed for nothing).
MIN_LABEL_SHARE = 0.2
SHIFT_COST = 0.5
# Latent seeds: the calibration batch (where each label lands) is never the evaluated one.
CALIBRATION_SEED, EVAL_SEED = 1111, 4321


def class_counts(labels: torch.Tensor | None, num_classes: int) -> dict[str, float]:
    """``class.<c>.n`` for every class: what a site sends for the real class distribution."""
    if labels is None:
        return {}
    counts = np.bincount(labels.cpu().numpy(), minlength=num_classes)[:num_classes]
    return {f"class.{c}.n": float(v) for c, v in enumerate(counts)}


def counts_vector(sums: dict[str, float], num_classes: int) -> np.ndarray:
    return np.array([sums.get(f"class.{c}.n", 0.0) for c in range(num_classes)])


def is_class_count(key: str) -> bool:
    return key.startswith("class.") and key.endswith(".n")


@register_task("gan")
class GANTask(ImageTask):
    config_cls = GANConfig
    primary_metric = "fid"
    site_primary_loss = False  # FID needs the evaluation classifier: server-side only
    plot_metrics = ("tstr", "class_tv")

    params: GANConfig

    def __init__(self, cfg: RunConfig, key: bytes | None = None) -> None:
        super().__init__(cfg, key)
        if self.params.class_target != "none" and not self.params.conditional:
            raise ConfigError(
                "gan.class-target",
                "needs gan.conditional=true: an unconditional generator cannot be steered by class",
            )
        # The federation's class counts, summed over the sites' evaluation replies.
        self._site_class_counts: np.ndarray | None = None
        self.collapsed_rounds = 0  # consecutive evaluations in total mode collapse

    def build_model(self, site_index: int | None = None) -> GAN:
        return GAN(self.input_dim, self.params)

    def private_module(self, model: nn.Module) -> nn.Module:
        return model.discriminator  # the only network that reads real data

    def _labels(self, batch: ArrayData) -> torch.Tensor:
        if self.params.conditional:
            if batch.y is None:
                raise ConfigError(
                    "gan.conditional", "needs labelled images (an .npz with 'y'); set gan.conditional=false"
                )
            return batch.y
        return torch.zeros(len(batch), dtype=torch.long, device=batch.x.device)

    def per_sample_loss(self, model: nn.Module, batch: ArrayData) -> torch.Tensor:
        """Hinge loss of D on each real image: the per-example loss DP-SGD clips."""
        return F.relu(1.0 - model.discriminator(batch.x, self._labels(batch)))

    def _random_labels(self, n: int, device: torch.device) -> torch.Tensor:
        if not self.params.conditional:
            return torch.zeros(n, dtype=torch.long, device=device)
        return torch.randint(0, self.params.num_classes, (n,), device=device)

    def train(self, model: nn.Module, session: LocalSession) -> dict[str, float]:
        D, G = model.discriminator, model.generator
        device = next(G.parameters()).device
        fake_opt = torch.optim.SGD([p for p in D.parameters() if p.requires_grad], lr=self.cfg.train.lr)
        g_opt = torch.optim.Adam(G.parameters(), lr=self.params.lr_g, betas=(0.5, 0.999))
        # A fixed number of generated images per step (not the realised Poisson batch
        # size, which depends on the sampled real data).
        n_fake = self.cfg.train.batch_size
        d_real = g_total = 0.0
        steps = 0
        for batch in session.batches():
            D.train()  # (1) the DP step: real images, clipped and noised by the session
            losses = self.per_sample_loss(model, batch)
            session.step(losses)
            d_real += float(losses.detach().sum())
            # In eval mode the DP engine does not capture: (2) and (3) are plain autograd.
            D.eval()
            y = self._random_labels(n_fake, device)
            with torch.no_grad():
                fake = G(y)
            fake_opt.zero_grad(set_to_none=True)
            F.relu(1.0 + D(fake, y)).mean().backward()  # (2) D on generated images only
            fake_opt.step()
            for _ in range(self.params.g_steps):  # (3) G against the fixed D
                y = self._random_labels(n_fake, device)
                loss_g = -D(G(y), y).mean()
                g_opt.zero_grad(set_to_none=True)
                loss_g.backward()
                g_opt.step()
                g_total += float(loss_g.detach())
            D.zero_grad(set_to_none=True)  # G's backward reached D's head; never step on it
            steps += 1
        D.train()
        return {"d_real_loss": d_real / max(steps * n_fake, 1), "g_loss": g_total / max(steps * self.params.g_steps, 1)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ArrayData) -> dict[str, float]:
        """Discriminator losses; on the server's test split also FID, TSTR and classes.

        Sites report only the discriminator's losses on their validation images: the
        quality metrics need the evaluation classifier, which is trained on the pooled
        training images and so exists only in simulation, at the server.
        """
        model.eval()
        D, G = model.discriminator, model.generator
        device = next(G.parameters()).device
        x = data.x.to(device)
        labels = self._labels(ArrayData(x, None if data.y is None else data.y.to(device)))
        gen = torch.Generator(device=device).manual_seed(1234)
        fake = G(labels, generator=gen)
        d_real, d_fake = D(x, labels), D(fake, labels)
        out = {
            "d_loss": float(F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()),
            "d_real": float(d_real.mean()),
            "d_fake": float(d_fake.mean()),
        }
        if data is self.server_test_data():
            out.update(self._quality(model, data, device))
        elif self.params.class_target == "real":
            # Counts of the site's validation labels (sums, added up by the server).
            out.update(class_counts(data.y, self.params.num_classes))
        model.train()
        return out

    def combine_metrics(self, results: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
        """Example-weighted means, and the sites' class counts summed (kept for :meth:`class_target`)."""
        means = super().combine_metrics(
            [(n, {k: v for k, v in m.items() if not is_class_count(k)}) for n, m in results]
        )
        sums = sum_statistics((m for _, m in results), is_class_count)
        if sums:
            self._site_class_counts = counts_vector(sums, self.params.num_classes)
        return {**means, **sums}

    def real_class_counts(self) -> np.ndarray:
        """Per class, the number of real images over all sites: the sum of the sites' ``class.<c>.n``.

        Those are counts of each site's validation labels (additive sufficient statistics;
        no label leaves a site on its own). A server without a test split combines the
        sites' evaluation replies (:meth:`combine_metrics`) and keeps the sums. In
        simulation the server evaluates on its own test split instead and does not combine
        site replies, so it adds up the same per-site counts from the simulated split (it
        already reads the sites' data there to train the evaluation classifier).
        """
        if self._site_class_counts is not None and self._site_class_counts.sum() > 0:
            return self._site_class_counts
        k = self.params.num_classes
        return sum((counts_vector(class_counts(val.y, k), k) for _, val in self._split.sites), np.zeros(k))

    def class_target(self) -> np.ndarray | None:
        """The class distribution generated samples should have (gan.class-target), or None."""
        target, k = self.params.class_target, self.params.num_classes
        if target == "none":
            return None
        if target == "uniform":
            return np.full(k, 1.0 / k)
        counts = self.real_class_counts()
        return counts / counts.sum() if counts.sum() > 0 else np.full(k, 1.0 / k)

    @torch.no_grad()
    def sample_labels(self, model: GAN, n: int, device: torch.device, clf: nn.Module | None = None) -> torch.Tensor:
        """Conditioning labels for ``n`` generated samples.

        No target: labels cycled evenly (0, 1, ..., K-1, 0, ...). With a target and a
        classifier: class-rebalanced sampling. A calibration batch (its own latent seed)
        measures where each label's images land (``confusion[y, c]``), and the label mix is
        the one whose generated classes are closest in TV to the target
        (:func:`common.metrics.fairness.label_weights_for_target`), each label keeping at least
        MIN_LABEL_SHARE of its even share, moving only where that pays (SHIFT_COST).
        Without a classifier the mix is the target.
        """
        k = self.params.num_classes
        target = self.class_target()
        if target is None or not self.params.conditional:
            return torch.arange(n, device=device) % k
        weights = target
        if clf is not None:
            y_cal = torch.arange(n, device=device) % k
            x_cal = model.generator(y_cal, generator=torch.Generator(device=device).manual_seed(CALIBRATION_SEED))
            landed = clf(x_cal.cpu()).argmax(1).numpy()
            confusion = np.zeros((k, k))
            np.add.at(confusion, (y_cal.cpu().numpy(), landed), 1.0)
            confusion /= np.maximum(confusion.sum(1, keepdims=True), 1.0)
            weights = label_weights_for_target(confusion, target, MIN_LABEL_SHARE / k, SHIFT_COST)
        return torch.as_tensor(quota_labels(weights, n), device=device)

    def _quality(self, model: GAN, test: ArrayData, device: torch.device) -> dict[str, float]:
        from common.metrics.image_quality import (
            frechet_distance,
            predicted_shares,
            real_shares,
            total_variation,
            tstr_accuracy,
        )

        p = self.params
        clf = self.eval_classifier()
        gen = torch.Generator(device=device).manual_seed(EVAL_SEED)
        # FID, TSTR and the class shares all use this one batch: with a class target, its
        # label mix is rebalanced (TSTR then trains on the target's class proportions).
        y_gen = self.sample_labels(model, p.eval_samples, device, clf)
        x_gen = model.generator(y_gen, generator=gen).cpu()
        if not torch.isfinite(x_gen).all():
            raise TrainingFailure("the GAN diverged: the generator produces NaN/Inf images")
        feats_gen = clf.features(x_gen).numpy().astype(np.float64)
        feats_real = clf.features(test.x).numpy().astype(np.float64)
        predicted, shares = predicted_shares(clf, x_gen, p.num_classes)
        collapsed = bool(shares.max() >= p.collapse_share)
        self.collapsed_rounds = self.collapsed_rounds + 1 if collapsed else 0
        if self.collapsed_rounds >= p.collapse_rounds:
            raise TrainingFailure(
                f"total mode collapse: {shares.max():.0%} of generated images are class {int(shares.argmax())} "
                f"in {self.collapsed_rounds} evaluation(s) in a row (gan.collapse-share={p.collapse_share:g}, "
                f"gan.collapse-rounds={p.collapse_rounds})"
            )
        # Labels for TSTR: the conditioning labels, or the classifier's when unconditional.
        y_train = y_gen.cpu().numpy() if p.conditional else predicted
        out = {
            "fid": frechet_distance(feats_real, feats_gen),
            "tstr": tstr_accuracy(x_gen.numpy(), y_train, test.x.numpy(), test.y.numpy())
            if test.y is not None
            else float("nan"),
            "class_tv": total_variation(shares, real_shares(test.y, p.num_classes)),
        }
        out.update({f"class_share.{k}": float(v) for k, v in enumerate(shares)})
        out["collapsed"] = float(collapsed)  # tolerated up to gan.collapse-rounds in a row
        target = self.class_target()
        if target is not None:
            out["class_tv_target"] = total_variation(shares, target)
        return out

    def eval_classifier(self):
        """Trained once per run on the sites' pooled training images, cached in the run dir."""
        from common.metrics.image_quality import pooled_classifier

        return pooled_classifier(self, self.params.num_classes)

    @torch.no_grad()
    def save_samples(self, model: nn.Module, path: Path) -> Path:
        from common.plots import image_grid

        model.eval()
        G = model.generator
        device = next(G.parameters()).device
        per_row = 8
        rows = self.params.num_classes if self.params.conditional else 8
        labels = torch.arange(rows, device=device).repeat_interleave(per_row) % self.params.num_classes
        images = G(labels, generator=torch.Generator(device=device).manual_seed(0)).cpu().numpy()
        model.train()
        side = int(round(model.in_dim**0.5))
        shape = (side, side) if side * side == model.in_dim else (1, model.in_dim)
        return image_grid(images.reshape(len(images), *shape), path)
