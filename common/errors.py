"""Errors a user can act on. Each renders as one line that names what is wrong.

Two audiences. The full message (``str(exc)``) is for the operator on the machine that
raised it: it may name a local path, never a data value. What a *site* tells the
coordinator is built only from the error's public fields (client.mods.failure_text): a
stable code (:data:`ERROR_CODES`), and for a :class:`DataError` the file's role and the line
and column, for a :class:`ConfigError` the key; never the message, a value or a path.
"""

from __future__ import annotations

import re
from typing import ClassVar

# Every code a site may send, and what it means (docs/DEPLOYMENT.md's error table). Stable:
# the coordinator's operator looks them up, and tests match them.
ERROR_CODES: dict[str, str] = {
    "E-CONFIG": "the run config (or the site's node config) has a bad value for the named key",
    "E-POLICY": "the site's own policy refused the run config at the named key",
    "E-DATA-MISSING": "the site's data file (by its role) is missing or empty",
    "E-DATA-FORMAT": "the site's data file is not in the expected format (header, archive, array shape or type)",
    "E-DATA-PARSE": "a field of the site's data file is not valid (at the named line and column)",
    "E-KEY": "a key file at the site is missing or malformed",
    "E-RECEIPT": "the coordinator's ledger receipt does not verify, or contradicts an earlier one",
    "E-REPLAY": "an instruction for a round the site already trained in",
    "E-FAULT": "a failure injected on purpose by the run's [faults] section",
    "E-TRAINING": "training cannot produce a meaningful model",
    "E-SITE": "another failure the site reports in its own log",
    "E-INTERNAL": "an unexpected exception (a bug): details in the site's log",
}

# Classes defined elsewhere whose code is not their base class's (matched by name along the
# exception's MRO, so this module imports none of them).
_CODE_BY_CLASS: dict[str, str] = {
    "PolicyRefusal": "E-POLICY",
    "KeyFileError": "E-KEY",
    "SigningKeyError": "E-KEY",
    "PkiError": "E-KEY",
    "ReceiptRefused": "E-RECEIPT",
    "ReceiptContradiction": "E-RECEIPT",
    "ReceiptError": "E-RECEIPT",
    "RoundReplayed": "E-REPLAY",
    "InjectedDropout": "E-FAULT",
    "InjectedCrash": "E-FAULT",
}

# What a public location field may hold: a role such as "users file", a column such as
# "age" or "x". Anything else is dropped from the public reason rather than sent.
_PUBLIC_WORDS = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,62}")


def error_code(exc: BaseException) -> str:
    """The stable code of ``exc``: its own (a DataError's), its class's or nearest base's, else E-INTERNAL."""
    own = exc.__dict__.get("code") if isinstance(exc, PrivfedError) else None
    if isinstance(own, str) and own in ERROR_CODES:
        return own
    for cls in type(exc).__mro__:
        code = cls.__dict__.get("code") or _CODE_BY_CLASS.get(cls.__name__)
        if isinstance(code, str) and code in ERROR_CODES:
            return code
    return "E-INTERNAL"


def public_word(text: object) -> str:
    """``text`` if it is a short plain name (a role, a column), else "": never a value."""
    return text if isinstance(text, str) and _PUBLIC_WORDS.fullmatch(text) else ""


class PrivfedError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits 2, never a traceback."""

    code: ClassVar[str] = "E-SITE"


class ConfigError(PrivfedError, ValueError):
    """An invalid configuration value; the message names the offending key."""

    code: ClassVar[str] = "E-CONFIG"

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class DataError(PrivfedError, ValueError):
    """A missing or corrupt data file; the message names the file, for the local operator.

    ``role`` (what the file is: "ratings file", "users file", "image archive"), ``line``
    and ``column`` (a column or array name the loader knows, never text from the file) are
    the public location: the only part of the error a site sends the coordinator, with the
    code. ``code`` says what is wrong: E-DATA-MISSING, E-DATA-FORMAT or E-DATA-PARSE.
    """

    code: ClassVar[str] = "E-DATA-FORMAT"
    MISSING: ClassVar[str] = "E-DATA-MISSING"
    FORMAT: ClassVar[str] = "E-DATA-FORMAT"
    PARSE: ClassVar[str] = "E-DATA-PARSE"

    def __init__(
        self,
        path: object,
        message: str,
        *,
        role: str = "data file",
        line: int | None = None,
        column: str | None = None,
        code: str | None = None,
    ) -> None:
        self.path = str(path)
        self.role = role
        self.line = line
        self.column = column
        if code is not None:
            if not code.startswith("E-DATA-") or code not in ERROR_CODES:
                raise ValueError(f"not a data error code: {code}")
            self.code = code  # type: ignore[misc]  # the instance's code, over the class default
        super().__init__(f"data file '{path}': {message}")

    def public_location(self) -> str:
        """``users file, line 2, column age``: role, line, column; only what the loader named."""
        parts = [public_word(self.role) or "data file"]
        if isinstance(self.line, int) and not isinstance(self.line, bool) and self.line > 0:
            parts.append(f"line {self.line}")
        if column := public_word(self.column):
            parts.append(f"column {column}")
        return ", ".join(parts)


class TrainingFailure(PrivfedError):
    """A run that cannot produce a meaningful model (divergence, mode collapse); it ends
    the run, and the last checkpoint stays the last good round's."""

    code: ClassVar[str] = "E-TRAINING"
