"""The run-config sections: one frozen dataclass per table, each validating its own keys.

A section knows nothing of other sections (cross-section rules: :mod:`common.config.rules`)
nor of tasks (a task's table is the task plug-in's own dataclass). Field names map to keys
by ``_`` -> ``-`` (``noise_multiplier`` -> ``dp.noise-multiplier``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config.limits import (
    AGGREGATIONS,
    BACKENDS,
    CORRUPTIONS,
    DEVICE_CHOICES,
    FAULT_STAGES,
    MIN_DELTA,
    auto_delta,
)
from common.config.limits import require as _require
from common.config.limits import require_sigma as _require_sigma


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
    # The server serves (evaluates, samples, reports as final) an exponential moving average
    # of the global models with this decay: served = d * served + (1 - d) * global after
    # each round that changed the model. 0: the global model itself. Post-processing of the
    # rounds' releases (no privacy cost); the sites train from the global model
    # (server/averaging.py).
    ema_decay: float = 0.0
    # Server-side evaluation on the held-out test split (simulation only).
    central_eval: bool = True
    # How long the server waits for all num-sites sites to connect before it gives up.
    site_wait_seconds: float = 300.0
    # Simulation only: CPU cores and GPU fraction reserved for each virtual site.
    client_cpus: int = 1
    client_gpus: float = 0.0
    # Simulation only (privfed simulate): where the virtual sites run. ray: Flower's Ray
    # workers, sites in parallel, one per client-cpus share of the cores. in-process: in the
    # launcher's own process, one message at a time, no Ray (nothing to start: about 10 s
    # sooner on a 2-core machine; for small runs and debugging). Same messages, same results.
    backend: str = "ray"
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
    # Seconds each wait of a round (the fit replies, then the evaluate replies) lasts; a site
    # that has not answered by then is left out of that round, not the run (it may join the
    # next). 0: no limit, which only a simulation may use: a deployment refuses it
    # (common.config.rules.check_deployment), since one silent site would hang the federation.
    # 900 s: a round of the deployed models on a CPU site takes ~20-30 s, so only a site
    # some 30 times slower than that, or gone, is dropped.
    round_timeout: float = 900.0
    # A declaration about the federation's people, for the report only: no person has
    # records at more than this many sites (0: undeclared, so any person may be at every
    # site). Under dp.unit = user the report shows a person's worst-case epsilon composed
    # over that many sites (docs/PRIVACY.md, "The same person at several sites").
    max_sites_per_person: int = 0
    # Continue the run in run-dir from its last checkpoint (`privfed resume RUN_DIR`).
    resume: bool = False
    # The federation registry (common.deploy.registry): each site's Ed25519 public key and
    # declared size; the server trusts a reply's site id only when that key signed it.
    # Empty in a simulation: the launcher writes RUN_DIR/registry.toml for its virtual sites.
    registry: str = ""
    # The coordinator's Ed25519 private key (PEM), which signs ledger heads and receipts.
    # A path on the server's machine; simulation: RUN_DIR/keys/server.key.
    server_key: str = ""

    def validate(self) -> None:
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _require(
            self.aggregation in AGGREGATIONS,
            "aggregation",
            f"must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}",
        )
        _require(0 <= self.ema_decay < 1, "ema-decay", f"must be in [0, 1) (0: off), got {self.ema_decay}")
        _require(
            not (self.ema_decay > 0 and self.aggregation == "q-fedavg"),
            "ema-decay",
            "must be 0 with aggregation = q-fedavg: its site losses must be those of the model the sites train "
            "from, and under ema-decay the sites evaluate the average",
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
        _require(
            self.round_timeout >= 0,
            "round-timeout",
            f"must be >= 0 (0: no limit, simulation only), got {self.round_timeout}",
        )
        _require(self.num_sites >= 1, "num-sites", f"must be >= 1, got {self.num_sites}")
        _require(
            self.max_sites_per_person >= 0,
            "max-sites-per-person",
            f"must be >= 0 (0: undeclared), got {self.max_sites_per_person}",
        )
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
        _require(self.backend in BACKENDS, "backend", f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
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


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, server_round: int, rounds: int) -> float:
    """The multiplier of train.lr in round ``server_round`` (1-based) of ``rounds``."""
    if schedule == "constant" or rounds <= 0:
        return 1.0
    r = min(max(server_round, 1), rounds)
    return 0.5 * (1.0 + math.cos(math.pi * (r - 1) / rounds))


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each site, per round."""

    local_epochs: float = 1.0
    batch_size: int = 32
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    # constant, or cosine: round r of R trains at lr * (1 + cos(pi (r - 1) / R)) / 2, a
    # data-independent schedule (under DP the late rounds average the noise instead of
    # taking full steps of it).
    lr_schedule: str = "constant"
    # Keep the DP-trained optimiser's per-parameter state (Adam's moments and step count)
    # at the site from one round to the next instead of starting it fresh every round.
    # Post-processing of the noised gradients, never sent (docs/PRIVACY.md); no privacy cost.
    # SGD (no momentum) has no state, so the flag changes nothing there.
    keep_optimizer_state: bool = False
    # Decoupled weight decay (AdamW; for SGD the same map): each step of the DP-trained
    # optimiser is p <- (1 - lr x weight-decay) p - lr u (the round's lr, u the usual update
    # from the noised gradient). The decay term is a fixed map of weights DP-SGD already
    # released, so post-processing (docs/PRIVACY.md); it shrinks the coordinates whose noised
    # gradient carries no signal (rare items) instead of letting them random-walk. Tasks
    # exempt what must not shrink (Task.no_decay_parameters).
    weight_decay: float = 0.0

    def validate(self) -> None:
        _require(self.local_epochs > 0, "train.local-epochs", f"must be > 0, got {self.local_epochs}")
        _require(self.batch_size >= 1, "train.batch-size", f"must be >= 1, got {self.batch_size}")
        _require(self.optimizer in ("adam", "sgd"), "train.optimizer", f"must be adam or sgd, got {self.optimizer!r}")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        # Below 1 / lr, so that a step's factor 1 - lr x weight-decay stays positive (NaN fails too).
        _require(
            0 <= self.weight_decay < 1 / self.lr,
            "train.weight-decay",
            f"must be >= 0 and below 1 / train.lr = {1 / self.lr:g}, got {self.weight_decay}",
        )
        _require(
            self.lr_schedule in LR_SCHEDULES,
            "train.lr-schedule",
            f"must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}",
        )


# dp.unit: one training record, or all of one person's records (user-level DP).
RECORD_UNIT, USER_UNIT = "record", "user"
DP_UNITS = (RECORD_UNIT, USER_UNIT)
# The most records of one person in a step: a linear layer's per-person Gram buffers hold
# persons x cap^2 numbers, so a coordinator's huge cap must not exhaust a site's memory.
MAX_RECORDS_PER_USER = 1024


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD at each site; the unit of privacy is one training record, or one person (``unit``)."""

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
    # Every noise and sampling generator seeded from OS entropy, and Opacus's secure_mode
    # noise (robust to floating-point attacks). On by default: seeded noise can be removed by
    # anyone who knows federation.seed. Only the simulation launcher turns it off, for
    # reproducible runs, and a deployed site refuses that unless its own node config
    # allows it (allow-seeded-noise; docs/PRIVACY.md).
    secure_rng: bool = True
    # The unit of privacy: record (one training record: an image, a rating, a row) or user
    # (all of one person's records, for data with a person key: sampled, clipped and
    # accounted per person; docs/PRIVACY.md, "User-level DP").
    unit: str = "record"
    # dp.unit = user: at most this many of a person's records enter one step's gradient,
    # and at most this many of their held-out records enter an evaluation sum. It bounds
    # the work and the evaluation's sensitivity; the training guarantee does not depend on
    # it (a person's whole gradient is clipped to dp.max-grad-norm).
    max_records_per_user: int = 32

    def validate(self) -> None:
        _require(self.engine in ("fast", "opacus"), "dp.engine", f"must be fast or opacus, got {self.engine!r}")
        _require(self.unit in DP_UNITS, "dp.unit", f"must be one of {', '.join(DP_UNITS)}, got {self.unit!r}")
        _require(
            1 <= self.max_records_per_user <= MAX_RECORDS_PER_USER,
            "dp.max-records-per-user",
            f"must be in [1, {MAX_RECORDS_PER_USER}] (each sampled person contributes up to this many records; "
            f"the engine's per-person buffers grow with its square), got {self.max_records_per_user}",
        )
        _require(
            not (self.enabled and self.unit == USER_UNIT and self.engine == "opacus"),
            "dp.engine",
            "is opacus, which clips per example and has no user-level clipping; dp.unit = user needs dp.engine = fast",
        )
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
    # Seconds to wait for replies at each SecAgg+ stage; a site that has not answered is
    # dropped from the protocol (its share is reconstructed if enough remain). 0 waits for
    # every sampled site, which a deployment refuses (common.config.rules.check_deployment).
    # 900 s, as round-timeout: the masked training stage takes a round's time (~20-30 s on a CPU site).
    timeout: float = 900.0

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
            f"must be a power of two above secagg.quantization-range={self.quantization_range}, "
            f"got {self.modulus_range}",
        )
        _require(
            self.timeout >= 0, "secagg.timeout", f"must be >= 0 (0: no limit, simulation only), got {self.timeout}"
        )

    @property
    def step(self) -> float:
        """Quantization step: each coordinate of a site's update is off by less than this."""
        return 2 * self.clipping_range / self.quantization_range


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
                f"is {self.target_epsilon} but central-dp.epsilon-budget is {self.epsilon_budget}: "
                "the run could never finish",
            )

    def site_delta(self, num_sites: int) -> float:
        return self.delta or auto_delta(num_sites)


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


@dataclass(frozen=True)
class MetricsConfig:
    """Private metrics: Gaussian noise on every statistic a site releases per round.

    With ``dp`` on (the default, for deployments; the simulation launcher turns it off
    unless a scenario or override sets it), a site adds N(0, (noise-multiplier * Delta *
    b_k)^2) to each released sum k (b_k: one record's largest contribution to it, Delta:
    the square root of how many sums one record can touch) and charges the release to its
    ledger as its own row (``common.privacy.metrics_dp``). ``loss-bound`` clips each
    validation record's contribution before it is summed, in the task's unit: VAE: neg
    ELBO, reconstruction NLL and KL in nats (0: 100); recommender: the absolute error of a
    prediction in rating points (0: the rating scale's width, which clips nothing). A
    smaller bound means less noise and a (downward) bias on large errors.
    """

    dp: bool = True
    noise_multiplier: float = 10.0
    loss_bound: float = 0.0

    def validate(self) -> None:
        if self.dp:
            _require_sigma("metrics.noise-multiplier", self.noise_multiplier)
        _require(
            math.isfinite(self.loss_bound) and self.loss_bound >= 0,
            "metrics.loss-bound",
            f"must be a finite number > 0, or 0 for the task's default, got {self.loss_bound}",
        )
