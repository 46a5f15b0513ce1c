"""The request log as CSV, streamed in batches; cells that a spreadsheet would run as a
formula are escaped.
"""

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg

from vtai.admin.reports import LogFilter, encode_cursor, log_query

# Rows per keyset query: each is its own short statement (no transaction held across the
# export), and at 5,000 the per-query cost is under 2 % of formatting the rows.
CSV_BATCH = 5000


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


# total_cost is null when the model is not in LiteLLM's price map: never shown as a cost of 0.
_COST = CSV_COLUMNS.index("total_cost")
_PLAIN = (int, float)


def _csv_row(record) -> list[str]:
    out = []
    for i, value in enumerate(record):
        if value is None:
            out.append("unknown" if i == _COST else "")
        elif isinstance(value, _PLAIN):
            out.append(value)  # numbers: csv writes them as str() would
        else:
            out.append(_cell(value))
    return out


async def csv_rows(pool: asyncpg.Pool, f: LogFilter) -> AsyncIterator[str]:
    """The filtered rows as CSV text, a keyset batch at a time (no long-held transaction)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    cursor = None
    while True:
        sql, args = log_query(f, cursor, CSV_BATCH)
        rows = await pool.fetch(sql, *args)
        more = len(rows) > CSV_BATCH
        rows = rows[:CSV_BATCH]
        # The query's columns are CSV_COLUMNS, in that order.
        writer.writerows(map(_csv_row, rows))
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
        if not more:
            return
        cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"])
