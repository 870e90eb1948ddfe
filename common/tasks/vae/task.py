"""Variational autoencoder on images (default: scikit-learn's 8x8 digits).

Objective per image x (in nats), to be minimised:

    L(x) = E_q[-log p(x|z)] + beta * KL(q(z|x) || N(0, I)),
    KL = -1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2),

with a Bernoulli decoder (pixels in [0, 1]) and one reparameterised sample of z.
With beta = 1, -L(x) is the ELBO; evaluation always reports the beta = 1 value so that
``neg_elbo`` is the true bound whatever beta trained the model.

Unit of privacy: one image. Every layer is ``nn.Linear`` so the fast DP engine applies.

Representation bias (on labelled images; ``docs/FAIRNESS.md``):

* per class c, the mean reconstruction NLL ``class.<c>.recon_nll``, from the per-class sums
  ``class.<c>.recon_sum`` and counts ``class.<c>.n`` a site sends (combined by adding
  them, so exact), and its disparity across classes ``recon_disparity.{mean, std,
  worst, best, gap, ratio}`` (:func:`common.metrics.fairness.spread`; gap = worst - best,
  ratio = worst / best). A site sends a class only when it has at least
  ``vae.min-group-size`` (k) validation images of it, with complementary suppression
  (:func:`common.metrics.fairness.suppressed_groups`): the withheld classes together hold
  at least k images, so subtracting the sent classes from the overall mean (``neg_elbo``
  and ``recon_nll`` times the validation count) never isolates a small class. Its local
  per-class means and disparity cover the sent classes only. The server's own test split
  is not suppressed (server data);
* on the server's test split only, ``class_tv``: the total-variation distance between
  the class distribution of generated images (labelled by the evaluation classifier of
  :mod:`common.metrics.image_quality`, trained on the split's classifier part) and that
  of the real images of its quality part.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from common.data.arrays import ArrayData
from common.metrics.fairness import group_means, spread, sum_statistics, suppressed_groups
from common.privacy.metrics_dp import MetricBounds
from common.tasks import register_task
from common.tasks.images import ImageTask


class VAE(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.input_dim, self.latent_dim = input_dim, latent_dim
        self.encoder = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU()
        )
        self.mu = nn.Linear(hidden_dim, latent_dim)
        self.logvar = nn.Linear(hidden_dim, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, input_dim),  # Bernoulli logits
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.logvar(h)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per row."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def negative_elbo_terms(
    model: VAE, x: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction NLL, KL) per example, in nats."""
    logits, mu, logvar = model(x, generator)
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=1)
    return recon, kl_standard_normal(mu, logvar)


# Generated images whose class distribution class_tv measures (as the GAN's default).
EVAL_SAMPLES = 2000
DISPARITY_STATS = ("mean", "std", "worst", "best", "gap", "ratio")
# metrics.loss-bound = 0: one image's losses are clipped to this many nats under metrics.dp
# (the 8x8 digits' neg ELBO is about 25-45 nats, so it clips almost nothing).
DEFAULT_LOSS_BOUND = 100.0


def class_sums(recon: torch.Tensor, labels: torch.Tensor, min_group_size: int = 1) -> dict[str, float]:
    """Per class present: the sum of reconstruction NLLs and the number of images.

    Classes under ``min_group_size`` images are left out, with complementary suppression
    (:func:`suppressed_groups`), so that no class of fewer images can be recovered from
    these sums and the overall sum. (With the default 1 every class present is kept.)
    """
    out: dict[str, float] = {}
    present = torch.unique(labels).tolist()
    sizes = {str(c): float((labels == c).sum()) for c in present}
    hidden = suppressed_groups(sizes, min_group_size)
    for c in present:
        if str(c) in hidden:
            continue
        rows = labels == c
        out[f"class.{c}.recon_sum"] = float(recon[rows].double().sum())
        out[f"class.{c}.n"] = float(rows.sum())
    return out


def is_class_sum(key: str) -> bool:
    return key.startswith("class.") and key.endswith((".recon_sum", ".n"))


def class_recon_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Per-class mean reconstruction NLL and its disparity across classes, from summed class sums."""
    means = group_means(sums, "class.", "recon_sum")
    disparity = spread(means)
    out = {f"class.{c}.recon_nll": v for c, v in means.items()}
    out.update({f"recon_disparity.{k}": disparity[k] for k in DISPARITY_STATS if k in disparity})
    return out


def dp_means(sums: dict[str, float]) -> dict[str, float]:
    """The VAE's metrics from the (noisy) sums of :meth:`VAETask.dp_evaluate`, summed over sites."""
    n = sums.get("n", 0.0)
    out: dict[str, float] = {}
    if n > 0:
        for key in ("neg_elbo", "recon_nll", "kl", "recon_mse"):
            out[key] = sums[key + "_sum"] / n
    out.update(class_recon_metrics(sums))
    out.update({k: v for k, v in sums.items() if k.endswith(".n") or k == "n"})
    return out


def _eval_terms(model: VAE, data: ArrayData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, per-image reconstruction NLL, per-image KL, decoded means) in eval mode (the caller
    switches back to train). A fixed generator draws the same z noise every round, so curves
    show the model, not Monte Carlo noise."""
    model.eval()
    device = next(model.parameters()).device
    x = data.x.to(device)
    gen = torch.Generator(device=device).manual_seed(1234)
    recon, kl = negative_elbo_terms(model, x, gen)
    mu, _ = model.encode(x)
    return x, recon, kl, torch.sigmoid(model.decoder(mu))


def _vae(model: nn.Module) -> VAE:
    """The model as the ``VAE`` it is: the task's hooks get only models its ``build_model`` made
    (typed ``nn.Module`` by the ``Task`` interface). A static cast, no runtime check."""
    return cast(VAE, model)


@register_task("vae")
class VAETask(ImageTask):
    plot_metrics = ("class_tv", "recon_disparity.ratio")

    def build_model(self, site_index: int | None = None) -> VAE:
        from common.tasks.adapters import add_adapters

        model = VAE(self.input_dim, self.params.hidden_dim, self.params.latent_dim)
        return cast(VAE, add_adapters(model, self.params.adapter_rank))

    def per_sample_loss(self, model: nn.Module, batch: ArrayData) -> torch.Tensor:
        recon, kl = negative_elbo_terms(_vae(model), batch.x)
        return recon + self.params.beta * kl

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ArrayData) -> dict[str, float]:
        model = _vae(model)
        x, recon, kl, decoded = _eval_terms(model, data)
        mse = F.mse_loss(decoded, x)
        out = {
            "neg_elbo": float((recon + kl).mean()),
            "recon_nll": float(recon.mean()),
            "kl": float(kl.mean()),
            "recon_mse": float(mse),
        }
        if data.y is not None:
            server = data is self.server_test_data()
            # At a site, small classes are withheld (vae.min-group-size); the server's own data is not.
            sums = class_sums(recon.cpu(), data.y, 1 if server else self.params.min_group_size)
            out.update({**class_recon_metrics(sums), **sums})
            if server and len(self.quality_data()):
                out["class_tv"] = self._class_tv(model)
        model.train()
        return out

    # ------------------------------------------------ private metrics (metrics.dp)
    def _classes(self) -> int:
        """The public label vocabulary: classes of the server-held test split (digits: 10)."""
        y = self.server_test_data().y
        return int(y.max()) + 1 if y is not None and len(y) else 0

    def metric_bounds(self) -> MetricBounds:
        """Sums over validation images, each image's losses clipped to ``B = metrics.loss-bound`` (0: 100 nats).

        One image contributes at most B to ``neg_elbo_sum``, ``recon_nll_sum``, ``kl_sum`` and
        its class's ``recon_sum`` (all losses are >= 0 and clipped to [0, B]), at most 1 to
        ``recon_mse_sum`` (pixels in [0, 1]) and 1 to ``n`` and its class's ``n``: it touches
        7 keys, so Delta = sqrt(7) in units of each key's bound. Every class of the public
        vocabulary is in the schema (a class a site lacks is sent as 0 plus noise).
        """
        b = self.cfg.metrics.loss_bound or DEFAULT_LOSS_BOUND
        bounds = {"neg_elbo_sum": b, "recon_nll_sum": b, "kl_sum": b, "recon_mse_sum": 1.0, "n": 1.0}
        for c in range(self._classes()):
            bounds.update({f"class.{c}.recon_sum": b, f"class.{c}.n": 1.0})
        return MetricBounds(bounds, 7 if self._classes() else 5)

    @torch.no_grad()
    def dp_evaluate(self, model: nn.Module, data: ArrayData) -> dict[str, float]:
        """:meth:`metric_bounds`'s sums on a site's validation images, each image clipped to its bound."""
        model = _vae(model)
        x, recon, kl, decoded = _eval_terms(model, data)
        mse = (decoded - x).pow(2).mean(dim=1)
        b = self.cfg.metrics.loss_bound or DEFAULT_LOSS_BOUND
        recon_c = recon.double().clamp(0, b)
        out = {
            "neg_elbo_sum": float((recon + kl).double().clamp(0, b).sum()),
            "recon_nll_sum": float(recon_c.sum()),
            "kl_sum": float(kl.double().clamp(0, b).sum()),
            "recon_mse_sum": float(mse.double().clamp(0, 1).sum()),
            "n": float(len(x)),
        }
        if data.y is not None:
            out.update(class_sums(recon_c.cpu(), data.y))
        model.train()
        return out

    def _class_tv(self, model: VAE) -> float:
        """TV distance between the classes of generated images (decoded z ~ N(0, I)) and of the
        real images of the test split's quality part (not those the classifier trained on)."""
        from common.metrics.image_quality import predicted_shares, real_shares, server_classifier, total_variation

        clf = server_classifier(self)
        k = clf.out.out_features
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(4321)
        z = torch.randn(EVAL_SAMPLES, model.latent_dim, generator=gen, device=device)
        _, shares = predicted_shares(clf, torch.sigmoid(model.decoder(z)).cpu(), k)
        return total_variation(shares, real_shares(self.quality_data().y, k))

    def combine_metrics(self, results: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
        """Example-weighted means of the sites' means; per-class metrics from summed class sums (exact).

        Under metrics.dp the sites send noisy sums (:meth:`dp_evaluate`): the means are their
        summed sums over the summed count (post-processing of the noisy release)."""
        if results and all("neg_elbo_sum" in m for _, m in results):
            return dp_means(sum_statistics((m for _, m in results), lambda k: k.endswith(("_sum", ".n")) or k == "n"))
        per_class = ("class.", "recon_disparity.")
        means = super().combine_metrics(
            [(n, {k: v for k, v in m.items() if not k.startswith(per_class)}) for n, m in results]
        )
        sums = sum_statistics((m for _, m in results), is_class_sum)
        return {**means, **class_recon_metrics(sums), **{k: v for k, v in sums.items() if k.endswith(".n")}}

    @torch.no_grad()
    def save_samples(self, model: nn.Module, path: Path, caption: str | None = None) -> Path:
        from common.plots import image_grid

        model = _vae(model)
        side = int(round(model.input_dim**0.5))
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(0)
        z = torch.randn(64, model.latent_dim, generator=gen, device=device)
        images = torch.sigmoid(model.decoder(z)).cpu().numpy()
        if side * side != model.input_dim:  # not square: show as one row per sample
            return image_grid(images.reshape(64, 1, -1), path, caption)
        return image_grid(images.reshape(64, side, side), path, caption)
