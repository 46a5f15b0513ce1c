-- /admin at ten million ledger rows, second pass: the cards, the charts and the users table
-- read a few hundred rows at most, whatever the traffic of the day.
--
-- * usage_last_active: each user's newest hour bucket. The users table shows it, and the
--   cards count "active today / this period" as the users whose newest bucket is on or after
--   the start of the day / period: an index range over at most one row per user, instead of
--   a distinct count over every user's day buckets of the period. It is kept by statement
--   triggers on usage_aggregates: a new hour bucket moves it forward (only the first row of a
--   user and model in an hour creates one, so most ledger writes do nothing here); deleted
--   buckets (a user's deletion, a backfill) put it back to the newest bucket left, or remove
--   it. Bucket counts updated to zero still count, as the distinct count over buckets did.
-- * usage_hour_rollups: one row per closed UTC hour and model, the sum of that hour's per-user
--   hour buckets, built by the admin's read the first time a closed hour is asked for (as
--   usage_rollups is for closed days). Today then costs the closed hours' rollups plus the
--   current hour's live buckets. A bucket of a closed hour that changes drops that hour's
--   rollup in the same transaction, under the same advisory lock as the build, so a build
--   never commits a sum that misses a late row.
-- * One user's failures (or refusals) in the log browser: a partial index over the ledger's
--   unsuccessful rows (3 % of them at the benchmark's traffic, so a ledger write of a success
--   pays nothing), keyed as the keyset pages by (created_at, id). Without it, a heavy user's
--   page of 50 failures read ~2,500 of their rows to find them.
-- * The count of users at their limit reads the period's counters: an index on the period, so
--   it reads this period's rows and not every period's (it never changes once a counter
--   exists, so the gate's updates of `used` stay HOT).
-- * The users table's search (names starting with what the admin types, in any case): an
--   index on the lower-cased name, so a search reads its matches, not every name before them.

create table if not exists public.usage_last_active (
  end_user uuid primary key,
  last_hour timestamptz not null
);
create index if not exists usage_last_active_last_hour_idx
  on public.usage_last_active (last_hour);

create table if not exists public.usage_hour_rollups (
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

-- After INSERT on usage_aggregates (`changed`: the buckets created by the statement).
create or replace function public.vtai_usage_buckets_inserted()
returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_hour timestamptz := date_trunc('hour', now() at time zone 'UTC') at time zone 'UTC';
begin
  -- In key order, so two writers that both move users forward take the rows in one order.
  insert into usage_last_active as l (end_user, last_hour)
  select c.end_user, max(c.bucket_start) from changed c
  where c.granularity = 'hour'
  group by c.end_user
  order by c.end_user
  on conflict (end_user) do update set last_hour = excluded.last_hour
  where l.last_hour < excluded.last_hour;
  if exists (select 1 from changed where granularity = 'hour' and bucket_start < v_hour) then
    perform pg_advisory_xact_lock(hashtext('vtai_usage_hour_rollups'));
    delete from usage_hour_rollups r
    where r.bucket_start in (
      select c.bucket_start from changed c
      where c.granularity = 'hour' and c.bucket_start < v_hour
    );
  end if;
  return null;
end
$$;

-- After UPDATE on usage_aggregates: a closed hour's counts changed.
create or replace function public.vtai_usage_buckets_updated()
returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_hour timestamptz := date_trunc('hour', now() at time zone 'UTC') at time zone 'UTC';
begin
  if exists (select 1 from changed where granularity = 'hour' and bucket_start < v_hour) then
    perform pg_advisory_xact_lock(hashtext('vtai_usage_hour_rollups'));
    delete from usage_hour_rollups r
    where r.bucket_start in (
      select c.bucket_start from changed c
      where c.granularity = 'hour' and c.bucket_start < v_hour
    );
  end if;
  return null;
end
$$;

-- After DELETE on usage_aggregates: the users whose newest bucket went get the newest left.
create or replace function public.vtai_usage_buckets_deleted()
returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_hour timestamptz := date_trunc('hour', now() at time zone 'UTC') at time zone 'UTC';
begin
  with gone as (
    select c.end_user, max(c.bucket_start) as newest from changed c
    where c.granularity = 'hour' group by c.end_user
  ), hit as (
    select l.end_user,
           (select max(a.bucket_start) from usage_aggregates a
            where a.end_user = l.end_user and a.granularity = 'hour') as left_newest
    from usage_last_active l join gone g on g.end_user = l.end_user
    where l.last_hour <= g.newest
    order by l.end_user
    for update of l
  ), moved as (
    update usage_last_active l set last_hour = h.left_newest
    from hit h where l.end_user = h.end_user and h.left_newest is not null
  )
  delete from usage_last_active l
  using hit h where l.end_user = h.end_user and h.left_newest is null;
  if exists (select 1 from changed where granularity = 'hour' and bucket_start < v_hour) then
    perform pg_advisory_xact_lock(hashtext('vtai_usage_hour_rollups'));
    delete from usage_hour_rollups r
    where r.bucket_start in (
      select c.bucket_start from changed c
      where c.granularity = 'hour' and c.bucket_start < v_hour
    );
  end if;
  return null;
end
$$;

drop trigger if exists usage_buckets_inserted on public.usage_aggregates;
create trigger usage_buckets_inserted
  after insert on public.usage_aggregates
  referencing new table as changed
  for each statement execute function public.vtai_usage_buckets_inserted();

drop trigger if exists usage_buckets_updated on public.usage_aggregates;
create trigger usage_buckets_updated
  after update on public.usage_aggregates
  referencing new table as changed
  for each statement execute function public.vtai_usage_buckets_updated();

drop trigger if exists usage_buckets_deleted on public.usage_aggregates;
create trigger usage_buckets_deleted
  after delete on public.usage_aggregates
  referencing old table as changed
  for each statement execute function public.vtai_usage_buckets_deleted();

-- Roll up the closed hours in [p_from, p_to) that have no rollup yet; returns the rows added.
create or replace function public.vtai_usage_hour_rollups_fill(
  p_from timestamptz, p_to timestamptz
)
returns bigint
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_from timestamptz := date_trunc('hour', p_from at time zone 'UTC') at time zone 'UTC';
  v_to timestamptz := least(
    p_to, date_trunc('hour', now() at time zone 'UTC') at time zone 'UTC');
  v_rows bigint;
begin
  if not exists (
    select 1 from generate_series(v_from, v_to - interval '1 hour', interval '1 hour') h (hour)
    where not exists (select 1 from usage_hour_rollups r where r.bucket_start = h.hour)
  ) then
    return 0;
  end if;
  perform pg_advisory_xact_lock(hashtext('vtai_usage_hour_rollups'));
  -- An hour with no traffic gets a row of zeros under model '', so it is not summed again.
  insert into usage_hour_rollups (
    bucket_start, model, requests, failures, refusals, prompt_tokens, completion_tokens,
    total_tokens, cost
  )
  select h.hour, coalesce(a.model, ''), coalesce(sum(a.requests), 0),
         coalesce(sum(a.failures), 0), coalesce(sum(a.refusals), 0),
         coalesce(sum(a.prompt_tokens), 0), coalesce(sum(a.completion_tokens), 0),
         coalesce(sum(a.total_tokens), 0), coalesce(sum(a.cost), 0)
  from generate_series(v_from, v_to - interval '1 hour', interval '1 hour') h (hour)
  left join usage_aggregates a on a.granularity = 'hour' and a.bucket_start = h.hour
  where not exists (select 1 from usage_hour_rollups r where r.bucket_start = h.hour)
  group by h.hour, coalesce(a.model, '')
  on conflict (bucket_start, model) do nothing;
  get diagnostics v_rows = row_count;
  return v_rows;
end
$$;

create index if not exists request_logs_end_user_unsuccessful_idx
  on public.request_logs (end_user, status, created_at desc, id desc)
  where status <> 'success';

create index if not exists usage_counters_period_start_idx
  on public.usage_counters (period_start);

create index if not exists profiles_username_lower_idx
  on public.profiles (lower(username) text_pattern_ops);

-- What exists today, before the triggers see anything new.
insert into public.usage_last_active (end_user, last_hour)
select a.end_user, max(a.bucket_start) from public.usage_aggregates a
where a.granularity = 'hour'
group by a.end_user
on conflict (end_user) do update set last_hour = greatest(
  public.usage_last_active.last_hour, excluded.last_hour);

alter table public.usage_last_active enable row level security;
revoke all on public.usage_last_active from public, anon, authenticated;
grant all on public.usage_last_active to service_role;
alter table public.usage_hour_rollups enable row level security;
revoke all on public.usage_hour_rollups from public, anon, authenticated;
grant all on public.usage_hour_rollups to service_role;

revoke all on function public.vtai_usage_buckets_inserted() from public, anon, authenticated;
revoke all on function public.vtai_usage_buckets_updated() from public, anon, authenticated;
revoke all on function public.vtai_usage_buckets_deleted() from public, anon, authenticated;
revoke all on function public.vtai_usage_hour_rollups_fill(timestamptz, timestamptz)
  from public, anon, authenticated;
grant execute on function public.vtai_usage_hour_rollups_fill(timestamptz, timestamptz)
  to service_role;
