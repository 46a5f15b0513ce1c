-- /admin at ten million ledger rows (issue #21): what the dashboard reads without scanning
-- per-user buckets, and log pages that stay keyset at any depth with a filter.
--
-- * usage_rollups: one row per closed UTC day and model, the sum of that day's per-user
--   `usage_aggregates` day buckets. The charts and the period's cards read these, plus
--   today's buckets live. They are written by the admin's read (vtai/admin/reports.py), the
--   first time a closed day is asked for, never by the ledger: a ledger write pays nothing
--   for them unless it lands in a day that is already closed.
-- * A bucket of a closed day that changes (a late row from the spool, an admin fix, a
--   backfill) drops that day's rollup in the same transaction, so the next read rebuilds it.
--   The drop and the build take the same transaction-scoped advisory lock, so a build can't
--   commit a day's sum that misses a late row committed while it ran.
-- * The log browser's model and status filters page by `(created_at, id)`: their indexes now
--   end in id, as the unfiltered and per-user ones do, so a deep page with a filter is one
--   index range scan rather than a sort of every tie.

create table if not exists public.usage_rollups (
  bucket_start timestamptz not null,
  model text not null,
  requests bigint not null default 0,
  failures bigint not null default 0,
  refusals bigint not null default 0,
  prompt_tokens bigint not null default 0,
  completion_tokens bigint not null default 0,
  total_tokens bigint not null default 0,
  cost numeric(20, 8) not null default 0,
  primary key (bucket_start, model)
);

-- Drop the rollups of closed days whose buckets changed (`changed`: the transition table).
create or replace function public.vtai_usage_rollups_drop()
returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_today timestamptz := date_trunc('day', now() at time zone 'UTC') at time zone 'UTC';
begin
  if exists (select 1 from changed where granularity = 'day' and bucket_start < v_today) then
    perform pg_advisory_xact_lock(hashtext('vtai_usage_rollups'));
    delete from usage_rollups r
    where r.bucket_start in (
      select c.bucket_start from changed c
      where c.granularity = 'day' and c.bucket_start < v_today
    );
  end if;
  return null;
end
$$;

drop trigger if exists usage_rollups_drop_insert on public.usage_aggregates;
create trigger usage_rollups_drop_insert
  after insert on public.usage_aggregates
  referencing new table as changed
  for each statement execute function public.vtai_usage_rollups_drop();

drop trigger if exists usage_rollups_drop_update on public.usage_aggregates;
create trigger usage_rollups_drop_update
  after update on public.usage_aggregates
  referencing new table as changed
  for each statement execute function public.vtai_usage_rollups_drop();

drop trigger if exists usage_rollups_drop_delete on public.usage_aggregates;
create trigger usage_rollups_drop_delete
  after delete on public.usage_aggregates
  referencing old table as changed
  for each statement execute function public.vtai_usage_rollups_drop();

-- Roll up the closed days in [p_from, p_to) that have no rollup yet; returns the rows added.
create or replace function public.vtai_usage_rollups_fill(p_from timestamptz, p_to timestamptz)
returns bigint
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_today timestamptz := date_trunc('day', now() at time zone 'UTC') at time zone 'UTC';
  v_to timestamptz := least(p_to, v_today);
  v_rows bigint;
begin
  if not exists (
    select 1 from generate_series(p_from, v_to - interval '1 day', interval '1 day') d (day)
    where not exists (select 1 from usage_rollups r where r.bucket_start = d.day)
  ) then
    return 0;
  end if;
  perform pg_advisory_xact_lock(hashtext('vtai_usage_rollups'));
  -- A day with no traffic gets a row of zeros under model '', so it is not summed again.
  insert into usage_rollups (
    bucket_start, model, requests, failures, refusals, prompt_tokens, completion_tokens,
    total_tokens, cost
  )
  select d.day, coalesce(a.model, ''), coalesce(sum(a.requests), 0),
         coalesce(sum(a.failures), 0), coalesce(sum(a.refusals), 0),
         coalesce(sum(a.prompt_tokens), 0), coalesce(sum(a.completion_tokens), 0),
         coalesce(sum(a.total_tokens), 0), coalesce(sum(a.cost), 0)
  from generate_series(p_from, v_to - interval '1 day', interval '1 day') d (day)
  left join usage_aggregates a on a.granularity = 'day' and a.bucket_start = d.day
  where not exists (select 1 from usage_rollups r where r.bucket_start = d.day)
  group by d.day, coalesce(a.model, '')
  on conflict (bucket_start, model) do nothing;
  get diagnostics v_rows = row_count;
  return v_rows;
end
$$;

create index if not exists request_logs_model_created_id_idx
  on public.request_logs (model, created_at desc, id desc);
drop index if exists public.request_logs_model_created_idx;
create index if not exists request_logs_status_created_id_idx
  on public.request_logs (status, created_at desc, id desc);
drop index if exists public.request_logs_status_created_idx;

alter table public.usage_rollups enable row level security;
revoke all on public.usage_rollups from public, anon, authenticated;
grant all on public.usage_rollups to service_role;

revoke all on function public.vtai_usage_rollups_drop() from public, anon, authenticated;
revoke all on function public.vtai_usage_rollups_fill(timestamptz, timestamptz)
  from public, anon, authenticated;
grant execute on function public.vtai_usage_rollups_fill(timestamptz, timestamptz)
  to service_role;
