-- Usage counters and dashboard buckets for ledger rows that did not arrive through
-- vtai_record_batch(): the rows 20261121000100_legacy_request_logs upgraded in place.
--
-- * Counters: rebuilt from the ledger for each (user, period) holding legacy rows, and only
--   where the counter differs, so counters equal the ledger (vtai_verify_counters() is empty).
-- * Buckets: the triggers of 20261121000200_baseline keep usage_aggregates for every row
--   written after them; rows already in the ledger when they were created (legacy ones) are
--   bucketed here, once: only while the ledger has rows and usage_aggregates has none.
--
-- Nothing to do on a new database (an empty ledger), on one moved onto the baseline (its
-- buckets exist), or when run again. On a legacy ledger a notice gives the row count and a
-- time estimate first (about 300,000 rows/s were measured on 2 cores with PostgreSQL 15; the
-- estimate assumes a third of that).

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

do $$
declare
  v_count bigint;
begin
  if exists (select 1 from public.request_logs)
     and not exists (select 1 from public.usage_aggregates) then
    select count(*) into v_count from public.request_logs;
    raise notice 'usage_aggregates: bucketing % ledger row(s), about % s',
      v_count, ceil(v_count / 100000.0);
    perform public.vtai_backfill_aggregates(
      (select min(created_at) from public.request_logs), now() + interval '1 day');
  end if;
end
$$;
