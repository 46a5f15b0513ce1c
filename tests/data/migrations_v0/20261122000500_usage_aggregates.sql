-- Time-bucketed usage for dashboards: hour and day buckets per user and model.
--
-- Kept by a trigger on request_logs, so every way a row arrives (vtai_record, spool replay,
-- the legacy migration scripts) updates the buckets in the same transaction as the row.
-- Each row upserts its hour bucket and then its day bucket, always in that order, so
-- concurrent writers queue on the same locks in the same order and cannot deadlock.
-- Dashboards read these buckets, never a scan of request_logs.

create table if not exists public.usage_aggregates (
  granularity text not null check (granularity in ('hour', 'day')),
  bucket_start timestamptz not null,
  -- rows with no user (none today, but the ledger allows it) land under the nil uuid
  end_user uuid not null,
  model text not null,
  requests bigint not null default 0,
  failures bigint not null default 0,
  refusals bigint not null default 0,
  prompt_tokens bigint not null default 0,
  completion_tokens bigint not null default 0,
  total_tokens bigint not null default 0,
  cost numeric(20, 8) not null default 0,
  primary key (granularity, bucket_start, end_user, model)
);
create index if not exists usage_aggregates_end_user_idx
  on public.usage_aggregates (end_user, granularity, bucket_start);

create or replace function public.vtai_aggregate_add(
  p_created timestamptz, p_user uuid, p_model text, p_status text,
  p_prompt bigint, p_completion bigint, p_total bigint, p_cost numeric, p_sign integer
)
returns void
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  g text;
begin
  foreach g in array array['hour', 'day'] loop
    insert into usage_aggregates as a (
      granularity, bucket_start, end_user, model, requests, failures, refusals,
      prompt_tokens, completion_tokens, total_tokens, cost
    ) values (
      g, date_trunc(g, p_created at time zone 'UTC') at time zone 'UTC',
      coalesce(p_user, '00000000-0000-0000-0000-000000000000'::uuid), coalesce(p_model, ''),
      p_sign, p_sign * (p_status = 'failure')::int, p_sign * (p_status = 'refused')::int,
      p_sign * p_prompt, p_sign * p_completion, p_sign * p_total, p_sign * p_cost
    )
    on conflict (granularity, bucket_start, end_user, model) do update set
      requests = a.requests + excluded.requests,
      failures = a.failures + excluded.failures,
      refusals = a.refusals + excluded.refusals,
      prompt_tokens = a.prompt_tokens + excluded.prompt_tokens,
      completion_tokens = a.completion_tokens + excluded.completion_tokens,
      total_tokens = a.total_tokens + excluded.total_tokens,
      cost = a.cost + excluded.cost;
  end loop;
end
$$;

create or replace function public.vtai_request_logs_aggregate()
returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
  if tg_op in ('UPDATE', 'DELETE') then
    perform vtai_aggregate_add(old.created_at, old.end_user, old.model, old.status,
      old.prompt_tokens, old.completion_tokens, old.total_tokens, old.total_cost, -1);
  end if;
  if tg_op in ('INSERT', 'UPDATE') then
    perform vtai_aggregate_add(new.created_at, new.end_user, new.model, new.status,
      new.prompt_tokens, new.completion_tokens, new.total_tokens, new.total_cost, 1);
  end if;
  return null;
end
$$;

drop trigger if exists request_logs_aggregate on public.request_logs;
create trigger request_logs_aggregate
  after insert or update of created_at, end_user, model, status, prompt_tokens,
    completion_tokens, total_tokens, total_cost or delete
  on public.request_logs
  for each row execute function public.vtai_request_logs_aggregate();

-- Rebuild the buckets of [p_from, p_to) from the ledger, e.g. after a bulk load done with the
-- trigger disabled. Whole days: the range is widened to UTC day boundaries.
create or replace function public.vtai_backfill_aggregates(p_from timestamptz, p_to timestamptz)
returns bigint
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_from timestamptz := date_trunc('day', p_from at time zone 'UTC') at time zone 'UTC';
  v_to timestamptz := (date_trunc('day', (p_to - interval '1 microsecond') at time zone 'UTC')
                       + interval '1 day') at time zone 'UTC';
  v_rows bigint;
begin
  delete from usage_aggregates where bucket_start >= v_from and bucket_start < v_to;
  insert into usage_aggregates (
    granularity, bucket_start, end_user, model, requests, failures, refusals,
    prompt_tokens, completion_tokens, total_tokens, cost
  )
  select g.granularity,
         date_trunc(g.granularity, r.created_at at time zone 'UTC') at time zone 'UTC',
         coalesce(r.end_user, '00000000-0000-0000-0000-000000000000'::uuid), r.model,
         count(*), count(*) filter (where r.status = 'failure'),
         count(*) filter (where r.status = 'refused'),
         sum(r.prompt_tokens), sum(r.completion_tokens), sum(r.total_tokens),
         sum(r.total_cost)
  from request_logs r
  cross join (values ('hour'), ('day')) as g (granularity)
  where r.created_at >= v_from and r.created_at < v_to
  group by 1, 2, 3, 4;
  get diagnostics v_rows = row_count;
  return v_rows;
end
$$;

-- Day buckets that differ from the ledger (and hour buckets that don't add up to their day).
-- An empty result means the aggregates equal the ledger.
create or replace function public.vtai_verify_aggregates()
returns table (bucket_start timestamptz, end_user uuid, model text, what text,
               aggregate_value numeric, ledger_value numeric)
language sql stable
security definer
set search_path = public, pg_temp
as $$
  with ledger as (
    select date_trunc('day', r.created_at at time zone 'UTC') at time zone 'UTC' as day,
           coalesce(r.end_user, '00000000-0000-0000-0000-000000000000'::uuid) as end_user,
           r.model, count(*)::numeric as requests, sum(r.total_tokens)::numeric as tokens,
           sum(r.total_cost)::numeric as cost
    from request_logs r group by 1, 2, 3
  ), days as (
    select a.bucket_start as day, a.end_user, a.model, a.requests::numeric as requests,
           a.total_tokens::numeric as tokens, a.cost::numeric as cost
    from usage_aggregates a where a.granularity = 'day'
  ), hours as (
    select date_trunc('day', a.bucket_start at time zone 'UTC') at time zone 'UTC' as day,
           a.end_user, a.model, sum(a.requests)::numeric as requests,
           sum(a.total_tokens)::numeric as tokens, sum(a.cost)::numeric as cost
    from usage_aggregates a where a.granularity = 'hour' group by 1, 2, 3
  ), compared as (
    select coalesce(l.day, d.day) as day, coalesce(l.end_user, d.end_user) as end_user,
           coalesce(l.model, d.model) as model,
           coalesce(d.requests, 0) as d_requests, coalesce(l.requests, 0) as l_requests,
           coalesce(d.tokens, 0) as d_tokens, coalesce(l.tokens, 0) as l_tokens,
           coalesce(d.cost, 0) as d_cost, coalesce(l.cost, 0) as l_cost,
           coalesce(h.requests, 0) as h_requests, coalesce(h.tokens, 0) as h_tokens
    from ledger l
    full join days d on d.day = l.day and d.end_user = l.end_user and d.model = l.model
    left join hours h on h.day = coalesce(l.day, d.day)
      and h.end_user = coalesce(l.end_user, d.end_user) and h.model = coalesce(l.model, d.model)
  )
  select c.day, c.end_user, c.model, x.what, x.agg, x.led
  from compared c
  cross join lateral (values
    ('requests', c.d_requests, c.l_requests),
    ('total_tokens', c.d_tokens, c.l_tokens),
    ('cost', c.d_cost, c.l_cost),
    ('hour requests', c.h_requests, c.l_requests),
    ('hour total_tokens', c.h_tokens, c.l_tokens)
  ) as x (what, agg, led)
  where x.agg is distinct from x.led
    and not (x.agg = 0 and x.led = 0)
$$;

alter table public.usage_aggregates enable row level security;
revoke all on public.usage_aggregates from public, anon, authenticated;
grant select on public.usage_aggregates to authenticated;
grant all on public.usage_aggregates to service_role;

drop policy if exists "usage_aggregates: users read their own" on public.usage_aggregates;
create policy "usage_aggregates: users read their own" on public.usage_aggregates
  for select to authenticated using ((select auth.uid()) = end_user);

revoke all on function public.vtai_aggregate_add(
  timestamptz, uuid, text, text, bigint, bigint, bigint, numeric, integer
) from public, anon, authenticated;
revoke all on function public.vtai_request_logs_aggregate() from public, anon, authenticated;
revoke all on function public.vtai_backfill_aggregates(timestamptz, timestamptz)
  from public, anon, authenticated;
revoke all on function public.vtai_verify_aggregates() from public, anon, authenticated;
grant execute on function public.vtai_backfill_aggregates(timestamptz, timestamptz),
  public.vtai_verify_aggregates() to service_role;

-- Buckets for ledger rows written before this migration.
select public.vtai_backfill_aggregates(
  coalesce((select min(created_at) from public.request_logs), now()), now() + interval '1 day'
);
