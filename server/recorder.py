"""The run directory and everything written to it, round by round.

runs/<timestamp>-<scenario>/
    config.toml      the run's config (every key, defaults included), after a comment block
                     saying what each "default" or "auto" value resolved to (config_toml)
    ledger.sqlite    privacy ledger (server.ledger)
    metrics.jsonl    one line per round
    checkpoint.pt    global model + round + ledger position (atomic replace each round)
    samples/         sample grids (generative tasks)
    summary.md, eps.png, utility.png   written at the end (server.report)

The recorder only writes. What a round means (a failure, a reason to stop, a membership
attack) is decided by the run's callbacks (server.callbacks), which the round loop calls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tomli_w
import torch
from rich.console import Console

from common.config import RunConfig
from common.config.limits import AUTO_DELTA_CAP
from common.deploy.fileio import create_private_file, make_private_dir, write_atomically, write_text_atomically
from common.deploy.signing import Ed25519PrivateKey
from common.identifiers import CENTRAL_SITE_ID
from common.metrics.fairness import site_fairness
from common.privacy.accounting import round_up
from common.tasks import Task
from common.tasks.base import set_state
from common.textsafe import console_text, one_line
from server.ledger import Ledger
from server.report import eval_kind, eval_source
from server.run_dir import check_new_run_dir, check_resumable_run_dir
from server.run_facts import RESOLVED_PREFIX, dp_rows, no_file_data
from server.run_files import json_safe

if TYPE_CHECKING:
    from server.strategy import RoundRecord


class RunRecorder:
    def __init__(
        self,
        cfg: RunConfig,
        task: Task,
        run_dir: Path,
        console: Console | None = None,
        *,
        resume: bool = False,
        server_key: Ed25519PrivateKey | None = None,
    ) -> None:
        """A new run directory, or (``resume``) the existing one of a stopped run.

        ``server_key``: the coordinator's Ed25519 key. With it, every round's ledger head is
        signed (:meth:`Ledger.sign_head`) before the round's metrics line is written, so the
        ledger can be verified against keys and sites get receipts; without it, no head is
        signed and ``privfed audit --verify`` against a registry fails."""
        self.cfg, self.task, self.dir = cfg, task, run_dir
        self.server_key = server_key
        self.console = console or Console(highlight=False, soft_wrap=True)
        if resume:
            check_resumable_run_dir(run_dir)
        else:
            check_new_run_dir(run_dir)
        make_private_dir(run_dir)  # a resumed run's too: runs before 0700 dirs were world-readable
        if not resume:
            write_text_atomically(run_dir / "config.toml", config_toml(cfg))
        self.ledger = Ledger(run_dir / "ledger.sqlite", run_id=run_dir.name)
        self.metrics_path = run_dir / "metrics.jsonl"
        create_private_file(self.metrics_path)  # 0600 before the first append opens it
        # What a round's "test" numbers are: the server's split, or the sites' pooled validation.
        self.test_source = eval_source(cfg, task)
        self.model = task.build_model()
        self.keys = task.shared_keys(self.model)
        # federation.ema-decay: the average the server serves (samples, final model), beside
        # the global model the sites train from; both are checkpointed.
        self.served_model = task.build_model() if cfg.federation.ema_decay > 0 else None
        self.served_started = False  # whether served_model holds an average (else: the global model)

    def record_gap(self, missing: dict[int, bool], resumed_from: int) -> None:
        """metrics.jsonl lines for rounds a stopped server left without one.

        ``missing[r]`` is True when round r's update was lost (after the checkpoint), False
        when only its line was (the checkpoint has its model). Either way the line carries
        the ledger head, so that the audit's head check sees every row accounted for.
        """
        for rnd, lost in sorted(missing.items()):
            note = (
                f"interrupted: the server stopped during round {rnd}; privacy spent in it stays in the ledger, "
                f"its update was not applied (resumed from the round-{resumed_from} checkpoint)"
                if lost
                else f"the server stopped after round {rnd} was checkpointed, before its metrics were written"
            )
            line = {
                "round": rnd,
                "interrupted": lost,
                "note": note,
                "primary_metric": self.task.primary_metric,
                "sites_sampled": 0,
                "sites_trained": [],
                "sites_used": [],
                "sites_budget_exhausted": [],
                "rejected": {},
                "failures": [],
                "aggregated": False,
                "train_loss": {},
                "test": {},
                "site_val": {},
                "eps": {},
                "eps_max": self._eps_max(),
                "delta": {},
                "ledger_head": self.ledger.head(),
            }
            self.sign_head(rnd)
            self._append(line)
            self.console.print(f"[yellow]round {rnd:>3}: {note}[/]")

    # ------------------------------------------------------------------ rounds
    def load_global(self, arrays: list[np.ndarray], served: list[np.ndarray] | None = None) -> torch.nn.Module:
        """Set the checkpointed global model to ``arrays`` and, under federation.ema-decay, the
        served model to ``served`` (None: no average yet, the global model is served); returns
        the global model, the release the sites hold, which the membership attack targets."""
        set_state(self.model, self.keys, arrays)
        if self.served_model is not None:
            set_state(self.served_model, self.keys, served if served is not None else arrays)
            self.served_started = served is not None
        return self.model

    @property
    def released(self) -> torch.nn.Module:
        """The model the server serves: the average of the global models, or the global model."""
        return self.served_model if self.served_model is not None else self.model

    def write_round(self, rnd: int, rec: RoundRecord, seconds: float, extra: dict[str, Any], ok: bool = True) -> None:
        """Write round ``rnd``: checkpoint, metrics line, samples, progress line.

        ``extra``: keys the run's callbacks add to the line (e.g. "mia"). With ``ok`` False
        (the round failed) only the line is written: the last good checkpoint stays.
        """
        site_rows = [r for r in rec.ledger_rows if r.site_id != CENTRAL_SITE_ID]
        central = [r for r in rec.ledger_rows if r.site_id == CENTRAL_SITE_ID]
        eps = {r.site_id: r.eps_total for r in site_rows}
        line: dict[str, Any] = {
            "round": rnd,
            "seconds": round(seconds, 3),
            "primary_metric": self.task.primary_metric,
            "sites_sampled": rec.sampled,
            "sites_trained": sorted(rec.trained),
            "sites_used": sorted(rec.used),
            "sites_budget_exhausted": sorted(rec.exhausted),
            "rejected": rec.rejected,
            "failures": rec.failures,
            "aggregated": rec.aggregated,
            "train_loss": rec.train_loss,
            "test": rec.test,
            "test_source": self.test_source,
            "site_val": rec.site_val,
            # How evenly the primary metric is spread over the sites that evaluated.
            "site_fairness": site_fairness(
                {site: v[self.task.primary_metric] for site, v in rec.site_val.items() if self.task.primary_metric in v}
            ),
            "eps": eps,
            # Over every site so far, not only those that replied this round.
            "eps_max": self._eps_max(),
            "delta": {r.site_id: r.delta for r in site_rows},
            "ledger_head": self.ledger.head(),
        }
        if rec.test_std:
            # metrics.dp: each test metric's noise std (delta method), its error bar.
            line["test_std"] = rec.test_std
        if rec.caught_up:
            line["caught_up"] = rec.caught_up  # "site@round": spends ledgered late (lost replies)
        if rec.test_model_round is not None:
            # Under SecAgg+ "test" is the secure sum of the sites' statistics sent in this
            # round's fit, so it describes the model of the round before (0: the initial one).
            line["test_model_round"] = rec.test_model_round
            line["test_sites"] = rec.test_sites
        if rec.secagg_seconds:
            line["secagg_seconds"] = {k: round(v, 4) for k, v in rec.secagg_seconds.items()}
        if central:
            # Client-level DP: one site is the unit of privacy (common.privacy.client_level).
            line["central_dp"] = {"eps": central[0].eps_total, "delta": central[0].delta, "status": central[0].status}
        line.update(extra)
        # Signed before the line and the checkpoint that carry the same head: a kill in
        # between leaves a signed head the resumed server finds (sign_head is per round, once).
        self.sign_head(rnd)
        if not ok:
            self._append(line)
            return
        # Checkpoint, then the line: a kill between the two leaves a checkpointed round
        # without a line, which a resume fills in (server.resume), never the reverse.
        self.save_checkpoint(rnd)
        self._append(line)
        every = self.cfg.federation.sample_every
        if every and rnd % every == 0:
            path = self.dir / "samples" / f"round-{rnd:03d}.png"
            self.task.save_samples(self.released, path, self.sample_caption(rnd))
        self.console.print(self._progress_line(rnd, line))

    def sign_head(self, rnd: int) -> None:
        """Sign the ledger's head as round ``rnd``'s, when the server has a key."""
        if self.server_key is not None:
            self.ledger.sign_head(rnd, self.server_key)

    def sample_caption(self, rnd: int) -> str:
        """The privacy claim under a sample grid: round, the largest ε any site has spent, the
        largest δ, the unit, the neighbouring relation and the accountant (from the ledger)."""
        every = self.ledger.rows()
        rows = dp_rows(every)
        central = [r for r in every if r.site_id == CENTRAL_SITE_ID]
        lines = []
        if rows:  # bounds round up: the caption never claims less than the ledger spent
            accountants = "/".join(sorted({r.accountant.upper() for r in rows}))
            relation = "/".join(sorted({r.neighbouring for r in rows}))
            eps, delta = round_up(self._eps_max(), 3), round_up(max(r.delta for r in rows), 2)
            lines += [
                f"round {rnd}: ε ≤ {eps:g} per site, δ ≤ {delta:g}",
                f"unit: one {self.task.privacy_unit} ({relation}), {accountants} accountant",
            ]
        if central:
            eps, delta = central[-1].eps_total, max(r.delta for r in central)
            lines.append(
                f"{'' if rows else f'round {rnd}: '}site-level ε ≤ {round_up(eps, 3):g}, δ ≤ {round_up(delta, 2):g} "
                "(unit: one site's whole data)"
            )
        return "\n".join(lines) or f"round {rnd}: no DP (ε = ∞)"

    def _eps_max(self) -> float:
        return max((v for k, v in self.ledger.spent().items() if k != CENTRAL_SITE_ID), default=0.0)

    def _append(self, line: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(json_safe(line)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def save_checkpoint(self, rnd: int) -> None:
        """Atomic: write a temp file in the same directory, fsync, then rename over."""
        payload = {
            "round": rnd,
            "task": self.cfg.task,
            "state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ledger_rows": self.ledger.count(),
            "ledger_head": self.ledger.head(),
        }
        if self.served_model is not None and self.served_started:
            # Not before a round changed the model: resume would average the initial model in.
            payload["served"] = {k: v.detach().cpu() for k, v in self.served_model.state_dict().items()}
        write_atomically(self.dir / "checkpoint.pt", lambda fh: torch.save(payload, fh))

    def _progress_line(self, rnd: int, line: dict[str, Any]) -> str:
        total = self.cfg.federation.rounds
        parts = [
            f"[bold]round {rnd:>3}/{total}[/]",
            f"{len(line['sites_trained'])}/{line['sites_sampled']} sites trained",
        ]
        if line["rejected"]:
            parts.append(f"[red]{len(line['rejected'])} rejected[/]")
        if line["sites_budget_exhausted"]:
            parts.append(f"[yellow]{len(line['sites_budget_exhausted'])} out of budget[/]")
        primary = self.task.primary_metric
        name = console_text(primary)
        if primary in line["test"]:
            # What the numbers are (server.report.eval_source): "test" only for a test split.
            source = str(line.get("test_source", ""))
            kind = eval_kind(source)
            detail = source if kind == "test" else source[len(kind) :].lstrip(", ")
            of = f"model of round {line['test_model_round']}" if "test_model_round" in line else ""
            said = "; ".join(x for x in (detail, of) if x)
            parts.append(f"{kind} {name} {line['test'][primary]:.3f}" + (f" ({console_text(said)})" if said else ""))
        vals = [v[primary] for v in line["site_val"].values() if primary in v]
        if vals:
            parts.append(f"site val {name} {np.mean(vals):.3f}")
        if self.cfg.dp.enabled and line["delta"]:
            deltas = line["delta"].values()
            parts.append(f"max ε {line['eps_max']:.3f} (δ≤{max(deltas):.3g}, per {self.task.privacy_unit})")
        elif self.cfg.dp.enabled:
            parts.append(f"max ε so far {line['eps_max']:.3f} (per {self.task.privacy_unit})")
        if not self.cfg.dp.enabled and "central_dp" not in line:
            parts.append("no DP (ε=∞)")
        if line["failures"]:
            parts.append(f"[yellow]{len(line['failures'])} failure(s)[/]")
        if "central_dp" in line:
            c = line["central_dp"]
            parts.append(f"site-level ε {c['eps']:.3f} (δ={c['delta']:.3g})")
        parts.append(f"{line['seconds']:.1f}s")
        return " │ ".join(parts)


def config_toml(cfg: RunConfig) -> str:
    """config.toml: every key as the run was started with it, after a comment block with
    what each key whose value means "default" or "auto" resolved to.

    The keys keep their values ("" for the default data path, 0 for auto delta): ``privfed
    resume`` reads the file back as the run's config, and a virtual site's dataset id is
    derived from data.path as given (common.deploy.site_config.dataset_identity), so writing
    the resolved path there would give a resumed run's sites fresh lifetime budgets and make
    a Flower-native resume refuse the config. The resolutions are TOML comments, which every
    reader ignores.
    """
    lines = [
        "# The configuration this run was started with: every key, defaults included.",
        '# `privfed resume` reads it back unchanged. Keys whose value means "default" or "auto",',
        "# and relative paths, resolved at the start of the run to:",
        # A path may hold a newline; escaped, it cannot end the comment and become a TOML key.
        *(f"{RESOLVED_PREFIX}{key}: {one_line(text)}" for key, text in resolved_keys(cfg).items()),
        "",
    ]
    return "\n".join(lines) + "\n" + tomli_w.dumps(cfg.to_nested())


def resolved_keys(cfg: RunConfig) -> dict[str, str]:
    """Key -> what its value meant in this run (one line each, no newline): the data read,
    the paths made absolute, and δ and σ where the config says "auto"."""
    out: dict[str, str] = {"data.path": data_read(cfg)}
    if cfg.data.users_path:
        out["data.users-path"] = _absolute(cfg.data.users_path)
    if cfg.task == "tabular":
        schema = str(getattr(cfg.task_params, "schema", "") or "")
        out["tabular.schema"] = _absolute(schema) if schema else "none: the bundled UCI Adult schema"
    fed = cfg.federation
    for key, value in (("run-dir", fed.run_dir), ("registry", fed.registry), ("server-key", fed.server_key)):
        if value and not Path(value).is_absolute():
            out[key] = _absolute(value)
    dp = cfg.dp
    if dp.enabled:
        if dp.target_epsilon > 0:
            out["dp.noise-multiplier"] = (
                f"not used: dp.target-epsilon = {dp.target_epsilon:g} sets each site's σ so that its "
                f"{fed.rounds} planned rounds spend exactly that ε (the ledger records each site's σ)"
            )
        if not dp.delta:
            out["dp.delta"] = (
                f"auto: min({AUTO_DELTA_CAP:g}, 1/(10 n)) for each site, n its declared size "
                "(the ledger records each site's δ)"
            )
    else:
        out["dp.enabled"] = "false: no DP-SGD, the other [dp] keys are not used"
    c = cfg.central_dp
    if c.enabled:
        if c.target_epsilon > 0:
            out["central-dp.noise-multiplier"] = (
                f"not used: central-dp.target-epsilon = {c.target_epsilon:g} sets σ "
                "(the ledger's all-sites rows record it)"
            )
        if not c.delta:
            out["central-dp.delta"] = (
                f"auto: min({AUTO_DELTA_CAP:g}, 1/(10 x {fed.num_sites} sites)) = {c.site_delta(fed.num_sites):.3g}"
            )
    return out


def data_read(cfg: RunConfig) -> str:
    """The data the run config names, resolved: the file or folder read (absolute), or what
    is read instead of a file. A deployed site reads only the files its own site config
    names (common.deploy.site_config.refuse_run_config_paths), so in a deployment this is
    the server's data (its test split), not the sites'."""
    d = cfg.data
    if d.path:
        return _absolute(d.path)
    instead = no_file_data(d.source, cfg.federation.seed)
    if instead is not None:
        return instead
    found: Path | None = None
    if d.source == "movielens":
        from common.tasks.recsys.data import default_movielens_path

        found = default_movielens_path()
    elif d.source == "adult":
        from common.data.tabular import default_adult_path

        found = default_adult_path()
    if found is None:
        return f"no file named (data.source = {d.source!r} and data.path is empty)"
    return f"{found.resolve()} (the default for data.source = {d.source!r})"


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())
