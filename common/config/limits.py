"""Facts the config validates against, each written once: accountant-input bounds, the
default delta, the smallest secure sum, and the choices of enumerated keys.

Privacy assumptions stated here: the accountants are only trusted for sigma in
``SIGMA_RANGE``, delta >= ``MIN_DELTA`` and at most ``MAX_STEPS`` steps (outside them the
Opacus/dp-accounting numerics overflow or do not converge); a secure sum holds at least
``MIN_SECURE_SITES`` updates, because with 2 each site learns the other's update.
"""

from __future__ import annotations

from common.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
BACKENDS = ("ray", "in-process")  # where privfed simulate runs the virtual sites (federation.backend)
# Accountant inputs privfed accepts, from a config or from a site: outside these the
# Opacus/dp-accounting numerics fail (overflow, non-convergence) or epsilon is meaningless.
SIGMA_RANGE = (0.1, 1000.0)
MIN_DELTA = 1e-20
MAX_STEPS = 1_000_000
# Cap of the automatic delta (sample-level: per site; client-level: per federation).
AUTO_DELTA_CAP = 1e-5
# Fewest updates a secure sum may hold: with 2, each site learns the other's update.
MIN_SECURE_SITES = 3

FAULT_STAGES = ("setup", "train", "upload", "unmask")
AGGREGATIONS = ("fedavg", "trimmed-mean", "krum", "multi-krum", "q-fedavg")
CORRUPTIONS = ("nan", "shape", "norm")


def auto_delta(n: int) -> float:
    """Default delta for ``n`` records (examples at a site, or sites): below 1/n, and at most 1e-5."""
    return min(AUTO_DELTA_CAP, 1.0 / (10 * n))


def key_of(name: str) -> str:
    """Python field name -> config key segment (``noise_multiplier`` -> ``noise-multiplier``)."""
    return name.replace("_", "-")


def require(cond: bool, key: str, message: str) -> None:
    """Raise the one-line :class:`ConfigError` naming ``key`` unless ``cond``."""
    if not cond:
        raise ConfigError(key, message)


def require_sigma(key: str, sigma: float) -> None:
    """A noise multiplier the accountants can compute epsilon for."""
    lo, hi = SIGMA_RANGE
    require(
        lo <= sigma <= hi,
        key,
        f"must be in [{lo:g}, {hi:g}] (outside it the accountants cannot compute epsilon), got {sigma:g}",
    )


# data.partition = "site": the site's own file is all its data, nothing is partitioned
# (common.data.arrays splits by it; common.deploy.site_config sets it for a site's data-path).
SITE_PARTITION = "site"
# What the image tasks (common.tasks.images: the VAE and the GAN) load and how they split it
# (common.data.arrays implements both); their SPECs declare these.
IMAGE_SOURCES = ("digits", "npz")
IMAGE_PARTITIONS = ("dirichlet", "iid", SITE_PARTITION)
