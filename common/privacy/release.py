"""The release inventory: every field that leaves a site, and why it may.

Issue 18 asks that ε cover everything a site releases, or that the release be gone. This
module is the one list of what a site releases, as a declarative table: each wire field
(or field pattern) of each reply, the secure sum, error text, timing and the deployment
tools, with one of four kinds:

* ``COVERED``: the output of a DP mechanism, named with the ledger rows that charge it;
* ``PUBLIC``: public by declaration, naming who declares it and before what;
* ``REMOVED``: no longer sent; kept here so that it cannot come back without a decision;
* ``UNCOVERED``: released today without a DP guarantee; a known gap, named with the issue
  18 finding and the branch that closes it. ``tests/unit/test_release.py`` holds a strict
  xfail that turns red once none is left, so this kind disappears with the last gap.

``tests/integration/test_release_inventory.py`` captures the real messages a short run of
each task sends, plain and under SecAgg+, and fails on any field :func:`classify` does not
find here (or finds as ``REMOVED``), naming it. docs/PRIVACY.md's "Release inventory"
section is :func:`render_markdown` of this table (a unit test checks they are equal;
``python -m common.privacy.release`` rewrites it).

Field names. A message field is ``<record type>:<record name>/<key>`` (``config:fitres.metrics/site_id``,
``array:fitres.parameters/0``), ``error/<field>`` or ``metadata/<field>`` (Flower's message
proto), see :func:`message_fields`. What is not one field of one message is named by its
channel: ``secure-sum/<key>`` (what the server learns after unmasking), ``timing/...``,
``participation/...``, ``join/...``. Patterns: ``<i>`` an integer, ``<v>`` one name
component (no ``.`` or ``/``), ``{a,b}`` one of the alternatives; everything else literal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any


class Kind(str, Enum):
    COVERED = "covered"
    PUBLIC = "public"
    REMOVED = "removed"
    UNCOVERED = "uncovered"


@dataclass(frozen=True)
class Release:
    channel: str
    field: str  # a field name or pattern (module docstring)
    kind: Kind
    # COVERED: the mechanism and the ledger rows; PUBLIC: who declares it, before what;
    # REMOVED: since when and what replaced it; UNCOVERED: the finding and the closing branch.
    basis: str
    reason: str


C, P, R, U = Kind.COVERED, Kind.PUBLIC, Kind.REMOVED, Kind.UNCOVERED
FIT, EVAL, SUM, SECAGG = "fit reply", "evaluate reply", "secure sum", "SecAgg+ protocol"
ERROR, META, TIME, JOIN = "error reply", "message metadata", "timing and participation", "joining"

_DP_SGD = (
    "DP-SGD at the site (subsampled Gaussian, the named Opacus accountant); the ledger row "
    "(round, site_id) with the task's unit (one record, or one user under dp.unit = user), plus the "
    "`all-sites` rows with central-dp"
)
_N = (
    "the site's declared size n̂ (records, or persons under dp.unit = user) and the run config, both fixed "
    "before the run; the real n is never sent"
)
_EXACT = (
    "declared public by the site before the run: sent exact only with metrics.dp = false, which a deployed site "
    "refuses unless its node config says allow-exact-metrics = true (simulation: the launcher, and the report "
    "says 'metrics not private'); with metrics.dp these keys are not sent"
)
_NOISY = (
    "metrics.dp (the default outside simulations): Gaussian mechanism on the task's schema, one "
    "`gaussian-metrics` ledger row per release (unit: one validation example, or under dp.unit = user one "
    "user's first dp.max-records-per-user held-out records); with metrics.dp = false, "
    "exact and declared public by the site (allow-exact-metrics)"
)
_SIGNED = (
    "a function of the reply's other fields (released), the run id, the round and the site's signing key "
    "(its public key is registered before the run)"
)
_HELD = "recommender, held-out ratings and the declared catalogue only (no training rating is read); " + _EXACT
_RUN_CONFIG = "the run config (or the site's stricter node config), declared before the run"
_FLOWER = "Flower 1.41's protocol, fixed before the run"
_RELEASE = "the release's own parameters (z, √t, δ, rng): the run config and the task's public schema"

# Recommender evaluation sums (common/tasks/recsys/metrics.py): sent per site in the clear
# without SecAgg+, inside the masked vector (eval_sums stage) with it.
_RECSYS_NOISY = "{sse,sae,n_ratings,n}"
_RECSYS_SUMS = (
    "{n_ranked,hits,dcg,groups_suppressed,pop_at_k_sum,pop_at_k_n,pop_held_out_sum,coverage_sum,coverage_sites}"
)
_GROUP_NOISY = "group.<v>.<v>.{sse,sae,n,users}"
_GROUP_SUMS = "group.<v>.<v>.{pred,dcg}"
_YH_SUMS = "yh.gender.<v>"
# Tabular evaluation sums (common/tasks/tabular/task.py, common/metrics/tabular.py): the validation
# loss sum, and the TSTR classifier's confusion counts (overall, per declared sensitive group) and
# score histogram; the classifier is fitted on synthetic rows of the received model (a DP output).
_TAB_NOISY = ("loss_sum", "cm.{tp,fp,tn,fn}", "cm.<v>.<v>.{tp,fp,tn,fn}", "roc.{pos,neg}.<i>")
_TAB_HELD = "tabular, validation rows only (no training row is read); " + _EXACT
_EM = "config:evaluateres.metrics/"
_METRICS_RELEASE = "{metrics_noise_multiplier,metrics_l2_sensitivity,metrics_delta,metrics_rng}"

INVENTORY: tuple[Release, ...] = (
    # ------------------------------------------------------------------ fit reply
    Release(FIT, "array:fitres.parameters/<i>", C, _DP_SGD, "the update (local − global), plain runs only"),
    Release(FIT, "metric:fitres.num_examples/num_examples", P, _N, "n̂ (plain), 1 (SecAgg+), 0 (out of budget)"),
    Release(FIT, "config:fitres.status/{code,message}", P, _FLOWER, "NumPyClient's constant success status"),
    Release(FIT, "config:fitres.metrics/site_id", P, "the site's operator (node config site-id)", "pseudonym"),
    Release(FIT, "config:fitres.metrics/unit", P, "the task's code", "the unit of privacy"),
    Release(FIT, "config:fitres.metrics/{accountant,max_grad_norm,eps_budget}", P, _RUN_CONFIG, "ledger inputs"),
    Release(FIT, "config:fitres.metrics/dataset_size", P, _N, "the declared size n̂"),
    Release(FIT, "config:fitres.metrics/{sample_rate,steps_planned,delta}", P, _N, "q = B/n̂, steps(n̂), δ(n̂)"),
    Release(FIT, "config:fitres.metrics/noise_multiplier", P, _N, "σ(n̂) under dp.target-epsilon"),
    Release(
        FIT,
        "config:fitres.metrics/{steps,eps_spent,status,note}",
        P,
        _N + "; the site's budget policy",
        "functions of the declared plans and the budget",
    ),
    Release(FIT, "config:fitres.metrics/history", P, _N, "earlier (round, σ, q, steps)"),
    Release(FIT, "config:fitres.metrics/rng", P, "the run config and the site's node config", "os / seeded"),
    Release(FIT, "config:fitres.metrics/" + _METRICS_RELEASE, P, _RELEASE, "metrics.dp under SecAgg+"),
    Release(
        FIT,
        "config:fitres.metrics/signature",
        P,
        _SIGNED,
        "the site's Ed25519 signature of the reply's claim (issue 19); reveals nothing more",
    ),
    Release(FIT, "config:fitres.metrics/train_seconds", R, "removed in issue 18 (finding 9)", "revealed n"),
    Release(
        FIT,
        "config:fitres.metrics/{train_loss,d_real_loss,g_loss}",
        C,
        "none claimed: sent only with dp.enabled = false and central-dp off, whose ledger rows say ε = ∞",
        "the task's training metrics (Task.train)",
    ),
    # ------------------------------------------------------------- evaluate reply
    Release(EVAL, "metric:evaluateres.loss/loss", C, _NOISY, "the primary metric (post-processed noisy sums)"),
    Release(EVAL, "metric:evaluateres.num_examples/num_examples", P, _N, "n̂; 1 under metrics.dp"),
    Release(EVAL, "config:evaluateres.status/{code,message}", P, _FLOWER, "NumPyClient's constant success status"),
    Release(EVAL, _EM + "site_id", P, "the site's operator (node config site-id)", "pseudonym"),
    Release(EVAL, _EM + "history", P, _N, "the rounds the site trained, as in the fit reply"),
    Release(EVAL, _EM + "signature", P, _SIGNED, "the site's Ed25519 signature of the reply's claim (issue 19)"),
    Release(EVAL, _EM + "eps_budget", P, _RUN_CONFIG, "metrics.dp: the budget the release is charged to"),
    Release(EVAL, _EM + _METRICS_RELEASE, P, _RELEASE, "metrics.dp: the release's parameters"),
    Release(EVAL, _EM + "{neg_elbo_sum,recon_nll_sum,kl_sum,recon_mse_sum,n}", C, _NOISY, "VAE: clipped sums"),
    Release(EVAL, _EM + "class.<i>.{recon_sum,n}", C, _NOISY + "; exact: classes of ≥ k only", "VAE / GAN"),
    Release(EVAL, _EM + "{neg_elbo,recon_nll,kl,recon_mse}", P, _EXACT, "VAE: validation means"),
    Release(EVAL, _EM + "class.<i>.recon_nll", P, _EXACT + "; classes of ≥ k only", "VAE: per-class means"),
    Release(EVAL, _EM + "recon_disparity.<v>", P, _EXACT, "VAE: spread over the sent classes"),
    Release(EVAL, _EM + "{d_loss,d_real,d_fake}", P, _EXACT, "GAN: discriminator losses on validation images"),
    Release(EVAL, _EM + _RECSYS_NOISY, C, _NOISY, "recommender: error sums and counts"),
    Release(EVAL, _EM + _GROUP_NOISY, C, _NOISY + "; exact: groups of ≥ k users", "recommender: per group"),
    Release(EVAL, _EM + _RECSYS_SUMS, P, _HELD, "recommender: ranking, popularity, coverage sums"),
    Release(EVAL, _EM + _GROUP_SUMS, P, _HELD, "recommender: per-group sums, groups of ≥ k users"),
    Release(EVAL, _EM + _YH_SUMS, P, _HELD, "recommender: Yao & Huang's sums"),
    Release(EVAL, _EM + "item_collision_rate", P, "the declared catalogue and the federation key", "recommender"),
    *(
        Release(EVAL, _EM + k, C, _NOISY, "tabular: clipped loss sum, TSTR confusion counts, score histogram")
        for k in _TAB_NOISY
    ),
    Release(EVAL, _EM + "prior_nll", P, _TAB_HELD, "tabular: validation mean of the cell prior's loss"),
    Release(
        EVAL,
        _EM + "{rmse,mae,hr_at_k,ndcg_at_k,pop_at_k,pop_held_out,pop_lift,coverage_site_mean,coverage_upper}",
        P,
        _HELD,
        "recommender: metrics derived from the sums (rmse alone under SecAgg+)",
    ),
    Release(EVAL, _EM + "group.<v>.<v>.{rmse,mae,ndcg_at_k}", P, _HELD, "recommender: per-group metrics"),
    Release(EVAL, _EM + "unfairness.gender.<v>", P, _HELD, "recommender: Yao & Huang's metrics"),
    # --------------------------------------------------------------- secure sum
    Release(SUM, "secure-sum/update", C, _DP_SGD, "the sum of the updates of the sites that uploaded"),
    Release(SUM, "secure-sum/" + _RECSYS_NOISY, C, _NOISY, "recommender: eval_sums' appended vector, sum"),
    Release(SUM, "secure-sum/" + _GROUP_NOISY, C, _NOISY, "recommender: the schema's groups (0: not sent)"),
    Release(SUM, "secure-sum/" + _RECSYS_SUMS, P, _HELD, "recommender: eval_sums' appended vector, exact sum"),
    Release(SUM, "secure-sum/" + _GROUP_SUMS, P, _HELD, "recommender: the schema's groups (0: not sent)"),
    Release(SUM, "secure-sum/" + _YH_SUMS, P, _HELD, "recommender: Yao & Huang's sums"),
    *(Release(SUM, "secure-sum/" + k, C, _NOISY, "tabular: eval_sums' appended vector, sum") for k in _TAB_NOISY),
    # --------------------------------------------------------- SecAgg+ protocol
    Release(SECAGG, "config:secaggplus_configs/{pk1,pk2}", P, _FLOWER, "fresh key pairs per round, no data"),
    Release(SECAGG, "config:secaggplus_configs/{dsts,ctxts}", P, _FLOWER, "encrypted shares of fresh secrets"),
    Release(SECAGG, "config:secaggplus_configs/{nids,shares}", P, _FLOWER, "shares of fresh secrets, at unmask"),
    Release(
        SECAGG,
        "config:secaggplus_configs/masked_params",
        C,
        "masked; released only as its sum: the `secure-sum/...` rows",
        "quantized update + evaluation sums + masks",
    ),
    # ---------------------------------------------------------------- error reply
    Release(ERROR, "error/code", P, _FLOWER, "Flower's ErrorCode (ClientApp raised)"),
    Release(
        ERROR,
        "error/reason",
        P,
        "privfed's code (client/mods.py failure_text), before the run",
        "`site failed: <exception class> [<code>]` (common/errors.py ERROR_CODES), then a config error's key, "
        "a data error's file role, line and column name, or a class-level public reason; "
        "never the message, a field value or a local path",
    ),
    Release(
        ERROR,
        "error/reason/app-not-approved",
        P,
        "the coordinator's own run (it chose the app), before the run",
        "`AppNotApproved` / `InstalledAppDiffers` (client/supervisor.py): fixed text and the run's FAB hash "
        "(16 hex), which the coordinator submitted; sent by Flower's ClientApp runner before any site data is read",
    ),
    Release(
        ERROR,
        "error/reason/signed-refusal",
        P,
        "the site's own policy (node config) and the instruction (run id, round), before the run",
        "a policy refusal's signed token in the reason text: site id, refused config key, run id, round; no value",
    ),
    # ------------------------------------------------------------ message metadata
    Release(
        META,
        "metadata/{run_id,message_type,group_id,dst_node_id,reply_to_message_id,src_task_id,dst_task_id}",
        P,
        "the server's instruction, which the reply copies",
        "routing",
    ),
    Release(META, "metadata/{src_node_id,message_id}", P, "the SuperLink (node registration, content id)", "ids"),
    Release(META, "metadata/{created_at,ttl}", U, "timing (finding 9): not padded yet", "reply time, deadline left"),
    # ------------------------------------------------------ timing and participation
    Release(TIME, "timing/reply-arrival", U, "timing (finding 9): not padded yet", "training time grows with n"),
    Release(TIME, "timing/clientapp-runtime", U, "timing (finding 9): not padded yet", "flower-supernode reports it"),
    Release(
        TIME,
        "participation/replied",
        P,
        "the site's operator (whether its SuperNode answers), assumed independent of the data",
        "which sites answered which message (failures and SecAgg+ dropouts included)",
    ),
    # ------------------------------------------------------------------- joining
    Release(JOIN, "join/tls-client-hello", P, "the coordinator's SuperLink address and ca.pem", "privfed site join"),
    Release(JOIN, "join/node-public-key", P, "the coordinator registers it before the site joins", "node auth"),
    Release(JOIN, "join/heartbeat", P, _FLOWER, "liveness pings: node id, Flower's interval"),
)

# Fields a short simulated run cannot show (deployment-only, or not one message field).
NOT_OBSERVABLE_PREFIXES = ("secure-sum/", "timing/", "participation/", "join/")


def _compile(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("<i>", i):
            out.append(r"\d+")
            i += 3
        elif pattern.startswith("<v>", i):
            out.append(r"[^./]+")
            i += 3
        elif pattern[i] == "{":
            end = pattern.index("}", i)
            out.append("(?:" + "|".join(re.escape(a) for a in pattern[i + 1 : end].split(",")) + ")")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


@lru_cache(maxsize=1)
def _compiled() -> tuple[tuple[re.Pattern[str], Release], ...]:
    return tuple((_compile(r.field), r) for r in INVENTORY)


def classify(field: str) -> Release | None:
    """The inventory entry for an observed field name, or None if it is not listed."""
    for rx, release in _compiled():
        if rx.fullmatch(field):
            return release
    return None


def unlisted(fields: Iterable[str]) -> list[str]:
    """The fields a site may not release: not in the inventory, or listed as REMOVED."""
    bad = []
    for f in sorted(set(fields)):
        entry = classify(f)
        if entry is None or entry.kind is Kind.REMOVED:
            bad.append(f)
    return bad


def message_fields(msg: Any) -> set[str]:
    """The field names (module docstring) of one Flower message, as it goes on the wire.

    Metadata comes from Flower's own serialisation (``message_to_proto``), so a field
    Flower adds to it shows up here; the content is every record of the RecordDict.
    """
    from flwr.common.serde import message_to_proto

    proto = message_to_proto(msg)
    out = {f"metadata/{d.name}" for d, _ in proto.metadata.ListFields()}
    if msg.has_error():
        return out | {f"error/{d.name}" for d, _ in proto.error.ListFields()}
    content = msg.content
    for kind, records in (
        ("array", content.array_records),
        ("metric", content.metric_records),
        ("config", content.config_records),
    ):
        for name, record in records.items():
            out |= {f"{kind}:{name}/{key}" for key in record}
    return out


_LABEL = {
    C: "COVERED",
    P: "PUBLIC",
    R: "REMOVED",
    U: "**UNCOVERED**",
}


def render_markdown() -> str:
    """The inventory as the markdown of docs/PRIVACY.md's "Release inventory" section."""
    lines = [
        "Generated from `common/privacy/release.py` (`python -m common.privacy.release` rewrites this",
        "block; `tests/unit/test_release.py` fails when they differ). Kinds: COVERED by a DP mechanism",
        "and the ledger rows that charge it; PUBLIC by declaration (who declares it, before what);",
        "REMOVED (no longer sent); **UNCOVERED**: released today without DP, with the issue 18 finding",
        "and the branch that closes it.",
    ]
    for channel in dict.fromkeys(r.channel for r in INVENTORY):
        lines += ["", f"**{channel}**", "", "| field | kind | basis | what |", "|---|---|---|---|"]
        for r in (r for r in INVENTORY if r.channel == channel):
            lines.append(f"| `{r.field}` | {_LABEL[r.kind]} | {r.basis} | {r.reason} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- release-inventory:begin -->", "<!-- release-inventory:end -->"


def doc_section(text: str) -> str:
    """The generated block of a document (between the markers), or '' if it has none."""
    if BEGIN not in text or END not in text:
        return ""
    return text.split(BEGIN, 1)[1].split(END, 1)[0].lstrip("\n")


def write_doc(path: Path) -> None:
    """Replace the generated block of ``path`` with :func:`render_markdown`."""
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{render_markdown()}{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    write_doc(Path(__file__).resolve().parents[2] / "docs" / "PRIVACY.md")
