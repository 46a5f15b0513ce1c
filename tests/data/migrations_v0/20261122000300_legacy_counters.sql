-- Rows upgraded from the legacy request_logs (20261122000150) were never settled through
-- vtai_record(), so their users' counters are rebuilt from the ledger. Only (user, period)
-- pairs holding legacy rows are touched, and only where the counter differs: re-running this,
-- or running it on a database with no legacy rows, changes nothing.
alter table public.request_logs add column if not exists legacy_end_user text;

insert into public.usage_counters as c (end_user, period_start, used)
select r.end_user, r.period_start, sum(r.total_tokens)::bigint
from public.request_logs r
where (r.end_user, r.period_start) in (
  select l.end_user, l.period_start from public.request_logs l
  where l.additional_details @> '{"legacy": true}' and l.end_user is not null
    and l.period_start is not null)
group by r.end_user, r.period_start
on conflict (end_user, period_start) do update
set used = excluded.used, updated_at = now()
where c.used is distinct from excluded.used;
