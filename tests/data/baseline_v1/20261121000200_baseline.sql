-- VT.ai's schema: every table, function, policy and grant, in one file.
--
-- It replaces the twelve files VT.ai used while 0.1.0 was developed (20261122000000 to
-- 20261130000100; a copy is kept in tests/data/migrations_v0/): this is their final state, each
-- function with its last body. vtai/db/migrations.py recognises a database migrated with those
-- files and records this one as applied without running it (docs/supabase.md).
--
-- Before it: 20261121000000_supabase_compat (roles and auth.* where missing) and
-- 20261121000100_legacy_request_logs (an older request_logs reshaped in place). After it:
-- 20261121000300_chat_history (Chainlit's tables) and 20261121000400_legacy_backfill (counters
-- and usage buckets for upgraded legacy rows; nothing to do on a new database).
--
-- Supabase's default privileges grant anon and authenticated ALL on every new table and
-- function in public, so every object below revokes explicitly and relies on RLS: one policy
-- per operation and role, `(select auth.uid())` evaluated once per statement. The server
-- connects as the owner (direct path) or as service_role (REST path); both bypass RLS.
-- Safe to run again (tests and scripts/update_request_logs_rls.py do): it only creates what is
-- missing and replaces function bodies, policies and grants with the same ones.


-- 1. Tiers, user profiles, and the password store -------------------------------------------

create table if not exists public.tiers (
  name text primary key,
  -- null means unlimited
  token_limit bigint check (token_limit is null or token_limit >= 0),
  rank int not null default 0
);

-- The app overwrites limits from VTAI_LIMIT_* at start-up (vtai/db/connection.py sync_tiers).
insert into public.tiers (name, token_limit, rank) values
  ('free', 10000, 0),
  ('basic', 100000, 1),
  ('premium', 500000, 2),
  ('unlimited', null, 3)
on conflict (name) do nothing;

create table if not exists public.profiles (
  -- On Supabase Auth logins this equals auth.users.id; local logins get a fresh uuid.
  id uuid primary key default gen_random_uuid(),
  username text not null unique
    check (length(username) between 1 and 64 and username !~ '[[:space:][:cntrl:]]'),
  tier text not null default 'free' references public.tiers (name) on update cascade,
  is_admin boolean not null default false,
  created_at timestamptz not null default now(),
  -- set by `vtai user disable`: the user's logins end and no new one starts
  disabled_at timestamptz
);

-- Password hashes live outside public so PostgREST never exposes them, with no grants to
-- any user-level role and RLS on with no policy as a second lock.
create schema if not exists vtai_private;
revoke all on schema vtai_private from public, anon, authenticated;

create table if not exists vtai_private.credentials (
  profile_id uuid primary key references public.profiles (id) on delete cascade,
  password_hash text not null,
  updated_at timestamptz not null default now()
);

alter table vtai_private.credentials enable row level security;
revoke all on vtai_private.credentials from public, anon, authenticated;

alter table public.tiers enable row level security;
alter table public.profiles enable row level security;
revoke all on public.tiers, public.profiles from public, anon, authenticated;
grant select on public.tiers, public.profiles to authenticated;
grant all on public.tiers, public.profiles to service_role;

drop policy if exists "tiers: authenticated users read" on public.tiers;
create policy "tiers: authenticated users read" on public.tiers
  for select to authenticated using (true);

drop policy if exists "profiles: users read their own" on public.profiles;
create policy "profiles: users read their own" on public.profiles
  for select to authenticated using ((select auth.uid()) = id);


-- 2. Metering: the ledger, per-user per-period counters, reservations ------------------------
--
-- Rules (docs/metering.md explains them for operators):
-- * vtai_reserve() is the gate: one call, one transaction, serialised on the user's counter
--   row, so concurrent turns from any number of processes can never overshoot the limit. It
--   reads one counter row, never the user's history.
-- * vtai_record_batch() is the only definition of how a ledger row is accounted; vtai_record()
--   is a one-row batch. A row is written exactly once per litellm_call_id and, in the same
--   transaction, its reservation is released and its counter moved. Replays are no-ops.
-- * Lock order is ledger row -> reservation -> counter everywhere, each in key order (ledger
--   rows by call id, counters by user and period), so concurrent batches queue instead of
--   deadlocking; vtai_reserve() takes the counter first but only touches reservations with
--   SKIP LOCKED, so the two cannot deadlock either.

create table if not exists public.usage_counters (
  end_user uuid not null,
  period_start timestamptz not null,
  used bigint not null default 0 check (used >= 0),
  reserved bigint not null default 0 check (reserved >= 0),
  updated_at timestamptz not null default now(),
  primary key (end_user, period_start)
);

create table if not exists public.reservations (
  id uuid primary key default gen_random_uuid(),
  end_user uuid not null,
  period_start timestamptz not null,
  amount bigint not null check (amount >= 0),
  created_at timestamptz not null default now(),
  expires_at timestamptz not null
);
create index if not exists reservations_end_user_expires_idx
  on public.reservations (end_user, expires_at);

create table if not exists public.request_logs (
  id bigint generated by default as identity primary key,
  created_at timestamptz not null default now(),
  end_user uuid,
  session_id text,
  model text not null default '',
  provider text,
  status text not null check (status in ('success', 'failure', 'refused')),
  prompt_tokens integer not null default 0 check (prompt_tokens >= 0),
  completion_tokens integer not null default 0 check (completion_tokens >= 0),
  total_tokens integer not null default 0 check (total_tokens >= 0),
  total_cost numeric(18, 8) not null default 0,
  response_time real,
  litellm_call_id text not null unique,
  -- the usage period this row was charged to; makes counters verifiable against the ledger
  period_start timestamptz,
  messages jsonb,
  response jsonb,
  error jsonb,
  additional_details jsonb not null default '{}'::jsonb,
  -- the original user value of rows migrated from the legacy design (may not be a uuid)
  legacy_end_user text
);
-- Every ledger insert pays for every index, so there are only these. The last two serve the
-- log browser's keyset pagination, `(created_at, id) < (cursor)` newest first, for all users
-- and for one user (without id, ties on created_at would be sorted per page). Nothing looks
-- rows up by (end_user, period_start): counters are verified with a scan of the whole ledger.
create index if not exists request_logs_session_idx on public.request_logs (session_id);
create index if not exists request_logs_model_created_idx
  on public.request_logs (model, created_at desc);
create index if not exists request_logs_status_created_idx
  on public.request_logs (status, created_at desc);
create index if not exists request_logs_created_id_idx
  on public.request_logs (created_at desc, id desc);
create index if not exists request_logs_end_user_created_id_idx
  on public.request_logs (end_user, created_at desc, id desc);

-- UTC calendar periods. 'lifetime' is one period that never resets.
create or replace function public.vtai_period_start(p_period text, p_at timestamptz)
returns timestamptz
language sql immutable
set search_path = pg_catalog
as $$
  select case p_period
    when 'day' then date_trunc('day', p_at at time zone 'UTC') at time zone 'UTC'
    when 'week' then date_trunc('week', p_at at time zone 'UTC') at time zone 'UTC'
    when 'month' then date_trunc('month', p_at at time zone 'UTC') at time zone 'UTC'
    when 'lifetime' then timestamptz '1970-01-01 00:00:00+00'
  end
$$;

create or replace function public.vtai_period_end(p_period text, p_start timestamptz)
returns timestamptz
language sql immutable
set search_path = pg_catalog
as $$
  select case p_period
    when 'day' then ((p_start at time zone 'UTC') + interval '1 day') at time zone 'UTC'
    when 'week' then ((p_start at time zone 'UTC') + interval '1 week') at time zone 'UTC'
    when 'month' then ((p_start at time zone 'UTC') + interval '1 month') at time zone 'UTC'
  end
$$;

-- The gate. Grants at most what is left: prompt tokens plus a completion budget clamped so
-- the answer cannot cross the limit. Refuses when the prompt itself does not fit. The common
-- path locks the counter row with one SELECT (inserting it only in a user's first turn of a
-- period) and probes an index for expired reservations before the delete that returns them.
create or replace function public.vtai_reserve(
  p_user uuid,
  p_prompt_tokens integer,
  p_max_completion integer,
  p_period text default 'month',
  p_ttl_seconds integer default 900,
  p_now timestamptz default now()
)
returns table (
  granted boolean,
  reason text,
  reservation_id uuid,
  max_tokens integer,
  tier text,
  token_limit bigint,
  used bigint,
  reserved bigint,
  period_start timestamptz,
  resets_at timestamptz
)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_tier text;
  v_limit bigint;
  v_start timestamptz := vtai_period_start(p_period, p_now);
  v_end timestamptz := vtai_period_end(p_period, v_start);
  v_counter usage_counters%rowtype;
  v_left bigint;
  v_completion bigint;
  v_id uuid;
begin
  if v_start is null then
    raise exception 'unknown usage period %', p_period using errcode = '22023';
  end if;
  if p_prompt_tokens < 0 or p_max_completion < 1 then
    raise exception 'bad token counts' using errcode = '22023';
  end if;

  select p.tier, t.token_limit into v_tier, v_limit
  from profiles p join tiers t on t.name = p.tier
  where p.id = p_user;
  if not found then
    return query select false, 'unknown_user', null::uuid, 0, null::text, null::bigint,
      0::bigint, 0::bigint, v_start, v_end;
    return;
  end if;

  -- Every reserve and settle for this user and period queues here.
  select * into v_counter from usage_counters c
  where c.end_user = p_user and c.period_start = v_start
  for update;
  if not found then
    insert into usage_counters as c (end_user, period_start)
    values (p_user, v_start)
    on conflict (end_user, period_start) do nothing;
    select * into v_counter from usage_counters c
    where c.end_user = p_user and c.period_start = v_start
    for update;
  end if;

  -- Reservations of crashed or vanished turns give their quota back after the TTL.
  -- SKIP LOCKED: a reservation being settled right now is the settler's business.
  -- The probe first: nearly always nothing has expired, and it reads one index.
  if exists (
    select 1 from reservations r where r.end_user = p_user and r.expires_at <= p_now
  ) then
    with expired as (
      delete from reservations r
      where r.id in (
        select r2.id from reservations r2
        where r2.end_user = p_user and r2.expires_at <= p_now
        for update skip locked
      )
      returning r.period_start, r.amount
    ), per_period as (
      select e.period_start, sum(e.amount) as amount from expired e group by e.period_start
    )
    update usage_counters c
    set reserved = greatest(c.reserved - pp.amount, 0), updated_at = p_now
    from per_period pp
    where c.end_user = p_user and c.period_start = pp.period_start;

    select * into v_counter from usage_counters c
    where c.end_user = p_user and c.period_start = v_start;
  end if;

  if v_limit is null then
    v_completion := p_max_completion;
  else
    v_left := v_limit - v_counter.used - v_counter.reserved;
    if v_left <= 0 then
      return query select false, 'quota_exhausted', null::uuid, 0, v_tier, v_limit,
        v_counter.used, v_counter.reserved, v_start, v_end;
      return;
    end if;
    -- The prompt must fit with room for at least one token of answer.
    if v_left <= p_prompt_tokens then
      return query select false, 'prompt_exceeds_quota', null::uuid, 0, v_tier, v_limit,
        v_counter.used, v_counter.reserved, v_start, v_end;
      return;
    end if;
    v_completion := least(p_max_completion::bigint, v_left - p_prompt_tokens);
  end if;

  insert into reservations (end_user, period_start, amount, created_at, expires_at)
  values (p_user, v_start, p_prompt_tokens + v_completion, p_now,
          p_now + make_interval(secs => p_ttl_seconds))
  returning id into v_id;

  update usage_counters c
  set reserved = c.reserved + p_prompt_tokens + v_completion, updated_at = p_now
  where c.end_user = p_user and c.period_start = v_start
  returning c.used, c.reserved into v_counter.used, v_counter.reserved;

  return query select true, 'granted', v_id, v_completion::integer, v_tier, v_limit,
    v_counter.used, v_counter.reserved, v_start, v_end;
end
$$;

-- The ledger write, for many rows in one transaction and one WAL flush. Idempotent on
-- litellm_call_id: a row already there changes nothing and its element is false, so retried
-- callbacks and spool replays never charge twice.
create or replace function public.vtai_record_batch(p_rows jsonb, p_period text default 'month')
returns boolean[]
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_result boolean[];
begin
  if jsonb_typeof(p_rows) is distinct from 'array' then
    raise exception 'vtai_record_batch expects a JSON array of rows' using errcode = '22023';
  end if;

  with elements as (
    select e.r, e.ord, e.r ->> 'litellm_call_id' as call_id
    from jsonb_array_elements(p_rows) with ordinality as e (r, ord)
  ), input as (
    -- A call id twice in one batch counts once, like a replay: the first occurrence wins.
    select distinct on (el.call_id) el.r, el.ord, el.call_id,
           coalesce((el.r ->> 'created_at')::timestamptz, now()) as created,
           (el.r ->> 'end_user')::uuid as end_user,
           (el.r ->> 'reservation_id')::uuid as reservation_id,
           greatest(coalesce((el.r ->> 'prompt_tokens')::integer, 0), 0) as prompt,
           greatest(coalesce((el.r ->> 'completion_tokens')::integer, 0), 0) as completion
    from elements el
    order by el.call_id, el.ord
  ), located as (
    select i.*,
           -- charged to the period the tokens were reserved in, so a turn that crosses a
           -- period boundary settles where it was granted
           coalesce(res.period_start, (i.r ->> 'period_start')::timestamptz,
                    vtai_period_start(p_period, i.created)) as start,
           greatest(coalesce((i.r ->> 'total_tokens')::integer, i.prompt + i.completion), 0)
             as total
    from input i left join reservations res on res.id = i.reservation_id
  ), inserted as (
    insert into request_logs (
      litellm_call_id, created_at, end_user, session_id, model, provider, status,
      prompt_tokens, completion_tokens, total_tokens, total_cost, response_time, period_start,
      messages, response, error, additional_details
    )
    select l.call_id, l.created, l.end_user, l.r ->> 'session_id',
           coalesce(l.r ->> 'model', ''), l.r ->> 'provider', l.r ->> 'status',
           l.prompt, l.completion, l.total, coalesce((l.r ->> 'total_cost')::numeric, 0),
           (l.r ->> 'response_time')::real, l.start,
           l.r -> 'messages', l.r -> 'response', l.r -> 'error',
           coalesce(l.r -> 'additional_details', '{}'::jsonb)
    from located l
    order by l.call_id
    on conflict (litellm_call_id) do nothing
    returning litellm_call_id, end_user, period_start, total_tokens
  ), settled as (
    select ins.end_user, ins.period_start, ins.total_tokens, l.reservation_id
    from inserted ins join located l on l.call_id = ins.litellm_call_id
    where ins.end_user is not null
  ), released as (
    delete from reservations res using settled s
    where res.id = s.reservation_id
    returning s.end_user, res.period_start as held_start, res.amount
  ), moves as (
    select s.end_user, s.period_start, s.total_tokens::bigint as used, 0::bigint as freed
    from settled s
    union all
    select r.end_user, r.held_start, 0, r.amount from released r
  ), per_counter as (
    select m.end_user, m.period_start, sum(m.used)::bigint as used, sum(m.freed)::bigint as freed
    from moves m group by m.end_user, m.period_start
  ), counted as (
    insert into usage_counters as c (end_user, period_start, used)
    select p.end_user, p.period_start, p.used from per_counter p
    order by p.end_user, p.period_start
    on conflict (end_user, period_start) do update
    set used = c.used + excluded.used,
        reserved = greatest(c.reserved - (
          select p.freed from per_counter p
          where p.end_user = c.end_user and p.period_start = c.period_start), 0),
        updated_at = now()
    returning 1
  )
  select coalesce(
           array_agg(ins.litellm_call_id is not null and i.ord = el.ord order by el.ord),
           '{}')
  into v_result
  from elements el
  left join input i on i.call_id = el.call_id
  left join inserted ins on ins.litellm_call_id = el.call_id;
  return v_result;
end
$$;

create or replace function public.vtai_record(p_row jsonb, p_period text default 'month')
returns boolean
language sql
security definer
set search_path = public, pg_temp
as $$
  select (public.vtai_record_batch(jsonb_build_array(p_row), p_period))[1]
$$;

-- Give back a reservation no turn will use: a chat's reservation for its next turn
-- (vtai/metering/ahead.py) when the chat closes or the message that came is bigger than it.
-- Idempotent: a reservation already settled, expired or released is simply not there.
-- Lock order is the ledger's (reservation, then counter), so it queues behind a settle and
-- never deadlocks with one; vtai_reserve() skips locked reservations.
create or replace function public.vtai_release(p_reservation uuid, p_user uuid)
returns boolean
language sql
security definer
set search_path = public, pg_temp
as $$
  with released as (
    delete from reservations r
    where r.id = p_reservation and r.end_user = p_user
    returning r.end_user, r.period_start, r.amount
  ), moved as (
    -- Data-modifying CTEs run to completion whether or not they are read.
    update usage_counters c
    set reserved = greatest(c.reserved - rel.amount, 0), updated_at = now()
    from released rel
    where c.end_user = rel.end_user and c.period_start = rel.period_start
  )
  select exists (select 1 from released)
$$;

-- Where a user stands: one counter row, never a scan of history.
create or replace function public.vtai_usage(
  p_user uuid,
  p_period text default 'month',
  p_now timestamptz default now()
)
returns table (
  username text,
  tier text,
  token_limit bigint,
  used bigint,
  reserved bigint,
  period_start timestamptz,
  resets_at timestamptz
)
language sql stable
security definer
set search_path = public, pg_temp
as $$
  select p.username, p.tier, t.token_limit,
         coalesce(c.used, 0), coalesce(c.reserved, 0),
         vtai_period_start(p_period, p_now),
         vtai_period_end(p_period, vtai_period_start(p_period, p_now))
  from profiles p
  join tiers t on t.name = p.tier
  left join usage_counters c
    on c.end_user = p.id and c.period_start = vtai_period_start(p_period, p_now)
  where p.id = p_user
$$;

-- Consistency check for operators and tests: every (user, period) whose counter differs from
-- the sum of its ledger rows. An empty result means counters equal the ledger.
create or replace function public.vtai_verify_counters()
returns table (end_user uuid, period_start timestamptz, counter_used bigint, ledger_used bigint)
language sql stable
security definer
set search_path = public, pg_temp
as $$
  select coalesce(l.end_user, c.end_user), coalesce(l.period_start, c.period_start),
         coalesce(c.used, 0), coalesce(l.used, 0)
  from (
    select r.end_user, r.period_start, sum(r.total_tokens)::bigint as used
    from request_logs r
    where r.end_user is not null
    group by r.end_user, r.period_start
  ) l
  full join usage_counters c
    on c.end_user = l.end_user and c.period_start = l.period_start
  where coalesce(c.used, 0) <> coalesce(l.used, 0)
$$;

alter table public.usage_counters enable row level security;
alter table public.reservations enable row level security;
alter table public.request_logs enable row level security;
revoke all on public.usage_counters, public.reservations, public.request_logs
  from public, anon, authenticated;
grant select on public.usage_counters, public.request_logs to authenticated;
grant all on public.usage_counters, public.reservations, public.request_logs to service_role;

drop policy if exists "request_logs: users read their own" on public.request_logs;
create policy "request_logs: users read their own" on public.request_logs
  for select to authenticated using ((select auth.uid()) = end_user);

drop policy if exists "usage_counters: users read their own" on public.usage_counters;
create policy "usage_counters: users read their own" on public.usage_counters
  for select to authenticated using ((select auth.uid()) = end_user);

-- Money functions run only for the server: never for anon, and not for signed-in users,
-- who could otherwise reserve or record on anyone's behalf.
revoke all on function public.vtai_reserve(uuid, integer, integer, text, integer, timestamptz),
  public.vtai_record_batch(jsonb, text),
  public.vtai_record(jsonb, text),
  public.vtai_release(uuid, uuid),
  public.vtai_usage(uuid, text, timestamptz),
  public.vtai_verify_counters()
  from public, anon, authenticated;
grant execute on function public.vtai_reserve(uuid, integer, integer, text, integer, timestamptz),
  public.vtai_record_batch(jsonb, text),
  public.vtai_record(jsonb, text),
  public.vtai_release(uuid, uuid),
  public.vtai_usage(uuid, text, timestamptz),
  public.vtai_verify_counters()
  to service_role;


-- 3. Usage buckets for dashboards: hour and day per user and model ---------------------------
--
-- Kept by triggers on request_logs, so every way a row arrives (vtai_record_batch, spool
-- replay, the legacy migration scripts) updates the buckets in the same transaction as the
-- row. INSERT is a statement trigger over the inserted rows, so a batch of 100 turns does one
-- upsert per bucket; UPDATE and DELETE (rare: admin fixes, legacy scripts) keep a row trigger.
-- Both upsert hour buckets before day buckets, in key order, so concurrent writers queue on
-- the same locks in the same order and cannot deadlock. Dashboards read these buckets, never
-- a scan of request_logs.

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

create or replace function public.vtai_request_logs_aggregate_inserted()
returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
  -- Hour buckets before day buckets, each in key order: the row trigger for UPDATE and
  -- DELETE also takes an hour before a day, so the two never wait on each other in a cycle.
  insert into usage_aggregates as a (
    granularity, bucket_start, end_user, model, requests, failures, refusals,
    prompt_tokens, completion_tokens, total_tokens, cost
  )
  select g.granularity,
         date_trunc(g.granularity, n.created_at at time zone 'UTC') at time zone 'UTC',
         coalesce(n.end_user, '00000000-0000-0000-0000-000000000000'::uuid),
         coalesce(n.model, ''),
         count(*), count(*) filter (where n.status = 'failure'),
         count(*) filter (where n.status = 'refused'),
         sum(n.prompt_tokens), sum(n.completion_tokens), sum(n.total_tokens),
         sum(n.total_cost)
  from new_rows n
  cross join (values ('hour', 0), ('day', 1)) as g (granularity, rank)
  group by g.rank, g.granularity, 2, 3, 4
  order by g.rank, 2, 3, 4
  on conflict (granularity, bucket_start, end_user, model) do update set
    requests = a.requests + excluded.requests,
    failures = a.failures + excluded.failures,
    refusals = a.refusals + excluded.refusals,
    prompt_tokens = a.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = a.completion_tokens + excluded.completion_tokens,
    total_tokens = a.total_tokens + excluded.total_tokens,
    cost = a.cost + excluded.cost;
  return null;
end
$$;

drop trigger if exists request_logs_aggregate on public.request_logs;
create trigger request_logs_aggregate
  after update of created_at, end_user, model, status, prompt_tokens,
    completion_tokens, total_tokens, total_cost or delete
  on public.request_logs
  for each row execute function public.vtai_request_logs_aggregate();

drop trigger if exists request_logs_aggregate_insert on public.request_logs;
create trigger request_logs_aggregate_insert
  after insert on public.request_logs
  referencing new table as new_rows
  for each statement execute function public.vtai_request_logs_aggregate_inserted();

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
  ),
  public.vtai_request_logs_aggregate(),
  public.vtai_request_logs_aggregate_inserted(),
  public.vtai_backfill_aggregates(timestamptz, timestamptz),
  public.vtai_verify_aggregates()
  from public, anon, authenticated;
grant execute on function public.vtai_backfill_aggregates(timestamptz, timestamptz),
  public.vtai_verify_aggregates() to service_role;


-- 4. Provider balances for the admin dashboard -----------------------------------------------
--
-- One row per configured provider, written only by the server (vtai/admin/balances.py). A failed
-- sync keeps the last good balance and fetched_at and records error / error_at beside them,
-- so the dashboard can show "$12.30 as of yesterday; last sync failed: timeout". No
-- user-level role may read balances (RLS on, no policy).

create table if not exists public.provider_balances (
  provider text primary key,
  -- null when the provider has no balance API (note says why) or was never fetched
  balance numeric(20, 8),
  currency text,
  fetched_at timestamptz,
  note text,
  error text,
  error_at timestamptz
);

alter table public.provider_balances enable row level security;
revoke all on public.provider_balances from public, anon, authenticated;
grant all on public.provider_balances to service_role;


-- 5. Logins the server can end, and a login throttle that holds under parallel guesses -------
--
-- Every login is a row in vtai_private.login_sessions; its id travels in Chainlit's signed
-- cookie, and every request and socket event asks vtai_session_live() (two primary-key
-- lookups). Logout, a password change, `vtai user logout` and `vtai user disable` set
-- revoked_at, so the old cookie is refused on its next request.
--
-- vtai_login_attempt() counts each login attempt per name and per client address before the
-- password is checked, in one locked statement per key, so parallel guesses queue: an
-- attempt waits for its slot, and one whose slot is more than 10 s away is refused without a
-- check. Entries expire 15 minutes after their last slot; an expired entry starts again on
-- the next attempt for its key, and every call deletes a few other expired ones.
--
-- Both tables live in vtai_private (PostgREST never exposes it) with RLS on and no policy;
-- the functions run only for the server (service_role over REST, the owner directly).

create table if not exists vtai_private.login_sessions (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references public.profiles (id) on delete cascade,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  revoked_at timestamptz
);
create index if not exists login_sessions_user_live
  on vtai_private.login_sessions (user_id) where revoked_at is null;
create index if not exists login_sessions_expires on vtai_private.login_sessions (expires_at);

create table if not exists vtai_private.login_throttle (
  -- 'name:' || sha256 of the lower-cased name (typed names are not kept), or 'addr:' || the
  -- client address (IPv6: its /64).
  key text primary key,
  -- Attempts in the window whose password was checked and did not succeed (or still runs).
  attempts integer not null default 0,
  -- Attempts refused unchecked because the queue was full.
  refused integer not null default 0,
  -- When the next attempt for this key may be checked.
  next_at timestamptz not null,
  expires_at timestamptz not null
);
create index if not exists login_throttle_expires on vtai_private.login_throttle (expires_at);

alter table vtai_private.login_sessions enable row level security;
alter table vtai_private.login_throttle enable row level security;
revoke all on vtai_private.login_sessions, vtai_private.login_throttle
  from public, anon, authenticated;

-- A new login for p_user lasting p_ttl seconds; null if the profile is missing or disabled.
create or replace function public.vtai_session_start(p_user uuid, p_ttl integer)
returns uuid
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_id uuid;
begin
  -- Bounded sweep: sessions ended or expired more than a day ago.
  delete from vtai_private.login_sessions s
  where s.id in (
    select o.id from vtai_private.login_sessions o
    where o.expires_at < now() - interval '1 day'
       or o.revoked_at < now() - interval '1 day'
    limit 100
    for update skip locked
  );
  insert into vtai_private.login_sessions (user_id, expires_at)
  select p.id, now() + make_interval(secs => greatest(p_ttl, 1))
  from profiles p
  where p.id = p_user and p.disabled_at is null
  returning id into v_id;
  return v_id;
end
$$;

-- Whether a login still holds: not ended, not expired, its user there and not disabled.
create or replace function public.vtai_session_live(p_session uuid, p_user uuid)
returns boolean
language sql
stable
security definer
set search_path = public, pg_temp
as $$
  select exists (
    select 1
    from vtai_private.login_sessions s
    join profiles p on p.id = s.user_id
    where s.id = p_session
      and s.user_id = p_user
      and s.revoked_at is null
      and s.expires_at > now()
      and p.disabled_at is null
  )
$$;

-- Ends one login (logout); true if it was still live.
create or replace function public.vtai_session_end(p_session uuid)
returns boolean
language sql
security definer
set search_path = public, pg_temp
as $$
  with ended as (
    update vtai_private.login_sessions
    set revoked_at = now()
    where id = p_session and revoked_at is null
    returning 1
  )
  select exists (select 1 from ended)
$$;

-- Ends every login of a user (password change, `vtai user logout`, disable); how many.
create or replace function public.vtai_sessions_end_all(p_user uuid)
returns integer
language sql
security definer
set search_path = public, pg_temp
as $$
  with ended as (
    update vtai_private.login_sessions
    set revoked_at = now()
    where user_id = p_user and revoked_at is null
    returning 1
  )
  select count(*)::integer from ended
$$;

-- The throttle's keys for a name and an optional client address, in lock order.
create or replace function public.vtai_login_keys(p_name text, p_addr text)
returns text[]
language sql
immutable
set search_path = pg_catalog, pg_temp
as $$
  select array(
    select k from unnest(array[
      'name:' || encode(sha256(convert_to(lower(btrim(coalesce(p_name, ''))), 'UTF8')), 'hex'),
      case
        when p_addr is null or p_addr = '' then null
        when family(p_addr::inet) = 6 then 'addr:' || network(set_masklen(p_addr::inet, 64))::text
        else 'addr:' || host(p_addr::inet)
      end
    ]) k
    where k is not null
    order by k
  )
$$;

-- Call before checking a password. Returns the seconds to wait before checking it, or -1:
-- refused, check nothing (answer as for a wrong password). The attempt counts against the
-- name and the address until vtai_login_succeeded() says it was right.
--
-- Rules: a name gets 3 free attempts, an address 10 (a NAT hides many people); after that
-- each attempt pushes the key's next slot 0.5 s further, doubling up to 8 s. An attempt's
-- slot is the latest of its keys' next slots; more than 10 s away is refused. A key expires
-- 15 minutes after its last slot.
create or replace function public.vtai_login_attempt(p_name text, p_addr text default null)
returns double precision
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_window constant interval := interval '15 minutes';
  v_max_wait constant double precision := 10;
  v_now timestamptz := clock_timestamp();
  v_slot timestamptz;
  v_keys text[] := vtai_login_keys(p_name, p_addr);
  v_key text;
  v_next timestamptz;
begin
  v_slot := v_now;
  -- One key at a time, in a fixed order, so two attempts never wait on each other in a cycle.
  -- An expired entry starts again here, as if deleted and made anew.
  foreach v_key in array v_keys loop
    insert into vtai_private.login_throttle as t (key, next_at, expires_at)
    values (v_key, v_now, v_now + v_window)
    on conflict (key) do update
      set attempts = 0, refused = 0, next_at = v_now, expires_at = v_now + v_window
      where t.expires_at <= v_now
    returning t.next_at into v_next;
    if v_next is null then
      -- Live entry, not updated: lock it and read its next slot.
      select t.next_at into v_next
      from vtai_private.login_throttle t where t.key = v_key for update;
    end if;
    v_slot := greatest(v_slot, v_next);
  end loop;

  if extract(epoch from v_slot - v_now) > v_max_wait then
    update vtai_private.login_throttle set refused = refused + 1 where key = any(v_keys);
    return -1;
  end if;

  update vtai_private.login_throttle t
  set attempts = t.attempts + 1,
      next_at = v_slot + sp.spacing,
      expires_at = v_slot + sp.spacing + v_window
  from (
    select a.key,
      case when a.attempts + 1 < f.free then interval '0'
           else make_interval(secs => 0.5 * 2 ^ least(a.attempts + 1 - f.free, 4))
      end as spacing
    from vtai_private.login_throttle a
    cross join lateral (
      select case when a.key like 'name:%' then 3 else 10 end as free
    ) f
    where a.key = any(v_keys)
  ) sp
  where t.key = sp.key;

  -- Bounded sweep of other keys' expired entries; skips any another attempt holds.
  delete from vtai_private.login_throttle d
  where d.key in (
    select o.key from vtai_private.login_throttle o
    where o.expires_at <= v_now and o.key <> all(v_keys)
    order by o.expires_at
    limit 20
    for update skip locked
  );

  return greatest(extract(epoch from v_slot - v_now), 0)::double precision;
end
$$;

-- Call after the password was right: the name starts again, and the address gets back the
-- attempt vtai_login_attempt() counted (so it counts only failures).
create or replace function public.vtai_login_succeeded(p_name text, p_addr text default null)
returns void
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_keys text[] := vtai_login_keys(p_name, p_addr);
begin
  delete from vtai_private.login_throttle where key = any(v_keys) and key like 'name:%';
  update vtai_private.login_throttle
  set attempts = greatest(attempts - 1, 0)
  where key = any(v_keys) and key like 'addr:%';
end
$$;

revoke all on function public.vtai_session_start(uuid, integer),
  public.vtai_session_live(uuid, uuid),
  public.vtai_session_end(uuid),
  public.vtai_sessions_end_all(uuid),
  public.vtai_login_keys(text, text),
  public.vtai_login_attempt(text, text),
  public.vtai_login_succeeded(text, text)
  from public, anon, authenticated;
grant execute on function public.vtai_session_start(uuid, integer),
  public.vtai_session_live(uuid, uuid),
  public.vtai_session_end(uuid),
  public.vtai_sessions_end_all(uuid),
  public.vtai_login_attempt(text, text),
  public.vtai_login_succeeded(text, text)
  to service_role;
