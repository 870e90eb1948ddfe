"""The tabular generator task: site data, the DP generator, per-row loss, conditional sampling, evaluation.

Privacy (unit: one row; one person under user-level DP, issue 21, when the schema declares a
person key). Every trainable parameter (the cell prior, the encoder, the decoder) is trained
by DP-SGD on each row's loss with the row's gradient clipped as one example, so the released
model is the DP mechanism's output. Everything else the model needs (category lists, numeric
bins, the scaling) is the declared schema's, never computed from the rows. Synthetic rows,
their frames and the classifiers fitted on them are post-processing of the released model.

Evaluation:

* the server, on its own real test split (simulation): the held-out loss, and the metrics of
  :func:`common.metrics.tabular.evaluate_all` (TSTR, fidelity, fairness, bias, correction) on
  synthetic rows drawn from the model (``tabular.eval-samples``, by its learnt cell prior) and
  on a *balanced* draw (conditional sampling over label x sensitive cells, ``tabular.balance``);
* a site, on its validation rows (deployment, no server split): the loss sum and count and the
  per-group confusion counts (:func:`common.metrics.tabular.confusion_sums`) of a logistic
  regression fitted on synthetic rows drawn with a fixed seed (the same classifier at every
  site), so that the server gets exact federation metrics from their sum
  (:meth:`TabularTask.combine_sums`), under SecAgg+ and ``metrics.dp`` too.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from common.config.limits import SITE_PARTITION
from common.config.schema import USER_UNIT
from common.data.arrays import ArrayData
from common.data.tabular import Layout, TabularSplit, cached_split, default_adult_path, partition_column
from common.data.tabular_schema import Schema, load_schema
from common.errors import ConfigError, DataError
from common.privacy.metrics_dp import MetricBounds
from common.tasks import register_task
from common.tasks.base import Task
from common.tasks.tabular.config import TabularConfig
from common.tasks.tabular.evaluation import group_arrays, table_spec, to_frame
from common.tasks.tabular.model import TabularVAE

if TYPE_CHECKING:
    from common.config import RunConfig

ADULT_SCHEMA = Path(__file__).with_name("adult_schema.toml")
# metrics.loss-bound = 0: one row's loss is clipped to this many nats under metrics.dp
# (Adult's rows cost about 10-30 nats once trained).
DEFAULT_LOSS_BOUND = 100.0
LOSS_SUMS = ("loss_sum", "n")


def _vae(model: nn.Module) -> TabularVAE:
    """The model as the TabularVAE its build_model made (a static cast, no runtime check)."""
    return cast(TabularVAE, model)


@register_task("tabular")
class TabularTask(Task):
    unit_of_privacy = "row"
    # The person key is HMAC'd with the federation key, and the key keys the train/validation split.
    needs_key = True
    test_description = "server-held split of real rows (TSTR: synthetic-trained classifiers tested on it)"
    plot_metrics = ("tstr.lr.accuracy", "tstr.gbm.auc", "fidelity.tv_mean")

    params: TabularConfig

    def __init__(self, cfg: RunConfig, key: bytes | None = None) -> None:
        super().__init__(cfg, key)
        d = cfg.data
        if d.source == "csv" and not self.params.schema:
            raise ConfigError("tabular.schema", "is required when data.source is csv (the columns' roles and domains)")
        if d.source == "csv" and not d.path:
            raise ConfigError("data.path", "is required when data.source is csv")
        self.schema: Schema = load_schema(self.params.schema or ADULT_SCHEMA)
        self.layout = Layout(self.schema)
        if d.partition not in ("dirichlet", "iid", "site"):
            name = partition_column(d.partition, self.params.partition_column)
            if name not in {c.name for c in self.schema.columns}:
                raise ConfigError("tabular.partition-column", "must name a categorical column of the schema")

    def _data_path(self) -> str:
        if self.cfg.data.path:
            return self.cfg.data.path
        found = default_adult_path()
        if found is None:
            raise DataError(
                "../shared/data/adult/adult.data",
                "UCI Adult not found; set data.path to adult.data",
                role="table file",
                code=DataError.MISSING,
            )
        return str(found)

    def _split(self) -> TabularSplit:
        d, f = self.cfg.data, self.cfg.federation
        return cached_split(
            self._data_path(),
            self.schema,
            self.key,
            d.partition,
            self.params.partition_column,
            f.num_sites,
            f.seed,
            (d.test_fraction, d.val_fraction, d.alpha),
            d.min_site_size,
        )

    def site_data(self, site_index: int) -> tuple[ArrayData, ArrayData]:
        return self._split().sites[site_index]

    def server_test_data(self) -> ArrayData | None:
        if self.cfg.data.partition == SITE_PARTITION:
            return None  # a deployment: the real rows live at the sites
        return self._split().test

    def site_sizes(self) -> list[int]:
        if self.cfg.dp.unit == USER_UNIT:  # persons, not rows (Task.unit_count)
            return super().site_sizes()
        return self._split().site_sizes()

    def has_person_key(self) -> bool:
        return self.schema.person_key is not None

    # ---------------------------------------------------------------- model
    def build_model(self, site_index: int | None = None) -> TabularVAE:
        p = self.params
        latent = p.latent_dim if p.model == "vae" else 0
        return TabularVAE(self.layout, latent, p.hidden_dim, p.offset_std)

    def per_sample_loss(self, model: nn.Module, batch: ArrayData) -> torch.Tensor:
        assert batch.y is not None
        prior, recon, kl = _vae(model).loss_terms(batch.x, batch.y)
        return prior + recon + self.params.beta * kl

    # ------------------------------------------------------------- sampling
    def cell_weights(self, model: TabularVAE, balanced: bool) -> torch.Tensor:
        """The cells' sampling weights: the learnt prior, or the balanced correction.

        ``independent``: P(label) x P(sensitive tuple), both marginals of the learnt prior, so
        the label no longer depends on the sensitive attributes while the group sizes and the
        base rate stay; ``uniform``: every label x sensitive cell equally often.
        """
        probs = model.cell_probs().detach().cpu().double()
        if not balanced:
            return probs
        if self.params.balance == "uniform":
            return torch.ones_like(probs)
        joint = probs.reshape(2, -1)
        return (joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)).reshape(-1)

    @torch.no_grad()
    def synthesize(
        self, model: nn.Module, n: int, seed: int, balanced: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` encoded synthetic rows: cells drawn by :meth:`cell_weights`, then rows given the cell."""
        vae = _vae(model)
        was_training = vae.training
        vae.eval()
        device = vae.prior.weight.device
        cpu = torch.Generator().manual_seed(seed)
        cells = torch.multinomial(self.cell_weights(vae, balanced).float(), n, replacement=True, generator=cpu)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        x, y = vae.sample(cells, gen)
        vae.train(was_training)
        return x.cpu(), y.cpu()

    def sample_frame(self, model: nn.Module, n: int, seed: int, cells: torch.Tensor | None = None):  # noqa: ANN201
        """Synthetic rows as a data frame; ``cells`` (indices of :meth:`Layout.cell_of`) draws any mix."""
        if cells is None:
            x, y = self.synthesize(model, n, seed)
        else:
            vae = _vae(model)
            gen = torch.Generator(device=vae.prior.weight.device).manual_seed(seed)
            x, y = vae.sample(cells, gen)
        return to_frame(self.layout, x, y)

    # ----------------------------------------------------------- evaluation
    @torch.no_grad()
    def _losses(self, model: TabularVAE, data: ArrayData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row (prior, reconstruction, KL) in eval mode at the posterior mean: no Monte Carlo
        noise in the curves, and each row's loss depends on that row only (so one row moves a
        loss sum by at most its clip; a seeded shared stream would move every other row's draw)."""
        model.eval()
        device = model.prior.weight.device
        assert data.y is not None
        terms = model.loss_terms(data.x.to(device), data.y.to(device), sample=False)
        model.train()
        return cast(tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple(t.cpu().double() for t in terms))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ArrayData) -> dict[str, float]:
        vae = _vae(model)
        prior, recon, kl = self._losses(vae, data)
        out = {
            "neg_elbo": float((prior + recon + kl).mean()),
            "prior_nll": float(prior.mean()),
            "recon_nll": float(recon.mean()),
            "kl": float(kl.mean()),
        }
        if data is self.server_test_data():
            out.update(self._server_metrics(vae, data))
        else:
            rows = self.unit_rows(data)
            if rows is not data:
                prior, recon, kl = self._losses(vae, rows)
            out.update(self._suppress_small_groups(self._site_sums(vae, rows, prior + recon + kl)))
        return out

    def _suppress_small_groups(self, sums: dict[str, float]) -> dict[str, float]:
        """Exact sums only (metrics.dp noises every group instead): a group of fewer than
        ``tabular.min-group-size`` validation rows at this site is sent as 0, with complementary
        suppression (:func:`common.metrics.fairness.suppressed_groups`), so no small group's
        counts, nor "overall minus the others", leave the site exactly."""
        from common.metrics.fairness import suppressed_groups
        from common.metrics.tabular import CELLS, slug

        spec = table_spec(self.layout)
        out = dict(sums)
        for attr in spec.sensitive:
            keys = {g: [f"cm.{slug(attr)}.{slug(g)}.{c}" for c in CELLS] for g in spec.groups[attr]}
            sizes = {g: sum(out.get(k, 0.0) for k in ks) for g, ks in keys.items()}
            for g in suppressed_groups(sizes, self.params.min_group_size):
                out.update(dict.fromkeys(keys[g], 0.0))
        return out

    def _server_metrics(self, model: TabularVAE, data: ArrayData) -> dict[str, float]:
        """The metrics on the server's real test split (:func:`common.metrics.tabular.evaluate_all`)."""
        from common.metrics.tabular import evaluate_all

        p = self.params
        assert data.y is not None
        synth = to_frame(self.layout, *self.synthesize(model, p.eval_samples, p.eval_seed))
        balanced = to_frame(self.layout, *self.synthesize(model, p.eval_samples, p.eval_seed + 7, balanced=True))
        real = to_frame(self.layout, data.x, data.y)
        spec = table_spec(self.layout)
        if self.artifacts_dir is not None:  # the report's marginals, real against synthetic (the latest round's)
            from common.metrics.tabular import marginals
            from common.metrics.tabular_plots import write_marginals

            write_marginals(marginals(synth, real, spec), self.artifacts_dir)
        return dict(evaluate_all(synth, balanced, real, spec, p.eval_seed))

    def _site_sums(self, model: TabularVAE, data: ArrayData, loss: torch.Tensor) -> dict[str, float]:
        """Loss sum and count; the confusion counts per group and the score histogram of the TSTR
        logistic regression, fitted on synthetic rows drawn with a fixed seed (the same classifier
        at every site, so the counts add up to the federation's)."""
        from common.metrics.tabular import confusion_sums, fit_score

        p = self.params
        assert data.y is not None
        spec = table_spec(self.layout)
        synth = to_frame(self.layout, *self.synthesize(model, p.eval_samples, p.eval_seed))
        real = to_frame(self.layout, data.x, data.y)
        scored = fit_score("lr", synth, real, spec, p.eval_seed)
        y_true = (real[spec.label].astype(str) == spec.positive).to_numpy(dtype=np.int64)
        sums = confusion_sums(y_true, scored.pred, group_arrays(self.layout, data.x), spec, score=scored.score)
        return {"loss_sum": float(loss.sum()), "n": float(len(data)), **sums}

    # ------------------------------------------------ site sums (deployment, SecAgg+, metrics.dp)
    @cached_property
    def _confusion_schema(self) -> tuple[str, ...]:
        """The counts' keys (from the declared groups; computed once: is_sum_key runs per reply key)."""
        from common.metrics.tabular import sum_schema

        return tuple(sum_schema(table_spec(self.layout), scores=True))

    def sum_keys(self) -> tuple[str, ...]:
        """The public schema of the sites' sums (from the schema's declared groups, never the data);
        () when the server scores its own test split (a simulation with central evaluation)."""
        if self.cfg.data.partition != SITE_PARTITION and self.cfg.federation.central_eval:
            return ()
        return (*LOSS_SUMS, *self._confusion_schema)

    def is_sum_key(self, key: str) -> bool:
        return key in LOSS_SUMS or key in self._confusion_schema

    def combine_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Federation metrics from the summed sites' sums: the mean loss, TSTR accuracy and AUC on the
        sites' real rows, and the fairness metrics (groups under tabular.min-group-size withheld)."""
        from common.metrics.tabular import fairness_from_sums

        n = sums.get("n", 0.0)
        out: dict[str, float] = {"n": n}
        if n > 0:
            out["neg_elbo"] = sums.get("loss_sum", 0.0) / n
        rest = {k: v for k, v in sums.items() if k not in LOSS_SUMS}
        out.update(fairness_from_sums(rest, table_spec(self.layout), min_group_size=self.params.min_group_size))
        return out

    def combine_metrics(self, results: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
        """Sites' sums added key by key (exact), then :meth:`combine_sums`."""
        keys = {k for _, m in results for k in m if self.is_sum_key(k)}
        if not keys:
            return super().combine_metrics(results)
        return self.combine_sums({k: float(sum(m.get(k, 0.0) for _, m in results)) for k in sorted(keys)})

    def metric_bounds(self) -> MetricBounds:
        """Under metrics.dp: ``loss_sum`` (each row clipped to ``B = metrics.loss-bound``, 0: 100 nats)
        and ``n``, plus the counts of :func:`common.metrics.tabular.sum_bounds` (1 per row each: one
        overall cell, one cell per sensitive attribute, one score bin), so a row touches 2 more keys."""
        from common.metrics.tabular import sum_bounds

        b = self.cfg.metrics.loss_bound or DEFAULT_LOSS_BOUND
        counts = sum_bounds(table_spec(self.layout), scores=True)
        bounds = {"loss_sum": b, "n": 1.0, **counts.bounds}
        # User-level DP: a person adds up to m rows (records_per_unit); with every bound times m, each
        # row's scaled contribution has norm <= sqrt(t) / m, so the person's (their sum) <= sqrt(t).
        m = float(self.records_per_unit())
        return MetricBounds({k: v * m for k, v in bounds.items()}, 2 + counts.touched)

    @torch.no_grad()
    def dp_evaluate(self, model: nn.Module, data: ArrayData) -> dict[str, float]:
        """:meth:`metric_bounds`'s sums on a site's validation rows, each row's loss clipped to B."""
        data = self.unit_rows(data)
        vae = _vae(model)
        prior, recon, kl = self._losses(vae, data)
        b = self.cfg.metrics.loss_bound or DEFAULT_LOSS_BOUND
        return self._site_sums(vae, data, (prior + recon + kl).clamp(0, b))

    def save_samples(self, model: nn.Module, path: Path, caption: str | None = None) -> Path:
        """1,000 synthetic rows as CSV beside ``path`` (the report draws the marginals from metrics;
        the report states the privacy claim, so ``caption`` is not written into the CSV)."""
        from common.deploy.fileio import make_private_dir, write_text_atomically

        frame = self.sample_frame(model, 1000, self.params.eval_seed)
        out = path.with_suffix(".csv")
        make_private_dir(out.parent)
        write_text_atomically(out, frame.to_csv(index=False))  # 0600, like every run file
        return out
