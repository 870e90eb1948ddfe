"""Flower client mods: the fixed failure text, SecAgg+ when the server runs it, injected dropouts.

All are plain Flower mods (``(msg, context, call_next) -> Message``), applied in the
order ``failure_mod -> fault_mod -> secure_mod -> ClientApp``: an injected dropout at the
unmask stage happens exactly where a real site that vanished after uploading would stop,
and every failure, Flower's SecAgg+ included, leaves the site in the fixed form.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from common.errors import ConfigError, DataError, error_code, public_word
from common.faults import drops
from common.pipeline.stages.faults import InjectedDropout
from common.runtime import config_from

__all__ = [
    "InjectedDropout",
    "SiteFailure",
    "failure_mod",
    "failure_text",
    "make_fault_mod",
    "secure_mod",
    "secure_stage",
]

log = logging.getLogger(__name__)


class SiteFailure(Exception):
    """What leaves a site whose ClientApp failed: :func:`failure_text`, nothing of the cause."""


def failure_text(exc: BaseException) -> str:
    """``site failed: <class> [<code>]`` plus a public location or reason, built from fields only.

    Flower sends ``str(exception)`` to the server (in simulation with Ray's traceback), and
    an exception's message may hold data values (a statistic, a dataset size, an update
    norm) or a local path. Only these leave the site (release inventory entry ``error/reason``,
    common/privacy/release.py):

    * the class name and its stable code (:func:`common.errors.error_code`);
    * for a :class:`~common.errors.ConfigError`, the name of the config key (never its
      message, which may quote a value);
    * for a :class:`~common.errors.DataError`, the file's role, line and column
      (:meth:`~common.errors.DataError.public_location`; never the path or the field);
    * otherwise a reason fixed in the class body (``public_reason``), if it declares one.

    The full message stays in the site's own log (:func:`failure_mod`).

    A site's policy refusal (common.deploy.site_config.PolicyRefusal) also carries its signed
    token (``refusal_token``: site id, run id, round, the refused key; no value), so the server
    can ledger the refusal under the site it proves: appended after one space, and only when it
    is exactly one well-formed refusal token (release inventory ``error/reason/signed-refusal``).
    """
    cls = type(exc)
    public = getattr(cls, "public_reason", "")
    if isinstance(exc, ConfigError):  # the key's name, which the operator must see to fix it; not the message
        public = f"config key '{public_word(exc.key) or '?'}'"
    elif isinstance(exc, DataError):
        public = exc.public_location()
    text = f"site failed: {cls.__name__} [{error_code(exc)}]"
    if isinstance(public, str) and public:
        text += f" ({public})"
    token = getattr(exc, "refusal_token", "")
    if isinstance(exc, ConfigError) and _is_refusal_token(token, exc.key):
        text += " " + token
    return text


def _is_refusal_token(token: object, key: str) -> bool:
    """Whether ``token`` is one refusal token whose claim has exactly refusal_claim's fields, for ``key``."""
    from common.deploy.signing import REFUSAL_TAG, parse_refusal, refusal_claim

    if not isinstance(token, str) or not token.startswith(REFUSAL_TAG + ":"):
        return False
    parsed = parse_refusal(token)
    if parsed is None:
        return False
    claim, sig = parsed
    shape = refusal_claim("", 0, "", "")
    return (
        set(claim) == set(shape)
        and claim.get("key") == key
        and all(type(claim[k]) is type(shape[k]) for k in shape)
        and token.endswith(":" + sig)
        and len(token.split(":")) == 3
    )


def failure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: a failure is logged in full at the site and raised again in the fixed form.

    Still an exception (not an error reply built here), so Flower drops the node state the
    failed call changed, as for any failing ClientApp (client.app's _restore relies on it).
    """
    try:
        return call_next(msg, context)
    except Exception as exc:
        log.error("the ClientApp failed on a %s message", msg.metadata.message_type, exc_info=exc)
        # from None: Ray's remote traceback (simulation) would otherwise carry the cause's text.
        raise SiteFailure(failure_text(exc)) from None


def secure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``secaggplus_mod`` for the messages of a SecAgg+ round; everything else passes through.

    Flower's mod assumes every TRAIN message is part of the protocol, so a site that
    also takes part in plain rounds needs this switch.
    """
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_stage(msg: Message) -> str | None:
    """The SecAgg+ stage a message belongs to, or None for a plain message."""
    rec = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if rec is None else str(rec.get(Key.STAGE, ""))


def make_fault_mod(defaults: Mapping[str, Any]):
    """A mod that drops this site at the SecAgg+ setup or unmask stage when ``[faults]`` says so.

    The train and upload stages are injected inside the client's ``fit`` (they need the
    round number and must run after the site's own accounting).
    """
    base = dict(defaults)

    def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        stage = secure_stage(msg)
        if stage in (Stage.SETUP, Stage.UNMASK):
            cfg = config_from(base, context.run_config)
            index = context.node_config.get("partition-id")
            rnd = int(msg.metadata.group_id or 0)
            if isinstance(index, int) and drops(cfg.faults, cfg.federation.seed, index, rnd, stage):
                raise InjectedDropout(f"injected dropout: site {index} leaves round {rnd} at SecAgg+ stage {stage}")
        return call_next(msg, context)

    return fault_mod
