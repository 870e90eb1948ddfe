"""The GAN task: local training (DP-SGD on the discriminator's real-data loss only),
evaluation, class-rebalanced sampling and sample grids.

Privacy (unit: one image; the full argument is in :mod:`common.tasks.gan`): only the
hinge loss of D on real images goes through :meth:`LocalSession.step` (clipped per
example, noised, accounted); D's step on generated images and G's steps are functions of
the DP outputs and fresh noise, so the released D and G are post-processing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.data.arrays import ArrayData
from common.errors import ConfigError, TrainingFailure
from common.metrics.fairness import label_weights_for_target, quota_labels, sum_statistics
from common.privacy.metrics_dp import MetricBounds
from common.tasks import register_task
from common.tasks.gan.classes import (
    CALIBRATION_SEED,
    EVAL_SEED,
    MIN_LABEL_SHARE,
    SHIFT_COST,
    class_counts,
    counts_vector,
    is_class_count,
)
from common.tasks.gan.config import GANConfig
from common.tasks.gan.model import GAN
from common.tasks.images import ImageTask

if TYPE_CHECKING:
    from common.config import RunConfig
    from common.metrics.image_quality import EvalClassifier
    from common.privacy.training import LocalSession


def _gan(model: nn.Module) -> GAN:
    """The model as the ``GAN`` it is: the task's hooks get only models its ``build_model`` made
    (typed ``nn.Module`` by the ``Task`` interface). A static cast, no runtime check."""
    return cast(GAN, model)


@register_task("gan")
class GANTask(ImageTask):
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
        return _gan(model).discriminator  # the only network that reads real data

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
        return F.relu(1.0 - _gan(model).discriminator(batch.x, self._labels(batch)))

    def _random_labels(self, n: int, device: torch.device) -> torch.Tensor:
        if not self.params.conditional:
            return torch.zeros(n, dtype=torch.long, device=device)
        return torch.randint(0, self.params.num_classes, (n,), device=device)

    def train(self, model: nn.Module, session: LocalSession) -> dict[str, float]:
        gan = _gan(model)
        D, G = gan.discriminator, gan.generator
        device = next(G.parameters()).device
        fake_opt = torch.optim.SGD([p for p in D.parameters() if p.requires_grad], lr=self.cfg.train.lr)
        g_opt = torch.optim.Adam(G.parameters(), lr=self.params.lr_g, betas=(0.5, 0.999))
        # A fixed number of generated images per step (not the realised Poisson batch
        # size, which depends on the sampled real data).
        n_fake = self.cfg.train.batch_size
        d_real = g_total = 0.0
        steps = 0
        k = self.params.num_classes if self.params.conditional else 1
        for batch in session.batches():
            if self.params.center_samples:  # from G only: no real image is read here
                y_c = torch.arange(k * self.params.center_samples, device=device) % k
                with torch.no_grad():
                    D.set_center(G(y_c), y_c)
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
        D.clear_center()
        D.train()
        return {"d_real_loss": d_real / max(steps * n_fake, 1), "g_loss": g_total / max(steps * self.params.g_steps, 1)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ArrayData) -> dict[str, float]:
        """Discriminator losses; on the server's test split also FID, TSTR and classes.

        Sites report only the discriminator's losses on their validation images (and, with
        ``gan.class-target = "real"``, their class counts of at least ``gan.min-group-size``).
        The quality metrics need the evaluation classifier and labelled server data, so
        they exist only at a server with a test split (in privfed, the simulation).
        """
        model = _gan(model)
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
            out.update(self._quality(model, device))
        elif self.params.class_target == "real":
            # Counts of the site's validation labels (sums, added up by the server).
            out.update(class_counts(data.y, self.params.num_classes, self.params.min_group_size))
        model.train()
        return out

    def metric_bounds(self) -> MetricBounds:
        """Under metrics.dp a site releases only its validation class counts (``gan.class-target =
        "real"``): one image adds 1 to one count (Delta = 1). The discriminator's losses on
        validation images are hinge values without a bound, so they are withheld."""
        if self.params.class_target != "real":
            return MetricBounds({}, 0)
        return MetricBounds({f"class.{c}.n": 1.0 for c in range(self.params.num_classes)}, 1)

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
        no label leaves a site on its own; classes under ``gan.min-group-size`` withheld at
        the site, so small classes are under-counted). A server combines the sites'
        evaluation replies (:meth:`combine_metrics`) and keeps the sums. Before the first
        federated evaluation a simulation adds up the same suppressed per-site counts from
        the simulated split: exactly what the sites would send, nothing more.
        """
        if self._site_class_counts is not None and self._site_class_counts.sum() > 0:
            return self._site_class_counts
        k, m = self.params.num_classes, self.params.min_group_size
        return sum((counts_vector(class_counts(val.y, k, m), k) for _, val in self._split.sites), np.zeros(k))

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

    def _quality(self, model: GAN, device: torch.device) -> dict[str, float]:
        """FID, TSTR and class shares against the quality part of the server's test split
        (never the images the evaluation classifier trained on, never a site's)."""
        from common.metrics.image_quality import (
            frechet_distance,
            predicted_shares,
            real_shares,
            total_variation,
            tstr_accuracy,
        )

        p = self.params
        test = self.quality_data()
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

    def eval_classifier(self) -> EvalClassifier:
        """Trained once per run on the classifier part of the server's test split (server data
        only, never a site's image), cached in the run dir."""
        from common.metrics.image_quality import server_classifier

        return server_classifier(self, self.params.num_classes)

    @torch.no_grad()
    def save_samples(self, model: nn.Module, path: Path, caption: str | None = None) -> Path:
        from common.plots import image_grid

        model = _gan(model)
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
        # One row per class label (per_row images each), so a row is one class.
        return image_grid(images.reshape(len(images), *shape), path, caption, cols=per_row)
