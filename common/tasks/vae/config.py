"""The VAE's ``[vae]`` config table and its declarations (light: the config reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.limits import IMAGE_PARTITIONS, IMAGE_SOURCES
from common.config.rules import TaskSpec
from common.errors import ConfigError


@dataclass(frozen=True)
class VAEConfig:
    latent_dim: int = 8
    hidden_dim: int = 128
    beta: float = 1.0
    # Per-class validation sums of fewer images are not sent (complementary suppression).
    min_group_size: int = 10

    def validate(self) -> None:
        if self.latent_dim < 1:
            raise ConfigError("vae.latent-dim", f"must be >= 1, got {self.latent_dim}")
        if self.hidden_dim < 1:
            raise ConfigError("vae.hidden-dim", f"must be >= 1, got {self.hidden_dim}")
        if self.beta < 0:
            raise ConfigError("vae.beta", f"must be >= 0, got {self.beta}")
        if self.min_group_size < 1:
            raise ConfigError("vae.min-group-size", f"must be >= 1, got {self.min_group_size}")


SPEC = TaskSpec(
    name="vae",
    config_cls=VAEConfig,
    data_sources=IMAGE_SOURCES,
    partitions=IMAGE_PARTITIONS,
    primary_metric="neg_elbo",
)
