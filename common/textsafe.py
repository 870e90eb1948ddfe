"""Text that a site or a data file chose, made inert before it reaches a report.

Site ids, failure strings, metric names, stop reasons and config strings end up in three
kinds of output, each with its own way to turn text into something else:

* **Markdown** (summary.md): ``|`` ends a table cell and a newline ends the row, so
  ``a|b\\n| forged row |`` adds a row of the writer's choosing; backticks, ``[..](..)``
  and raw HTML (``<img src=...>``) change what a reader sees. :func:`md_cell`.
* **CSV** (``privfed audit --format csv``): a spreadsheet runs a cell that starts with
  ``=``, ``+``, ``-``, ``@``, TAB or CR as a formula (``=HYPERLINK(...)``, DDE). The OWASP
  guard prefixes such a cell with an apostrophe. :func:`csv_cell`.
* **The console** (rich): ``[bold red]...[/]`` is markup, and ESC sequences move the
  cursor, clear the screen or retitle the terminal; a newline forges a line of its own.
  :func:`console_text`.

Every helper keeps the text: it is escaped, never dropped, so an operator still sees what
a site sent. Each one is for a single interpolated value, never for a whole line that the
program built (that would escape the program's own markup too).
"""

from __future__ import annotations

import re
from typing import Any

from rich.markup import escape as _rich_escape

# ASCII punctuation that CommonMark lets a backslash escape and that changes a table cell:
# cell and code delimiters, emphasis, links and images, strike-through, autolinks, entities.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~!#])")
_MD_ENTITY = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# C0 controls, DEL and C1 controls: none of them is text, all of them can drive a terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The first characters that make a spreadsheet read a cell as a formula (OWASP, CSV injection).
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def _visible_controls(text: str) -> str:
    """Control characters as their Python escapes (``\\n``, ``\\x1b``): shown, not obeyed."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def one_line(value: Any) -> str:
    """``value`` as one line of plain text: control characters (newlines too) as visible escapes."""
    return _visible_controls(str(value))


def md_cell(value: Any) -> str:
    """``value`` as inert Markdown text for one table cell or one list item.

    Newlines and other controls become visible escapes (``\\n``) so a value stays on its
    row; ``|``, backticks, emphasis and link brackets are backslash-escaped; ``& < >``
    become entities, so HTML is shown, not rendered. A reader sees the same characters.
    """
    text = _visible_controls(str(value))
    text = "".join(_MD_ENTITY.get(ch, ch) for ch in text)
    return _MD_SPECIAL.sub(r"\\\1", text)


def csv_cell(value: Any) -> Any:
    """``value`` made safe for a CSV cell that a spreadsheet may open.

    Text starting with a formula character gets a leading apostrophe (the OWASP guard:
    spreadsheets show the apostrophe-prefixed text as text). Numbers, bools and None pass
    unchanged: the program wrote them, and a negative number is not a formula. Quoting of
    commas and quotes is left to :mod:`csv`.
    """
    if isinstance(value, str) and value.startswith(CSV_FORMULA_START):
        return "'" + value
    return value


def console_text(value: Any) -> str:
    """``value`` as inert text inside a rich markup string.

    Rich markup (``[bold]``) is escaped with :func:`rich.markup.escape`, and control
    characters (ESC sequences, newlines, carriage returns) become visible escapes: rich
    passes ESC through to the terminal, and a newline would let the value forge a line.
    """
    return _rich_escape(_visible_controls(str(value)))
