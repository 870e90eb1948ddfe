"""Loss-threshold membership inference (Yeom et al., 2018): an empirical check of the claimed ε.

:func:`membership_inference` scores every example by its loss under the global model and
asks how well that separates the sites' training examples (members) from the server-held
test split (non-members). It reports AUC and the best advantage max(TPR - FPR), next to
what the claimed (eps, delta) allows: (eps, delta)-DP implies TPR <= e^eps * FPR + delta
and 1 - FPR <= e^eps * (1 - TPR) + delta, hence advantage <= (e^eps - 1 + 2 delta) / (e^eps + 1).
An empirical advantage above that bound would mean the claim is false; one below it
proves nothing (the attack may just be weak). Simulation only: it needs the sites' data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from common.data.arrays import ArrayData, to_device
from common.privacy.accounting import NO_DP
from common.tasks import Task
from server.ledger import LedgerRow


def advantage_bound(eps: float, delta: float) -> float:
    """Largest TPR - FPR any membership test can reach against an (eps, delta)-DP release."""
    if math.isinf(eps):
        return 1.0
    r = math.exp(-eps)  # (e^eps - 1 + 2 delta) / (e^eps + 1), without overflow for large eps
    return min(1.0, (1 - r + 2 * delta * r) / (1 + r))


@dataclass(frozen=True)
class MIAResult:
    auc: float
    advantage: float
    members: int
    non_members: int

    def as_metrics(self, eps: float, delta: float) -> dict[str, float]:
        return {
            "mia_auc": self.auc,
            "mia_advantage": self.advantage,
            "mia_advantage_bound": advantage_bound(eps, delta),
            "mia_eps": eps,
            "mia_delta": delta,
            "mia_examples": float(self.members + self.non_members),
            # Advantage a coin-flip attack exceeds only 5% of the time on this many examples
            # (two-sample Kolmogorov-Smirnov critical value): below it, nothing was detected.
            "mia_chance_advantage": 1.36 * math.sqrt(2.0 / self.members),
        }


def violates_bound(m: dict[str, float]) -> bool:
    """True when the measured advantage exceeds the DP bound by more than sampling error.

    The advantage is an in-sample maximum over thresholds, so even an attack with no
    information exceeds a small bound often; only advantage > bound + chance level is
    evidence against the claimed epsilon."""
    return m["mia_advantage"] > m["mia_advantage_bound"] + m.get("mia_chance_advantage", 0.0)


def mia_for_run(task: Task, model: torch.nn.Module, rows: list[LedgerRow], seed: int) -> dict[str, float]:
    """The attack on ``model``, with the bound implied by the largest epsilon spent so far."""
    private = [r for r in rows if r.accountant != NO_DP]
    eps = max((r.eps_total for r in private), default=math.inf) if private else math.inf
    delta = max((r.delta for r in private), default=0.0)
    return membership_inference(task, model, seed).as_metrics(eps, delta)


@torch.no_grad()
def membership_inference(task: Task, model: torch.nn.Module, seed: int = 0) -> MIAResult:
    """Loss-threshold attack: members = sites' training examples, non-members = test split.

    Both sets are subsampled to the same size so that AUC and advantage are not driven by
    class balance.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    test = task.server_test_data()
    if test is None:
        raise ValueError("membership inference needs the server-held test split (simulation only)")
    sites = [task.site_data(i)[0] for i in range(task.cfg.federation.num_sites)]
    site_labels = []
    if sites[0].y is not None:
        for s in sites:
            # One dataset split across the sites: all are labelled when the first is.
            assert s.y is not None
            site_labels.append(s.y)
    members = ArrayData(torch.cat([s.x for s in sites]), torch.cat(site_labels) if site_labels else None)
    rng = np.random.default_rng(seed)
    k = min(len(members), len(test))
    m_idx, n_idx = rng.choice(len(members), k, replace=False), rng.choice(len(test), k, replace=False)
    device = next(model.parameters()).device
    model.eval()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # seeded reparameterisation noise: the attack is repeatable
        loss_in = task.per_sample_loss(model, to_device(members.subset(m_idx), device)).cpu().numpy()
        loss_out = task.per_sample_loss(model, to_device(test.subset(n_idx), device)).cpu().numpy()
    model.train()
    labels = np.concatenate([np.ones(k), np.zeros(k)])
    scores = -np.concatenate([loss_in, loss_out])  # lower loss: more likely a member
    fpr, tpr, _ = roc_curve(labels, scores)
    return MIAResult(
        auc=float(roc_auc_score(labels, scores)), advantage=float(np.max(tpr - fpr)), members=k, non_members=k
    )
