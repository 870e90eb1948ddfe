"""Reading and writing a run directory's JSON files, with nothing heavy imported.

``privfed audit`` reads ``metrics.jsonl`` through this module; importing it from the
recorder or the report would load torch and matplotlib first (seconds, for a table).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.errors import DataError


def json_safe(obj: Any) -> Any:
    """JSON with infinities as the strings "inf"/"-inf" (json.dumps would write bare Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of dicts; a damaged file is a one-line error naming the line."""
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"line {i} is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(path, f"line {i} is not a JSON object")
        out.append(obj)
    return out
