"""Add/remove vs replace-one epsilon at the same noise (issue 18, finding 2).

``python -m simulations.neighbouring_table`` prints, for the issue's two sites, the ledger's
epsilon (Opacus RDP, add or remove one example) beside dp-accounting's PLD epsilon for both
relations. Before the declared size n-hat, each site's exact n reached the server, so the
honest relation was replace-one and the ledger under-stated epsilon about twofold; with q,
steps, delta, sigma and the weights derived from a public n-hat, add/remove holds and the
ledger's number is the claim (docs/PRIVACY.md, "Dataset sizes are public by declaration").
"""

from __future__ import annotations

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation

from common.privacy.accounting import epsilon

DELTA = 1e-5
# (n, batch size, sigma, steps) of the table: q = B / n.
SITES = ((180, 32, 1.744, 180), (2000, 64, 1.389, 960))


def pld_epsilon(q: float, sigma: float, steps: int, relation: NeighboringRelation) -> float:
    """dp-accounting's PLD epsilon of ``steps`` Poisson-subsampled Gaussian steps."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    acc = PLDAccountant(relation)
    acc.compose(event)
    return float(acc.get_epsilon(DELTA))


def table() -> str:
    lines = [
        f"ε at δ = {DELTA:g}, same σ, q and steps for both relations",
        "",
        "| n | q | σ | steps | ledger ε (Opacus RDP, add/remove) | PLD add/remove | PLD replace-one | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, batch, sigma, steps in SITES:
        q = batch / n
        ledger = epsilon([(sigma, q, steps)], DELTA, "rdp")
        add_remove = pld_epsilon(q, sigma, steps, NeighboringRelation.ADD_OR_REMOVE_ONE)
        replace = pld_epsilon(q, sigma, steps, NeighboringRelation.REPLACE_ONE)
        lines.append(
            f"| {n} | {q:.3f} | {sigma:g} | {steps} | {ledger:.2f} | {add_remove:.2f} | {replace:.2f} | "
            f"×{replace / add_remove:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
