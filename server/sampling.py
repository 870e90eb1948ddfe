"""Which sites a round asks to train: Poisson sampling for client-level DP, and SecAgg+'s minimum.

Client-level DP's accountant assumes each site is sampled independently with probability
q (``fraction-fit``), so Flower's fixed-count sampler is replaced by Poisson sampling. The
sample is seeded per round like the noise (a known sample weakens amplification, so
``dp.secure-rng`` takes OS entropy instead).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from flwr.common import FitIns, Parameters

from common.config import MIN_SECURE_SITES, RunConfig
from common.seeds import site_sampling_rng

RngSource = random.Random | Callable[[int], random.Random]


def sampling_rng(cfg: RunConfig, rnd: int) -> random.Random:
    """Poisson site sampling of one round: seeded like the noise (a known sample weakens amplification)."""
    if cfg.dp.secure_rng:
        return random.Random()
    return site_sampling_rng(cfg.federation.seed, rnd)


def poisson_sample(
    client_manager: Any, rnd: int, q: float, rng: RngSource, parameters: Parameters, config: dict[str, Any]
) -> list[tuple[Any, FitIns]]:
    """Each site independently with probability q, in site-id order (the sampling the accountant assumes)."""
    clients = client_manager.all()
    r = rng(rnd) if callable(rng) else rng
    chosen = [clients[cid] for cid in sorted(clients) if r.random() < q]
    return [(c, FitIns(parameters, config)) for c in chosen]


def secure_minimum(instructions: list[Any], failures: list[str]) -> list[Any]:
    """A SecAgg+ round needs MIN_SECURE_SITES sites; with fewer (but some) it is not run."""
    if 0 < len(instructions) < MIN_SECURE_SITES:
        failures.append(f"only {len(instructions)} site(s) sampled; a secure round needs at least {MIN_SECURE_SITES}")
        return []
    return instructions
