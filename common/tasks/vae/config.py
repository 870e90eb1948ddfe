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
    # 0: train every weight. r > 0: train only rank-r adapters around each layer's random
    # initial weights (common.tasks.adapters): far fewer coordinates for DP-SGD to noise.
    adapter_rank: int = 0

    def validate(self) -> None:
        if self.latent_dim < 1:
            raise ConfigError("vae.latent-dim", f"must be >= 1, got {self.latent_dim}")
        if self.hidden_dim < 1:
            raise ConfigError("vae.hidden-dim", f"must be >= 1, got {self.hidden_dim}")
        if self.beta < 0:
            raise ConfigError("vae.beta", f"must be >= 0, got {self.beta}")
        if self.min_group_size < 1:
            raise ConfigError("vae.min-group-size", f"must be >= 1, got {self.min_group_size}")
        if not 0 <= self.adapter_rank <= min(self.hidden_dim, 64):
            raise ConfigError(
                "vae.adapter-rank",
                f"must be in [0, min(vae.hidden-dim, 64)] (0 = train every weight), got {self.adapter_rank}",
            )


SPEC = TaskSpec(
    name="vae",
    config_cls=VAEConfig,
    data_sources=IMAGE_SOURCES,
    partitions=IMAGE_PARTITIONS,
    primary_metric="neg_elbo",
)
