"""Run configuration: one typed schema, one flat key space, one-line errors.

Every setting has a flat key such as ``rounds`` or ``dp.noise-multiplier``. The same
keys are used by scenario TOML files (as nested tables), by ``privfed simulate``
overrides (``dp.noise-multiplier=1.2``), by Flower's ``[tool.flwr.app.config]`` and by
``flwr run --run-config``. Both the ServerApp and the ClientApp parse their
``context.run_config`` through :func:`RunConfig.from_flat`, so a run is configured
identically on every side.

Task-specific settings live in a table named after the task (``[vae]``); the task
plug-in supplies the dataclass that validates them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from common.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
# Accountant inputs privfed accepts, from a config or from a site: outside these the
# Opacus/dp-accounting numerics fail (overflow, non-convergence) or epsilon is meaningless.
SIGMA_RANGE = (0.1, 1000.0)
MIN_DELTA = 1e-20
MAX_STEPS = 1_000_000


def _key(name: str) -> str:
    """Python field name -> config key segment (``noise_multiplier`` -> ``noise-multiplier``)."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class FederationConfig:
    """Top-level keys: who takes part, for how long, and where artifacts go."""

    scenario: str = "custom"
    task: str = "vae"
    seed: int = 0
    num_sites: int = 8
    rounds: int = 10
    # Fraction of sites sampled for training each round (Flower's fraction_fit).
    fraction_fit: float = 1.0
    # Fraction of sites that evaluate the global model each round (Flower's
    # fraction_evaluate). 1 evaluates every site, so per-site fairness covers the whole
    # federation but a round's cost grows with num-sites; below 1 keeps it flat (the last
    # round still evaluates every site, so the final site-level fairness is complete).
    fraction_evaluate: float = 1.0
    # A round with fewer usable updates than this is not aggregated.
    min_fit_sites: int = 1
    device: str = "auto"
    # Empty: runs/<timestamp>-<scenario> under the working directory.
    run_dir: str = ""
    # Write a sample grid every this many rounds (and always at the end); 0 = only at the end.
    sample_every: int = 5
    # Server-side evaluation on the held-out test split (simulation only).
    central_eval: bool = True
    # How long the server waits for all num-sites sites to connect before it gives up.
    site_wait_seconds: float = 300.0
    # Simulation only: CPU cores and GPU fraction reserved for each virtual site.
    client_cpus: int = 1
    client_gpus: float = 0.0
    # How site updates are averaged: examples (FedAvg, by training-set size), uniform
    # (each site counts once), or auto: uniform under secure aggregation or central DP
    # (see docs/PRIVACY.md), examples otherwise.
    weighting: str = "auto"
    # How the round's updates are combined: fedavg (a weighted mean), one of Flower's
    # Byzantine-robust rules on the updates: trimmed-mean, krum, multi-krum, or q-fedavg
    # (fair aggregation, q-FFL: docs/FAIRNESS.md).
    aggregation: str = "fedavg"
    # trimmed-mean: the fraction cut from each end, per coordinate.
    trim_fraction: float = 0.2
    # krum / multi-krum: how many malicious sites to tolerate (needs > 2f + 2 updates).
    byzantine_sites: int = 1
    # q-fedavg: the fairness exponent q; 0 is a FedAvg step, larger q weighs sites with a
    # higher validation loss more.
    qffl_q: float = 1.0
    # q-fedavg: L, the inverse step size (the paper's Lipschitz estimate); each site's share
    # of the step shrinks by about 1 / (1 + q L ||update||^2 / loss). 0: 1 / train.lr, the
    # paper's choice for SGD, which with Adam and DP noise all but stops training (docs/FAIRNESS.md).
    qffl_lipschitz: float = 0.01
    # Reject an update whose L2 norm is above this (0: no absolute bound) ...
    max_update_norm: float = 0.0
    # ... or above this many times the round's median update norm (0: off; needs 3 updates).
    norm_outlier_factor: float = 10.0
    # Seconds a round waits for replies; a site that has not answered is left out (0: no limit).
    round_timeout: float = 0.0
    # Continue the run in run-dir from its last checkpoint (`privfed resume RUN_DIR`).
    resume: bool = False

    def validate(self) -> None:
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _require(
            self.aggregation in AGGREGATIONS,
            "aggregation",
            f"must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}",
        )
        _require(0 <= self.trim_fraction < 0.5, "trim-fraction", f"must be in [0, 0.5), got {self.trim_fraction}")
        _require(self.byzantine_sites >= 0, "byzantine-sites", f"must be >= 0, got {self.byzantine_sites}")
        _require(self.qffl_q >= 0, "qffl-q", f"must be >= 0 (0: a FedAvg step), got {self.qffl_q}")
        _require(
            self.qffl_lipschitz >= 0, "qffl-lipschitz", f"must be > 0, or 0 for 1 / train.lr, got {self.qffl_lipschitz}"
        )
        if self.aggregation in ("krum", "multi-krum"):
            need = 2 * self.byzantine_sites + 3
            _require(
                self.sampled_per_round >= need,
                "byzantine-sites",
                f"{self.aggregation} with byzantine-sites={self.byzantine_sites} needs at least {need} sites per round "
                f"(2f + 3), but {self.sampled_per_round} are sampled",
            )
        _require(self.max_update_norm >= 0, "max-update-norm", f"must be >= 0 (0: off), got {self.max_update_norm}")
        _require(
            self.norm_outlier_factor == 0 or self.norm_outlier_factor > 1,
            "norm-outlier-factor",
            f"must be 0 (off) or > 1, got {self.norm_outlier_factor}",
        )
        _require(self.round_timeout >= 0, "round-timeout", f"must be >= 0 (0: no limit), got {self.round_timeout}")
        _require(self.num_sites >= 1, "num-sites", f"must be >= 1, got {self.num_sites}")
        _require(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        _require(
            0.0 < self.fraction_fit <= 1.0,
            "fraction-fit",
            f"must be in (0, 1], got {self.fraction_fit}",
        )
        _require(
            0.0 < self.fraction_evaluate <= 1.0,
            "fraction-evaluate",
            f"must be in (0, 1], got {self.fraction_evaluate}",
        )
        _require(self.min_fit_sites >= 1, "min-fit-sites", f"must be >= 1, got {self.min_fit_sites}")
        sampled = self.sampled_per_round
        _require(
            self.min_fit_sites <= sampled,
            "min-fit-sites",
            f"is {self.min_fit_sites} but only {sampled} of {self.num_sites} sites are sampled per round "
            f"(num-sites x fraction-fit): no round could ever be aggregated",
        )
        _require(self.site_wait_seconds > 0, "site-wait-seconds", f"must be > 0, got {self.site_wait_seconds}")
        _require(self.client_cpus >= 1, "client-cpus", f"must be >= 1, got {self.client_cpus}")
        _require(0.0 <= self.client_gpus <= 1.0, "client-gpus", f"must be in [0, 1], got {self.client_gpus}")
        _require(self.sample_every >= 0, "sample-every", f"must be >= 0, got {self.sample_every}")
        _require(
            self.device in DEVICE_CHOICES or self.device.startswith("cuda:"),
            "device",
            f"must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        if self.device.startswith("cuda:"):
            _require(self.device[5:].isdigit(), "device", f"must be cuda:N with N an integer, got {self.device!r}")
        _require(
            self.weighting in ("auto", "examples", "uniform"),
            "weighting",
            f"must be auto, examples or uniform, got {self.weighting!r}",
        )

    @property
    def sampled_per_round(self) -> int:
        """Sites Flower's FedAvg samples per round (the expected number under Poisson sampling)."""
        return max(1, int(self.num_sites * self.fraction_fit))


@dataclass(frozen=True)
class DataConfig:
    """Where site data comes from and how it is split across sites."""

    # Which sources are valid depends on the task (image tasks: digits, npz).
    source: str = "digits"
    path: str = ""
    # Images: dirichlet | iid. Ratings: region (whole zip regions per site) | iid.
    # site: a deployed site's own file, all of it its data (set by its site config).
    partition: str = "dirichlet"
    alpha: float = 0.5
    # Images: the server-held test split. Ratings: the held-out share of each user's ratings.
    test_fraction: float = 0.2
    val_fraction: float = 0.15
    # Every site must keep at least this many training examples after its validation split.
    min_site_size: int = 10
    # Ratings: optional user-attributes CSV (user[,gender][,age][,zip]) beside data.path.
    users_path: str = ""

    def validate(self) -> None:
        _require(self.alpha > 0, "data.alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 < self.test_fraction < 1.0, "data.test-fraction", f"must be in (0, 1), got {self.test_fraction}")
        _require(0.0 < self.val_fraction < 1.0, "data.val-fraction", f"must be in (0, 1), got {self.val_fraction}")
        _require(self.min_site_size >= 2, "data.min-site-size", f"must be >= 2, got {self.min_site_size}")


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each site, per round."""

    local_epochs: float = 1.0
    batch_size: int = 32
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3

    def validate(self) -> None:
        _require(self.local_epochs > 0, "train.local-epochs", f"must be > 0, got {self.local_epochs}")
        _require(self.batch_size >= 1, "train.batch-size", f"must be >= 1, got {self.batch_size}")
        _require(self.optimizer in ("adam", "sgd"), "train.optimizer", f"must be adam or sgd, got {self.optimizer!r}")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")


@dataclass(frozen=True)
class DPConfig:
    """Sample-level DP-SGD at each site (unit of privacy: one training example)."""

    enabled: bool = True
    # fast: privfed's fused per-sample clipping (one backward pass); opacus: Opacus hooks.
    engine: str = "fast"
    noise_multiplier: float = 1.0
    # > 0: derive the noise multiplier so that the whole planned run (rounds x local steps)
    # spends exactly this epsilon; dp.noise-multiplier is then ignored.
    target_epsilon: float = 0.0
    max_grad_norm: float = 1.0
    # 0: auto, min(1e-5, 1/(10 n)) for a site with n training examples.
    delta: float = 0.0
    # An Opacus accountant: rdp | prv. (Opacus's gdp is a CLT approximation that can
    # under-report epsilon, so it is not offered for budgets and ledgers.)
    accountant: str = "rdp"
    # Cumulative epsilon a site may spend; a site whose next round would exceed it stops training.
    epsilon_budget: float = 10.0
    # Opacus secure_mode noise (robust to floating-point attacks; slower).
    secure_rng: bool = False

    def validate(self) -> None:
        _require(self.engine in ("fast", "opacus"), "dp.engine", f"must be fast or opacus, got {self.engine!r}")
        _require(
            self.noise_multiplier >= 0,
            "dp.noise-multiplier",
            f"must be >= 0 (negative noise), got {self.noise_multiplier}",
        )
        _require(
            self.target_epsilon >= 0, "dp.target-epsilon", f"must be >= 0 (negative epsilon), got {self.target_epsilon}"
        )
        _require(self.max_grad_norm > 0, "dp.max-grad-norm", f"must be > 0, got {self.max_grad_norm}")
        _require(
            self.delta == 0 or 0 < self.delta < 1,
            "dp.delta",
            f"must be in (0, 1), or 0 for auto, got {self.delta}",
        )
        _require(self.accountant in ("rdp", "prv"), "dp.accountant", f"must be rdp or prv, got {self.accountant!r}")
        _require(
            self.epsilon_budget > 0, "dp.epsilon-budget", f"must be > 0 (negative epsilon), got {self.epsilon_budget}"
        )
        if self.enabled and self.target_epsilon == 0:
            _require(
                self.noise_multiplier > 0,
                "dp.noise-multiplier",
                "must be > 0 when dp.enabled (zero noise gives no privacy; set dp.enabled=false for a non-private run)",
            )
            _require_sigma("dp.noise-multiplier", self.noise_multiplier)
        _require(
            self.delta == 0 or self.delta >= MIN_DELTA,
            "dp.delta",
            f"must be >= {MIN_DELTA:g} (or 0 for auto), got {self.delta:g}",
        )
        if self.enabled and self.target_epsilon > 0 and math.isfinite(self.epsilon_budget):
            _require(
                self.target_epsilon <= self.epsilon_budget,
                "dp.target-epsilon",
                f"is {self.target_epsilon} but dp.epsilon-budget is {self.epsilon_budget}: the run could never finish",
            )


@dataclass(frozen=True)
class AuditConfig:
    """Empirical privacy checks the server runs in simulation (it needs the sites' data)."""

    # Loss-threshold membership inference at the end of the run.
    mia: bool = True
    # Also every this many rounds (0: only at the end).
    mia_every: int = 0

    def validate(self) -> None:
        _require(self.mia_every >= 0, "audit.mia-every", f"must be >= 0, got {self.mia_every}")


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation with Flower's SecAgg+: the server learns only the sum of the updates.

    Each sampled site splits its masking secrets into ``num-shares`` Shamir shares held by
    its neighbours; ``reconstruction-threshold`` of them recover a dropped site's masks, so
    up to ``num-shares - threshold`` neighbours may drop out, and fewer than ``threshold``
    colluding neighbours learn nothing. Values are clipped to ``clipping-range`` and
    stochastically rounded onto ``quantization-range`` levels (step 2c/Q) before masking.
    """

    enabled: bool = False
    # 0: every sampled site holds a share (classic SecAgg); else odd and >= 3.
    num_shares: int = 0
    # 0: a majority of the shares, num-shares // 2 + 1.
    reconstruction_threshold: int = 0
    clipping_range: float = 8.0
    quantization_range: int = 1 << 22
    modulus_range: int = 1 << 32
    # Seconds to wait for replies at each SecAgg+ stage; 0 waits for every sampled site.
    timeout: float = 0.0

    def validate(self) -> None:
        _require(
            self.num_shares == 0 or (self.num_shares >= 3 and self.num_shares % 2 == 1),
            "secagg.num-shares",
            f"must be 0 (every sampled site) or an odd number >= 3, got {self.num_shares} "
            "(flwr 1.41's SecAgg+ client crashes on an even number of shares)",
        )
        _require(
            self.reconstruction_threshold == 0 or self.reconstruction_threshold >= 2,
            "secagg.reconstruction-threshold",
            f"must be 0 (auto) or >= 2, got {self.reconstruction_threshold}",
        )
        if self.num_shares and self.reconstruction_threshold:
            _require(
                self.reconstruction_threshold < self.num_shares,
                "secagg.reconstruction-threshold",
                f"must be below secagg.num-shares={self.num_shares}, got {self.reconstruction_threshold}",
            )
        _require(self.clipping_range > 0, "secagg.clipping-range", f"must be > 0, got {self.clipping_range}")
        _require(
            self.quantization_range >= 2, "secagg.quantization-range", f"must be >= 2, got {self.quantization_range}"
        )
        _require(
            self.modulus_range > self.quantization_range and self.modulus_range & (self.modulus_range - 1) == 0,
            "secagg.modulus-range",
            f"must be a power of two above secagg.quantization-range={self.quantization_range}, got {self.modulus_range}",
        )
        _require(self.timeout >= 0, "secagg.timeout", f"must be >= 0, got {self.timeout}")

    @property
    def step(self) -> float:
        """Quantization step: each coordinate of a site's update is off by less than this."""
        return 2 * self.clipping_range / self.quantization_range

    def shares_and_threshold(self, sampled: int) -> tuple[int, int]:
        """SecAgg+ (num_shares, threshold) for a round with ``sampled`` sites (>= 3)."""
        shares = sampled if not self.num_shares or self.num_shares >= sampled else self.num_shares
        # Never below a majority: Flower 1.41 has no consistency check, so with 2t <= shares a
        # malicious server could collect both kinds of shares of one site and unmask it.
        threshold = max(self.reconstruction_threshold, shares // 2 + 1)
        return shares, min(threshold, shares - 1)


@dataclass(frozen=True)
class CentralDPConfig:
    """Client-level DP-FedAvg: the unit of privacy is a whole site.

    Each site clips its update to L2 norm ``clip-norm``; the server adds Gaussian noise
    N(0, (noise-multiplier * clip-norm)^2) to the sum and divides by the expected number
    of sampled sites. Sites are sampled by Poisson sampling with rate ``fraction-fit``.
    """

    enabled: bool = False
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    # > 0: derive the noise multiplier so that the planned rounds spend exactly this epsilon.
    target_epsilon: float = 0.0
    # 0: auto, min(1e-5, 1/(10 num-sites)).
    delta: float = 0.0
    epsilon_budget: float = math.inf

    def validate(self) -> None:
        _require(self.clip_norm > 0, "central-dp.clip-norm", f"must be > 0, got {self.clip_norm}")
        _require(self.target_epsilon >= 0, "central-dp.target-epsilon", f"must be >= 0, got {self.target_epsilon}")
        if self.enabled and not self.target_epsilon:
            _require_sigma("central-dp.noise-multiplier", self.noise_multiplier)
        _require(
            self.delta == 0 or MIN_DELTA <= self.delta < 1,
            "central-dp.delta",
            f"must be in [{MIN_DELTA:g}, 1), or 0 for auto, got {self.delta}",
        )
        _require(self.epsilon_budget > 0, "central-dp.epsilon-budget", f"must be > 0, got {self.epsilon_budget}")
        if self.enabled and self.target_epsilon:
            _require(
                self.target_epsilon <= self.epsilon_budget,
                "central-dp.target-epsilon",
                f"is {self.target_epsilon} but central-dp.epsilon-budget is {self.epsilon_budget}: the run could never finish",
            )

    def site_delta(self, num_sites: int) -> float:
        return self.delta or min(1e-5, 1.0 / (10 * num_sites))


@dataclass(frozen=True)
class FaultsConfig:
    """Injected faults for tests and the fault-injection scenarios (simulation only).

    A site drops out at ``dropout-stage``: ``setup`` (SecAgg+ only: before sharing its
    keys), ``train`` (before training: nothing spent),
    ``upload`` (after training, its reply is lost), ``unmask`` (SecAgg+ only: after it sent
    its masked update, before it helps unmask). Sites are picked per round with
    probability ``dropout-rate`` (seeded), or exactly by ``dropout-sites`` ("0,3").
    """

    dropout_rate: float = 0.0
    dropout_stage: str = "upload"
    dropout_sites: str = ""
    # Rounds in which faults happen ("1,2"); empty: every round.
    rounds: str = ""
    # A site crashes (its ClientApp raises) before training, with this probability per round.
    crash_rate: float = 0.0
    # A site sends a corrupted update with this probability per round: NaN values, a wrong
    # shape, or a norm a thousand times too large (corrupt-kinds, picked per event).
    corrupt_rate: float = 0.0
    corrupt_kinds: str = "nan,shape,norm"
    # A site answers this many seconds late (to exercise round-timeout), picked like dropouts.
    delay_rate: float = 0.0
    delay_seconds: float = 0.0

    def validate(self) -> None:
        _require(0 <= self.dropout_rate <= 1, "faults.dropout-rate", f"must be in [0, 1], got {self.dropout_rate}")
        for key, rate in (
            ("crash-rate", self.crash_rate),
            ("corrupt-rate", self.corrupt_rate),
            ("delay-rate", self.delay_rate),
        ):
            _require(0 <= rate <= 1, f"faults.{key}", f"must be in [0, 1], got {rate}")
        _require(self.delay_seconds >= 0, "faults.delay-seconds", f"must be >= 0, got {self.delay_seconds}")
        kinds = [k.strip() for k in self.corrupt_kinds.split(",") if k.strip()]
        _require(
            bool(kinds) and all(k in CORRUPTIONS for k in kinds),
            "faults.corrupt-kinds",
            f"must be a comma-separated subset of {','.join(CORRUPTIONS)}, got {self.corrupt_kinds!r}",
        )
        _require(
            self.dropout_stage in FAULT_STAGES,
            "faults.dropout-stage",
            f"must be one of {', '.join(FAULT_STAGES)}, got {self.dropout_stage!r}",
        )
        for key, text in (("faults.dropout-sites", self.dropout_sites), ("faults.rounds", self.rounds)):
            _require(
                all(part.strip().isdigit() for part in text.split(",")) if text.strip() else True,
                key,
                f'must be comma-separated integers such as "0,3", got {text!r}',
            )

    def event(self, seed: int, site_index: int, server_round: int, kind: str, rate: float) -> bool:
        """Whether a seeded fault of ``kind`` (crash, corrupt, delay) hits this site this round."""
        if rate <= 0 or (self.rounds.strip() and server_round not in _ints(self.rounds)):
            return False
        u = np.random.default_rng([seed, site_index, server_round, 0xFB, sum(map(ord, kind))]).random()
        return bool(u < rate)

    def corruption(self, seed: int, site_index: int, server_round: int) -> str:
        """Which corruption a corrupted update gets (seeded, among corrupt-kinds)."""
        kinds = [k.strip() for k in self.corrupt_kinds.split(",") if k.strip()]
        return kinds[int(np.random.default_rng([seed, site_index, server_round, 0xFC]).integers(len(kinds)))]

    def drops(self, seed: int, site_index: int, server_round: int, stage: str) -> bool:
        """Whether this site drops out at ``stage`` of ``server_round`` (deterministic)."""
        if stage != self.dropout_stage or (self.rounds.strip() and server_round not in _ints(self.rounds)):
            return False
        if self.dropout_sites.strip():
            return site_index in _ints(self.dropout_sites)
        if self.dropout_rate <= 0:
            return False
        u = np.random.default_rng([seed, site_index, server_round, 0xFA]).random()
        return bool(u < self.dropout_rate)


@dataclass(frozen=True)
class FairnessConfig:
    """Fairness interventions, each a switch that is off by default (docs/FAIRNESS.md, "Bias corrections")."""

    # Recommender: none | group-offset (a gender x item offset trained inside DP-SGD).
    recsys_correction: str = "none"
    # Decay of the offset table after every local step, b <- b / (1 + lr * lambda): offsets
    # without a consistent signal (rare cells, DP noise) fade to 0. 0 = no decay.
    recsys_lambda: float = 0.1
    # Generators: class proportions of generated samples: none (labels cycled evenly, no
    # correction) | uniform | real (from the sites' summed class counts).
    gan_class_target: str = "none"

    def validate(self) -> None:
        _require(
            self.recsys_correction in RECSYS_CORRECTIONS,
            "fairness.recsys-correction",
            f"must be one of {', '.join(RECSYS_CORRECTIONS)}, got {self.recsys_correction!r}",
        )
        _require(self.recsys_lambda >= 0, "fairness.recsys-lambda", f"must be >= 0, got {self.recsys_lambda}")
        _require(
            self.gan_class_target in GAN_CLASS_TARGETS,
            "fairness.gan-class-target",
            f"must be one of {', '.join(GAN_CLASS_TARGETS)}, got {self.gan_class_target!r}",
        )


RECSYS_CORRECTIONS = ("none", "group-offset")
GAN_CLASS_TARGETS = ("none", "uniform", "real")


FAULT_STAGES = ("setup", "train", "upload", "unmask")
AGGREGATIONS = ("fedavg", "trimmed-mean", "krum", "multi-krum", "q-fedavg")
CORRUPTIONS = ("nan", "shape", "norm")
# Fewest updates a secure sum may hold: with 2, each site learns the other's update.
MIN_SECURE_SITES = 3


def _ints(text: str) -> set[int]:
    return {int(p) for p in text.split(",") if p.strip()}


# Section prefix -> (RunConfig field, dataclass).
SECTIONS: dict[str, tuple[str, type]] = {
    "data": ("data", DataConfig),
    "train": ("train", TrainConfig),
    "dp": ("dp", DPConfig),
    "audit": ("audit", AuditConfig),
    "secagg": ("secagg", SecAggConfig),
    "central-dp": ("central_dp", CentralDPConfig),
    "faults": ("faults", FaultsConfig),
    "fairness": ("fairness", FairnessConfig),
}


@dataclass(frozen=True)
class RunConfig:
    """The whole, validated configuration of a run."""

    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    # The task plug-in's own dataclass (e.g. VAEConfig), under the task's name.
    task_params: Any = None

    # Convenience accessors for the keys everything reads.
    @property
    def task(self) -> str:
        return self.federation.task

    @property
    def scenario(self) -> str:
        return self.federation.scenario

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Parse and validate a flat ``{key: value}`` mapping; unknown keys are errors."""
        from common.tasks import get_task  # tasks import config; import lazily

        flat = dict(flat)
        task_name = flat.get("task", FederationConfig.task)
        task_cls = get_task(str(task_name))  # ConfigError naming 'task' if unknown
        sections: dict[str, type] = {
            "": FederationConfig,
            **{prefix: cls for prefix, (_, cls) in SECTIONS.items()},
            task_cls.name: task_cls.config_cls,
        }

        buckets: dict[str, dict[str, Any]] = {name: {} for name in sections}
        for key, value in flat.items():
            section, _, leaf = key.rpartition(".")
            if section not in sections:
                raise ConfigError(key, f"unknown key{_suggest(key, sections)}")
            known = {_key(f.name): f for f in fields(sections[section])}
            if leaf not in known:
                raise ConfigError(key, f"unknown key{_suggest(key, sections)}")
            buckets[section][known[leaf].name] = coerce(key, value, known[leaf])

        built = {name: sections[name](**values) for name, values in buckets.items()}
        cfg = cls(
            federation=built[""],
            task_params=built[task_cls.name],
            **{name: built[prefix] for prefix, (name, _) in SECTIONS.items()},
        )
        for part in (cfg.federation, *(getattr(cfg, name) for name, _ in SECTIONS.values()), cfg.task_params):
            part.validate()
        _check_secure(cfg)
        _require(
            cfg.federation.aggregation != "q-fedavg" or task_cls.site_primary_loss,
            "aggregation",
            f"q-fedavg weighs sites by their validation {task_cls.primary_metric}, which task {task_cls.name!r} does not get from its sites",
        )
        _require(
            cfg.data.source in task_cls.data_sources,
            "data.source",
            f"must be one of {', '.join(task_cls.data_sources)} for task {task_cls.name!r}, got {cfg.data.source!r}",
        )
        _require(
            cfg.data.partition in task_cls.partitions,
            "data.partition",
            f"must be one of {', '.join(task_cls.partitions)} for task {task_cls.name!r}, got {cfg.data.partition!r}",
        )
        return cfg

    def to_flat(self) -> dict[str, Any]:
        """All keys, defaults included: the form Flower's run_config and the run dir store."""
        out: dict[str, Any] = {}
        parts = [("", self.federation), *((prefix, getattr(self, name)) for prefix, (name, _) in SECTIONS.items())]
        if self.task_params is not None:
            parts.append((self.task, self.task_params))
        for prefix, obj in parts:
            for f in fields(obj):
                key = _key(f.name) if not prefix else f"{prefix}.{_key(f.name)}"
                out[key] = getattr(obj, f.name)
        return out

    def to_nested(self) -> dict[str, Any]:
        """The flat keys regrouped into TOML tables (for the resolved config file)."""
        nested: dict[str, Any] = {}
        for key, value in self.to_flat().items():
            section, _, leaf = key.rpartition(".")
            (nested.setdefault(section, {}) if section else nested)[leaf] = value
        return nested

    @property
    def uniform_weights(self) -> bool:
        """Whether the aggregate weighs every site equally (see FederationConfig.weighting)."""
        w = self.federation.weighting
        return w == "uniform" or (w == "auto" and (self.secagg.enabled or self.central_dp.enabled))

    @property
    def qffl_lipschitz(self) -> float:
        """L of q-fedavg: federation.qffl-lipschitz, or 1 / train.lr when 0 (the paper's choice)."""
        return self.federation.qffl_lipschitz or 1.0 / self.train.lr

    def replace(self, **federation_changes: Any) -> RunConfig:
        return dataclasses.replace(self, federation=dataclasses.replace(self.federation, **federation_changes))


def _check_secure(cfg: RunConfig) -> None:
    """Settings of secure aggregation and central DP that only make sense together."""
    fed, sa, cdp = cfg.federation, cfg.secagg, cfg.central_dp
    if fed.aggregation != "fedavg":
        # Robust rules and q-fedavg need each update in the clear (q-fedavg also each
        # site's loss), and their sensitivity is not the sum's: neither SecAgg+ (the
        # server sees only the sum) nor central DP fits.
        _require(
            not sa.enabled,
            "aggregation",
            f"{fed.aggregation} needs each site's update; under secure aggregation the server sees only their sum",
        )
        _require(
            not cdp.enabled,
            "aggregation",
            f"{fed.aggregation} is not covered by the central-DP analysis, which assumes a noised sum",
        )
    if sa.enabled:
        _require(
            cfg.faults.corrupt_rate == 0,
            "faults.corrupt-rate",
            "cannot be used with secure aggregation: a corrupted masked update cannot be seen or removed (SecAgg+ assumes sites follow the protocol)",
        )
        _require(
            fed.weighting != "examples",
            "weighting",
            "must be uniform or auto under secure aggregation: SecAgg+ quantizes with a fixed absolute step, "
            "so scaling updates by small example weights would lose their precision",
        )
        # Poisson sampling (central DP) can take every site in a round.
        most = fed.num_sites if cdp.enabled else fed.sampled_per_round
        _require(
            fed.sampled_per_round >= 3,
            "fraction-fit",
            f"samples {fed.sampled_per_round} site(s) per round; secure aggregation needs >= 3 "
            "(with 2, each site learns the other's update from the sum)",
        )
        if not cdp.enabled and sa.num_shares:
            _require(
                sa.num_shares <= most,
                "secagg.num-shares",
                f"is {sa.num_shares} but only {most} sites are sampled per round",
            )
        if sa.reconstruction_threshold:
            _require(
                sa.reconstruction_threshold < min(sa.num_shares or most, most),
                "secagg.reconstruction-threshold",
                f"is {sa.reconstruction_threshold} but a round has only {min(sa.num_shares or most, most)} shares "
                "per site: no dropout could be tolerated and the protocol refuses it",
            )
        _require(
            most * sa.quantization_range < sa.modulus_range,
            "secagg.modulus-range",
            f"is {sa.modulus_range} but {most} sites x quantization-range {sa.quantization_range} can exceed it: "
            "the masked sum would wrap around",
        )
    if cdp.enabled:
        flip = all_or_nothing_probability(cfg)
        delta = cdp.site_delta(fed.num_sites)
        _require(
            flip <= delta,
            "fraction-fit",
            f"with num-sites={fed.num_sites} and fraction-fit={fed.fraction_fit:g}, one site decides with probability "
            f"{flip:.2g} over {fed.rounds} rounds whether a round's sum is released at all (a round needs "
            f"{min_round_sites(cfg)} sites); that must stay below central-dp delta={delta:.2g}: sample more sites",
        )
        _require(
            cfg.uniform_weights,
            "weighting",
            "must be uniform or auto with central DP (each site's weight is bounded by clip-norm)",
        )
        if sa.enabled:
            _require(
                cdp.clip_norm <= sa.clipping_range,
                "central-dp.clip-norm",
                f"is {cdp.clip_norm} but secagg.clipping-range is {sa.clipping_range}: clipped updates would be clipped again, per coordinate",
            )


def min_round_sites(cfg: RunConfig) -> int:
    """Fewest sites whose updates a round will aggregate (fewer: the round releases no sum)."""
    return max(cfg.federation.min_fit_sites, MIN_SECURE_SITES if cfg.secagg.enabled else 1)


def all_or_nothing_probability(cfg: RunConfig) -> float:
    """Probability, over the run, that one site's presence decides whether a round's sum is released.

    Under Poisson sampling with a minimum of m sites per round, adding a site to a sample
    of exactly m - 1 others turns "no sum" into a sum of m updates: sensitivity m C, not
    C. That happens with probability P(Bin(N - 1, q) = m - 1) per round; outside it each
    round is the accounted Gaussian mechanism, so the run is (eps, delta + this)-DP.
    With m = 1 there is no such event: an empty round still releases the noise.
    """
    m = min_round_sites(cfg)
    n, q = cfg.federation.num_sites - 1, cfg.federation.fraction_fit
    if m <= 1 or m - 1 > n:
        return 0.0
    p = math.comb(n, m - 1) * q ** (m - 1) * (1 - q) ** (n - m + 1)
    return min(1.0, cfg.federation.rounds * p)


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"dp": {"delta": 1e-5}}`` -> ``{"dp.delta": 1e-5}`` (how Flower flattens run config tables)."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` command-line override; the value is read as a TOML literal."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(text, "override must look like key=value")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as dp.engine=opacus
    return key, value


def coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Check a value against the field's declared type; ints widen to floats."""
    expected = f.type if isinstance(f.type, str) else f.type.__name__
    if expected == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, float),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }.get(expected, True)
    if not ok:
        raise ConfigError(key, f"must be {expected}, got {value!r} ({type(value).__name__})")
    if expected == "float" and math.isnan(value):
        raise ConfigError(key, "must be a number, got nan")
    if expected == "float" and math.isinf(value) and key not in _INFINITY_OK:
        raise ConfigError(key, f"must be finite, got {value}")
    return value


# Keys where infinity means "no limit".
_INFINITY_OK = {"dp.epsilon-budget", "central-dp.epsilon-budget"}


def _suggest(key: str, sections: Mapping[str, type]) -> str:
    known = [(f"{s}.{_key(f.name)}" if s else _key(f.name)) for s, cls in sections.items() for f in fields(cls)]
    close = [k for k in known if k.startswith(key)] or difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _require_sigma(key: str, sigma: float) -> None:
    lo, hi = SIGMA_RANGE
    _require(
        lo <= sigma <= hi,
        key,
        f"must be in [{lo:g}, {hi:g}] (outside it the accountants cannot compute epsilon), got {sigma:g}",
    )


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)
