"""The request log as CSV, streamed in batches; cells that a spreadsheet would run as a
formula are escaped.
"""

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg

from vtai.admin.reports import LogFilter, log_page

CSV_BATCH = 1000


CSV_COLUMNS = (
    "id",
    "created_at",
    "username",
    "end_user",
    "model",
    "provider",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "total_cost",
    "response_time",
    "error",
)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    text = str(value)
    # A spreadsheet would run a cell starting with one of these as a formula.
    if isinstance(value, str) and text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def _csv_cell(row: dict, column: str) -> str:
    if column == "total_cost" and row[column] is None:
        return "unknown"  # not in LiteLLM's price map: never shown as a cost of 0
    return _cell(row[column])


async def csv_rows(pool: asyncpg.Pool, f: LogFilter) -> AsyncIterator[str]:
    """The filtered rows as CSV text, a keyset batch at a time (no long-held transaction)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    cursor = None
    while True:
        page = await log_page(pool, f, cursor, CSV_BATCH)
        for r in page["rows"]:
            writer.writerow([_csv_cell(r, c) for c in CSV_COLUMNS])
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
        cursor = page["next_cursor"]
        if cursor is None:
            return
