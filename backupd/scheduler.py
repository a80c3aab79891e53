"""Cron schedules: the only module that imports croniter."""

from __future__ import annotations

from croniter import croniter


def validate_cron(expr: str) -> str | None:
    """Return why `expr` is not a valid 5- or 6-field (seconds first) cron expression, or None."""
    fields = expr.split()
    if len(fields) not in (5, 6):
        return f"expected 5 fields, or 6 with seconds first, got {len(fields)}"
    try:
        croniter(expr, second_at_beginning=len(fields) == 6)
    except (ValueError, KeyError) as exc:
        return str(exc) or "invalid cron expression"
    return None
