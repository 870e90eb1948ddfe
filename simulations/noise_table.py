"""Signal per unit of noise against the batch size, at a fixed ε and fixed epochs (issue 24).

``python -m simulations.noise_table`` prints, for one site of ``--n`` records training
``--epochs`` epochs at ``--epsilon`` (δ = min(10⁻⁵, 1/(10 n)), as the sites use), the noise
multiplier σ that each accountant needs at several expected batch sizes B (q = B / n, T =
epochs / q steps) and q·√T / σ: a coordinate's summed signal over the run, qnT·g, divided by
its summed noise, σC√T, in units of n·g / C. A flat column means that batch size, steps and
rounds cannot trade noise for signal; only the accountant (or ε, or n) moves it.
"""

from __future__ import annotations

import argparse
import math
import warnings

from common.privacy.accounting import auto_delta, noise_for_target


def table(
    n: int, epochs: float, epsilon: float, batches: list[int], accountants: list[str]
) -> list[dict[str, float | str]]:
    """One row per (accountant, batch): q, steps, σ and q·√T / σ."""
    delta = auto_delta(n)
    rows: list[dict[str, float | str]] = []
    for accountant in accountants:
        for b in batches:
            q = min(b / n, 1.0)
            steps = max(1, round(epochs / q))
            sigma = noise_for_target(epsilon, delta, q, steps, accountant)
            rows.append(
                {
                    "accountant": accountant,
                    "batch": b,
                    "q": q,
                    "steps": steps,
                    "sigma": sigma,
                    "signal_per_noise": q * math.sqrt(steps) / sigma,
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16_000, help="records at the site (a MovieLens 100K site: about 16,000)")
    ap.add_argument("--epochs", type=float, default=30.0, help="rounds x local epochs")
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--batches", default="1024,2048,4096,8192,16000")
    ap.add_argument("--accountants", default="rdp,prv")
    a = ap.parse_args()
    # Opacus's PRV warns of log(0) at q = 1 (the whole site each step); the σ it returns is fine.
    warnings.filterwarnings("ignore", "divide by zero", RuntimeWarning, r"opacus\.accountants\.analysis\.prv")
    batches = [int(b) for b in a.batches.split(",")]
    print(f"n = {a.n}, {a.epochs:g} epochs, ε = {a.epsilon:g}, δ = {auto_delta(a.n):.3g}")
    print(f"{'accountant':>10} {'batch':>6} {'q':>6} {'steps':>6} {'sigma':>7} {'q*sqrt(T)/sigma':>16}")
    for r in table(a.n, a.epochs, a.epsilon, batches, a.accountants.split(",")):
        print(
            f"{r['accountant']:>10} {r['batch']:>6} {r['q']:>6.3f} {r['steps']:>6} {r['sigma']:>7.2f} "
            f"{r['signal_per_noise']:>16.4f}"
        )


if __name__ == "__main__":
    main()
