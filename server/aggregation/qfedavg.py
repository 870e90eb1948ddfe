"""q-FedAvg: fair aggregation of site updates (q-FFL).

Li, Sanjabi, Beirami & Smith, "Fair Resource Allocation in Federated Learning", ICLR 2020.
q-FFL minimises ``f_q(w) = sum_k p_k F_k(w)^(q+1) / (q+1)``: the larger q, the more a site
with a high loss ``F_k`` counts, so the spread of the sites' losses shrinks; q = 0 is the
FedAvg objective. One round of q-FedAvg (the paper's Algorithm 2), with the sites' updates
``u_k = w_k - w^t`` (what privfed's sites send) and L the inverse step size:

    dw_k    = L (w^t - w_k) = -L u_k
    Delta_k = F_k^q dw_k
    h_k     = q F_k^(q-1) ||dw_k||^2 + L F_k^q
    w^(t+1) = w^t - sum_k p_k Delta_k / sum_k p_k h_k

``p_k`` are the run's site weights (example counts, or 1 each): the paper samples sites
with probability p_k and sums the sampled ones unweighted, which has the same expectation;
weighting the sum keeps q = 0 exactly the run's FedAvg step, ``sum_k p_k u_k / sum_k p_k``.

F_k is the site's loss under the current global model w^t. privfed takes it from the
site's previous evaluate reply (validation value of the task's primary metric, computed
on w^t), never from a new training loss, which under DP stays at the site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.server.strategy.aggregate import aggregate_qffl

from server.aggregation.base import Aggregation, RoundInputs, Staged, Usable, as_model_dtypes, register_aggregation
from server.aggregation.fedavg import weighted_sum


def qffl_step(
    updates: Sequence[Sequence[np.ndarray]],
    losses: Sequence[float],
    q: float,
    lipschitz: float,
    weights: Sequence[float] | None = None,
) -> list[np.ndarray]:
    """The q-FedAvg step ``w^(t+1) - w^t`` (float64 arrays) for the sites' updates and losses.

    See the module docstring for the formula. ``losses`` must be finite and > 0.
    """
    if not updates or len(updates) != len(losses):
        raise ValueError(f"need one loss per update, got {len(updates)} updates and {len(losses)} losses")
    if q < 0 or not lipschitz > 0:
        raise ValueError(f"need q >= 0 and L > 0, got q={q}, L={lipschitz}")
    f = np.asarray(losses, dtype=np.float64)
    if not (np.isfinite(f).all() and (f > 0).all()):
        raise ValueError(f"site losses must be finite and > 0, got {f.tolist()}")
    p = np.ones(len(f)) if weights is None else np.asarray(weights, dtype=np.float64)
    # Dividing every Delta_k and h_k by (max F)^q leaves the step unchanged and keeps
    # F^q finite for large losses or q (FID-sized losses at q = 100 would overflow).
    top = float(f.max())
    r = f / top
    deltas, hs = [], []
    for u, r_k, p_k in zip(updates, r, p):
        sq = sum(float(np.sum(np.square(a, dtype=np.float64))) for a in u)  # ||u_k||^2
        deltas.append([-lipschitz * p_k * r_k**q * np.asarray(a, dtype=np.float64) for a in u])
        # q * F^(q-1) ||dw||^2 / top^q = q r^(q-1) L^2 ||u||^2 / top; the term is 0 at q = 0.
        grad_term = q * r_k ** (q - 1) * lipschitz**2 * sq / top if q > 0 else 0.0
        hs.append(p_k * (grad_term + lipschitz * r_k**q))
    # Flower's aggregate_qffl returns parameters - sum Delta / sum h; from zero parameters
    # that is the step itself.
    zeros = [np.zeros_like(a, dtype=np.float64) for a in deltas[0]]
    return aggregate_qffl(zeros, deltas, hs)


def site_losses(
    sites: Sequence[str], site_val: Mapping[int, Mapping[str, Mapping[str, float]]], before: int, metric: str
) -> dict[str, float]:
    """Each site's most recent validation ``metric`` from the rounds before ``before``.

    ``site_val`` is ``{round: {site: metrics}}`` (the strategy's records). Sites without a
    finite, positive value are left out; the caller decides what they get.
    """
    out: dict[str, float] = {}
    for rnd in sorted((r for r in site_val if r < before), reverse=True):
        for site in sites:
            value = site_val[rnd].get(site, {}).get(metric)
            if site not in out and isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                out[site] = float(value)
        if len(out) == len(sites):
            break
    return out


@register_aggregation("q-fedavg")
class QFedAvg(Aggregation):
    """q-FedAvg, with each site's loss F_k from its last evaluate reply.

    Under DP a site never sends a fresh training loss, so F_k is its validation value of
    the primary metric on the model it trained from (the previous round's evaluation),
    or its latest earlier one. A site that never reported a finite positive value gets
    the mean of the others'; with none known (round 1) the round is the run's FedAvg.
    """

    def aggregate(self, sites: list[str], usable: Usable, inputs: RoundInputs) -> tuple[Staged | None, str]:
        known = site_losses(sites, inputs.site_val, inputs.round, inputs.primary_metric)
        if not known:
            return weighted_sum(sites, usable, inputs.global_arrays), ""
        fill = sum(known.values()) / len(known)
        step = qffl_step(
            [usable[s][0] for s in sites],
            [known.get(s, fill) for s in sites],
            self.cfg.federation.qffl_q,
            self.cfg.qffl_lipschitz,
            [usable[s][1] for s in sites],
        )
        return Staged(sites, as_model_dtypes(step, inputs.global_arrays), 1.0), ""
