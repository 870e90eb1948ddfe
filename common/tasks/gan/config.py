"""The GAN's ``[gan]`` config table and its declarations (light: the config reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.limits import IMAGE_PARTITIONS, IMAGE_SOURCES
from common.config.rules import TaskSpec
from common.errors import ConfigError

CLASS_TARGETS = ("none", "uniform", "real")
# A coordinator's run config must not be able to exhaust a site's memory (hostile review, issue 24).
MAX_CENTER_SAMPLES = 4096


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
    # Subtract from D's features, per label, their mean over this many generated images per
    # class, recomputed from G before every DP step (0: off). A real image's clipped
    # gradient is then its features' distance from the generator's class mean, not mostly
    # the features' common positive mean, so more of each clipped gradient is signal.
    # Post-processing of the released G: no privacy cost.
    center_samples: int = 0
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
    # With class-target "real": per-class validation counts of fewer images are not sent
    # (complementary suppression, as the VAE's per-class sums).
    min_group_size: int = 10

    def validate(self) -> None:
        for key, value, low in (
            ("latent-dim", self.latent_dim, 1),
            ("hidden-dim", self.hidden_dim, 1),
            ("features", self.features, 1),
            ("num-classes", self.num_classes, 1),
            ("g-steps", self.g_steps, 1),
            ("center-samples", self.center_samples, 0),
            ("min-group-size", self.min_group_size, 1),
        ):
            if value < low:
                raise ConfigError(f"gan.{key}", f"must be >= {low}, got {value}")
        if self.center_samples > MAX_CENTER_SAMPLES:  # generated per label before every DP step
            raise ConfigError(
                "gan.center-samples",
                f"must be <= {MAX_CENTER_SAMPLES} (per label, every step), got {self.center_samples}",
            )
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


SPEC = TaskSpec(
    name="gan",
    config_cls=GANConfig,
    data_sources=IMAGE_SOURCES,
    partitions=IMAGE_PARTITIONS,
    primary_metric="fid",
    site_primary_loss=False,  # FID needs the evaluation classifier: server-side only
)
