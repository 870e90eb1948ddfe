"""The tabular generator's ``[tabular]`` config table and its declarations (light: the config reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from common.config.limits import SITE_PARTITION
from common.config.rules import TaskSpec
from common.errors import ConfigError

MODELS = ("vae", "marginal")
BALANCES = ("independent", "uniform")


@dataclass(frozen=True)
class TabularConfig:
    # The schema file (TOML; common.data.tabular_schema). "" = the shipped Adult schema.
    schema: str = ""
    # data.partition = "column": the declared categorical column whose values place rows at sites.
    partition_column: str = ""
    # marginal (the default, by measured utility under DP: README numbers): log-linear
    # conditional marginals, one linear layer from the label and sensitive groups to every
    # column's head (columns independent given the cell); vae: the TVAE-style conditional VAE
    # (encoder, latent code, MLP decoder, the same per-column heads).
    model: str = "marginal"
    latent_dim: int = 16
    hidden_dim: int = 128
    beta: float = 1.0
    # Std of the Gaussian head on a numeric value's position inside its declared bin (in [0, 1]).
    offset_std: float = 0.1
    # Synthetic rows drawn per evaluation (TSTR, fidelity, fairness; the balanced set too).
    eval_samples: int = 5000
    # The bias correction by conditional sampling: independent (label independent of the
    # sensitive attributes, their marginals kept: P(l) P(s)) | uniform (every cell equal).
    balance: str = "independent"
    # Seed of the evaluation's synthetic draws and classifiers (the same at every site).
    eval_seed: int = 20260
    # k: a group of fewer real rows (summed over sites) is not reported (complementary suppression).
    min_group_size: int = 10

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"tabular.{key}", msg)

        need(self.model in MODELS, "model", f"must be one of {', '.join(MODELS)}, got {self.model!r}")
        need(self.latent_dim >= 1, "latent-dim", f"must be >= 1, got {self.latent_dim}")
        need(self.hidden_dim >= 1, "hidden-dim", f"must be >= 1, got {self.hidden_dim}")
        need(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        need(0 < self.offset_std <= 1, "offset-std", f"must be in (0, 1], got {self.offset_std}")
        need(self.eval_samples >= 100, "eval-samples", f"must be >= 100, got {self.eval_samples}")
        need(self.min_group_size >= 1, "min-group-size", f"must be >= 1, got {self.min_group_size}")
        need(self.balance in BALANCES, "balance", f"must be one of {', '.join(BALANCES)}, got {self.balance!r}")


SPEC = TaskSpec(
    name="tabular",
    config_cls=TabularConfig,
    data_sources=("adult", "csv"),
    # A CSV whose schema declares a person-key column (Adult has none): dp.unit = "user".
    person_sources=("csv",),
    # column: by the values of tabular.partition-column (data.partition = "column:NAME" also parses).
    partitions=("dirichlet", "iid", "column", SITE_PARTITION),
    primary_metric="neg_elbo",
)
