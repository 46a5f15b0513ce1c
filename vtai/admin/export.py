"""The request log as CSV, streamed in batches; cells that a spreadsheet would run as a
formula are escaped.

Postgres renders each cell as the text the CSV holds (a timestamp as Python's isoformat, a
cost as str() of its Decimal, the formula guard), so the app only joins cells with Python's
csv writer, in C: no Python code runs per row or per cell. The next batch is fetched while
this one is written out, so the database and the app work at the same time.
"""

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg

from vtai.admin.reports import ISO_CREATED_AT, LogFilter, encode_cursor, log_query

# Rows per keyset query: each is its own short statement (no transaction held across the
# export), and at 5,000 the per-query cost is under 2 % of the rows' own.
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

# A text cell a spreadsheet would run as a formula (it starts with one of = + - @ tab CR)
# gets a leading apostrophe.
_FORMULA = "left({0}, 1) in ('=', '+', '-', '@', E'\\t', E'\\r')"


def _text(expr: str) -> str:
    return f"case when {_FORMULA.format(expr)} then '''' || {expr} else {expr} end"


# str() of the Decimal asyncpg would return: plain digits, except below 10^-6 (and a zero
# with more than 6 decimals), which Python writes as 5.0E-7 or 0E-8. The cost is null when
# the model has no price in LiteLLM's map: "unknown", never a cost of 0.
_COST = """case
    when c.cost is null then 'unknown'
    when c.cost <> 0 and abs(c.cost) >= 0.000001 or c.cost = 0 and scale(c.cost) <= 6
      then c.cost::text
    else case when c.cost < 0 then '-' else '' end || left(c.digits, 1)
      || case when length(c.digits) > 1 then '.' || substr(c.digits, 2) else '' end
      || 'E' || (length(c.digits) - 1 - scale(c.cost))::text
  end"""

_CSV_SELECT = f"""
        select r.id, {ISO_CREATED_AT}, {_text("p.username")}, r.end_user::text,
               {_text("r.model")}, {_text("r.provider")}, {_text("r.status")},
               r.prompt_tokens, r.completion_tokens, r.total_tokens, {_COST},
               r.response_time,
               {_text("e.error")}
        from public.request_logs r
        left join public.profiles p on p.id = r.end_user
        cross join lateral (
          select case when r.additional_details @> '{{"cost_unknown": true}}' then null
                      else r.total_cost end as cost
        ) c0
        cross join lateral (
          select c0.cost,
                 coalesce(nullif(ltrim(replace(abs(c0.cost)::text, '.', ''), '0'), ''), '0')
                   as digits
        ) c
        cross join lateral (
          select coalesce((r.error ->> 'class') || ': ' || left(r.error ->> 'message', 200),
                          r.additional_details ->> 'reason') as error
        ) e"""


async def csv_rows(pool: asyncpg.Pool, f: LogFilter) -> AsyncIterator[str]:
    """The filtered rows as CSV, a keyset batch at a time (no long-held transaction)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    yield buf.getvalue()

    def fetch(cursor: str | None) -> asyncio.Future:
        sql, args = log_query(f, cursor, CSV_BATCH, select=_CSV_SELECT)
        return asyncio.ensure_future(pool.fetch(sql, *args))

    pending = fetch(None)
    try:
        while True:
            rows = await pending
            more = len(rows) > CSV_BATCH
            rows = rows[:CSV_BATCH]
            if more:
                # created_at is the CSV's isoformat text; the id the first cell.
                last = rows[-1]
                pending = fetch(encode_cursor(datetime.fromisoformat(last[1]), last[0]))
            buf.seek(0)
            buf.truncate()
            writer.writerows(rows)
            yield buf.getvalue()
            if not more:
                return
    finally:
        # The client went away mid-download: no batch left running for nobody.
        if not pending.done():
            pending.cancel()
