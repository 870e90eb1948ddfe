"""Flower client mods: SecAgg+ when the server runs it, and injected dropouts.

Both are plain Flower mods (``(msg, context, call_next) -> Message``), applied in the
order ``fault_mod -> secure_mod -> ClientApp``, so an injected dropout at the unmask
stage happens exactly where a real site that vanished after uploading would stop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from common.faults import drops
from common.pipeline.stages.faults import InjectedDropout
from common.runtime import config_from

__all__ = ["InjectedDropout", "make_fault_mod", "secure_mod", "secure_stage"]


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
