-- Quota notices and the operator webhooks' outbox (docs/operations.md, "Quota notices" and
-- "Webhooks"; vtai/notify/).
-- version: 2
--
-- A function file (supabase/migrations/functions/20_metering.sql says what that means); the
-- tables are in 20261207000000_notify.sql.
--
-- Rules:
-- * Webhooks are on while webhook_endpoints has an active URL (the app sets them from
--   VTAI_WEBHOOK_URLS at start-up). Off, vtai_outbox_add() writes nothing and answers null.
-- * An event is written in the transaction of the fact it reports, with one delivery row per
--   active URL. vtai_outbox_add(type, payload, dedupe): a second event with the same dedupe
--   key is a no-op that answers the first one's id.
-- * Thresholds: a cap is crossed at T percent when used * 100 >= T * limit. The period's token
--   cap counts top-up grants: its limit is what the user had in all, used + what is left
--   (max(token_limit - used, 0) + grant tokens left), as vtai_usage() shows it. The daily cap
--   counts the UTC day; the dollar cap the period. Each (user, cap, threshold, period) is told
--   once (quota_notices), and its `quota.threshold` event is written with it.
-- * A refusal at a cap is reported once per (user, cap, period) (quota_refusals).
-- * A tier change (profiles.tier) writes `tier.changed` at commit (a deferred trigger), so the
--   audit_log row that the same transaction wrote after the update names who changed it.
-- * Delivery: a sender claims due rows with FOR UPDATE SKIP LOCKED and moves each one's
--   next_attempt_at a lease ahead in the claiming transaction, then sends after it commits. A
--   sender that dies leaves the row due again when the lease ends: at least once, and never two
--   senders at the same moment (a sender's HTTP timeout is shorter than its lease). A failure
--   waits base x 2^(attempt - 1) seconds, at most an hour; an event older than three days is
--   given up on (failed_at) until `vtai webhooks retry`.
-- * Provider balance under VTAI_WEBHOOK_BALANCE_BELOW: one `balance.low` per provider per UTC
--   day while it stays under.

create or replace function public.vtai_outbox_add(
  p_type text, p_payload jsonb, p_dedupe text default null
)
returns uuid
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_id uuid;
begin
  if not exists (select 1 from webhook_endpoints e where e.active) then
    return null;
  end if;
  insert into webhook_events as ev (type, payload, dedupe)
  values (p_type, coalesce(p_payload, '{}'::jsonb), p_dedupe)
  on conflict (dedupe) do nothing
  returning ev.id into v_id;
  if v_id is null then
    select ev.id into v_id from webhook_events ev where ev.dedupe = p_dedupe;
    return v_id;
  end if;
  insert into webhook_deliveries (event_id, url)
  select v_id, e.url from webhook_endpoints e where e.active;
  return v_id;
end
$$;

-- The URLs of VTAI_WEBHOOK_URLS, as the app starts: those active, every other one not (its
-- undelivered rows wait, unsent, until it is configured again). Answers how many are active.
create or replace function public.vtai_webhook_endpoints_set(p_urls text[])
returns integer
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
  insert into webhook_endpoints as e (url, active)
  select distinct u, true from unnest(coalesce(p_urls, '{}')) u
  on conflict (url) do update set active = true, updated_at = now() where not e.active;
  update webhook_endpoints e set active = false, updated_at = now()
  where e.active and not (e.url = any (coalesce(p_urls, '{}')));
  return (select count(*) from webhook_endpoints e where e.active);
end
$$;

-- The thresholds a user's counters have crossed and nobody has told them about yet: each
-- recorded once, with its `quota.threshold` event, and answered. Called after a turn's row is
-- settled, never on the gate's path. p_thresholds: percents (VTAI_WARN_AT).
create or replace function public.vtai_notices(
  p_user uuid,
  p_period text default 'month',
  p_now timestamptz default now(),
  p_thresholds integer[] default '{80,100}'
)
returns table (
  cap text,
  threshold integer,
  used numeric,
  cap_limit numeric,
  period_start timestamptz,
  resets_at timestamptz
)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_name text;
  v_tier text;
  v_token_limit bigint;
  v_daily_limit bigint;
  v_usd_limit numeric;
  v_start timestamptz;
  v_end timestamptz;
  v_day timestamptz := vtai_period_start('day', p_now);
  v_used bigint;
  v_cost numeric;
  v_dused bigint;
  v_topup bigint;
  r record;
begin
  select p.username, p.tier, t.token_limit, t.daily_limit, t.usd_limit
  into v_name, v_tier, v_token_limit, v_daily_limit, v_usd_limit
  from profiles p join tiers t on t.name = p.tier where p.id = p_user;
  if not found then
    return;
  end if;
  select up.period_start, up.period_end into v_start, v_end
  from vtai_user_period(p_user, p_period, p_now) up;
  select c.used, c.cost_used into v_used, v_cost
  from usage_counters c where c.end_user = p_user and c.period_start = v_start;
  select d.used into v_dused
  from daily_counters d where d.end_user = p_user and d.day_start = v_day;
  select coalesce(sum(g.tokens - g.used), 0) into v_topup
  from token_grants g where g.end_user = p_user and g.used < g.tokens and g.expires_at > p_now;
  v_used := coalesce(v_used, 0);
  v_cost := coalesce(v_cost, 0);
  v_dused := coalesce(v_dused, 0);

  for r in
    insert into quota_notices as n (end_user, cap, threshold, period_start, used, cap_limit)
    select p_user, c.cap, th, c.start, c.used, c.cap_limit
    from (
      select 'tokens' as cap, v_used::numeric as used,
             (v_used + greatest(v_token_limit - v_used, 0) + v_topup)::numeric as cap_limit,
             v_start as start
      where v_token_limit > 0
      union all
      select 'daily', v_dused, v_daily_limit, v_day where v_daily_limit > 0
      union all
      select 'usd', v_cost, v_usd_limit, v_start where v_usd_limit > 0
    ) c
    cross join (select distinct t as th from unnest(p_thresholds) t where t > 0) ths
    where c.used * 100 >= ths.th * c.cap_limit
    order by c.cap, ths.th
    on conflict do nothing
    returning n.cap, n.threshold, n.used, n.cap_limit, n.period_start
  loop
    cap := r.cap;
    threshold := r.threshold;
    used := r.used;
    cap_limit := r.cap_limit;
    period_start := r.period_start;
    resets_at := case when r.cap = 'daily' then v_day + interval '1 day' else v_end end;
    perform vtai_outbox_add(
      'quota.threshold',
      jsonb_build_object(
        'user_id', p_user, 'username', v_name, 'tier', v_tier, 'cap', r.cap,
        'threshold', r.threshold, 'used', r.used, 'limit', r.cap_limit,
        'period_start', r.period_start, 'resets_at', resets_at),
      'quota.threshold:' || p_user || ':' || r.cap || ':' || r.threshold || ':'
        || extract(epoch from r.period_start)::bigint);
    return next;
  end loop;
end
$$;

-- A turn refused at a cap (vtai_reserve's reason): true the first time for this user, cap and
-- period, when the `quota.refused` event is written; false after, and for other reasons.
create or replace function public.vtai_quota_refused(
  p_user uuid,
  p_period text default 'month',
  p_now timestamptz default now(),
  p_reason text default 'quota_exhausted'
)
returns boolean
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_cap text;
  v_start timestamptz;
  v_end timestamptz;
  v_name text;
  v_tier text;
begin
  v_cap := case
    when p_reason in ('quota_exhausted', 'prompt_exceeds_quota') then 'tokens'
    when p_reason in ('daily_exhausted', 'prompt_exceeds_daily') then 'daily'
    when p_reason in ('usd_exhausted', 'prompt_exceeds_usd') then 'usd'
  end;
  select p.username, p.tier into v_name, v_tier from profiles p where p.id = p_user;
  if v_cap is null or not found then
    return false;
  end if;
  if v_cap = 'daily' then
    v_start := vtai_period_start('day', p_now);
    v_end := v_start + interval '1 day';
  else
    select up.period_start, up.period_end into v_start, v_end
    from vtai_user_period(p_user, p_period, p_now) up;
  end if;
  insert into quota_refusals (end_user, cap, period_start, reason)
  values (p_user, v_cap, v_start, p_reason)
  on conflict do nothing;
  if not found then
    return false;
  end if;
  perform vtai_outbox_add(
    'quota.refused',
    jsonb_build_object(
      'user_id', p_user, 'username', v_name, 'tier', v_tier, 'cap', v_cap,
      'reason', p_reason, 'period_start', v_start, 'resets_at', v_end),
    'quota.refused:' || p_user || ':' || v_cap || ':' || extract(epoch from v_start)::bigint);
  return true;
end
$$;

-- `tier.changed`, at commit: by then the transaction's audit_log row (written after the
-- update by the CLI, /admin and Stripe's events) names the actor; a change made without one
-- (plain SQL) names the session's database user.
create or replace function public.vtai_tier_changed()
returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_actor text;
  v_audit bigint;
begin
  if new.tier is not distinct from old.tier then
    return null;
  end if;
  select a.actor, a.id into v_actor, v_audit
  from audit_log a
  where a.at = now() and a.action = 'user.tier' and a.target = new.username
    and a.after ->> 'tier' = new.tier
  order by a.id desc
  limit 1;
  perform vtai_outbox_add(
    'tier.changed',
    jsonb_build_object(
      'user_id', new.id, 'username', new.username, 'from', old.tier, 'to', new.tier,
      'actor', coalesce(v_actor, 'sql:' || session_user), 'audit_id', v_audit));
  return null;
end
$$;

drop trigger if exists profiles_tier_changed on public.profiles;
create constraint trigger profiles_tier_changed
  after update of tier on public.profiles
  deferrable initially deferred
  for each row execute function public.vtai_tier_changed();

-- A provider's balance as the sync read it: `balance.low` once per provider per UTC day while
-- it is under p_below (VTAI_WEBHOOK_BALANCE_BELOW). Answers the event's id, or null.
create or replace function public.vtai_balance_low(
  p_provider text, p_balance numeric, p_currency text, p_below numeric,
  p_now timestamptz default now()
)
returns uuid
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
  if p_balance is null or p_below is null or p_balance >= p_below then
    return null;
  end if;
  return vtai_outbox_add(
    'balance.low',
    jsonb_build_object('provider', p_provider, 'balance', p_balance, 'currency', p_currency,
                       'below', p_below),
    'balance.low:' || p_provider || ':' || to_char(p_now at time zone 'UTC', 'YYYY-MM-DD'));
end
$$;

-- Up to p_limit due deliveries, each leased for p_lease_seconds in this (the claiming)
-- transaction: the sender sends after it commits, and a crashed sender's rows come due again.
create or replace function public.vtai_outbox_claim(
  p_limit integer default 20, p_lease_seconds numeric default 60
)
returns table (
  event_id uuid, url text, type text, payload jsonb, created_at timestamptz, attempt integer
)
language sql
security definer
set search_path = public, pg_temp
as $$
  with due as (
    select d.event_id, d.url from webhook_deliveries d
    where d.delivered_at is null and d.failed_at is null and d.next_attempt_at <= now()
      and exists (select 1 from webhook_endpoints e where e.url = d.url and e.active)
    order by d.next_attempt_at
    limit p_limit
    for update of d skip locked
  ), claimed as (
    update webhook_deliveries d
    set attempts = d.attempts + 1,
        next_attempt_at = now() + make_interval(secs => p_lease_seconds::double precision),
        updated_at = now()
    from due
    where d.event_id = due.event_id and d.url = due.url
    returning d.event_id, d.url, d.attempts
  )
  select c.event_id, c.url, ev.type, ev.payload, ev.created_at, c.attempts
  from claimed c join webhook_events ev on ev.id = c.event_id
  order by ev.created_at
$$;

-- A send's result: delivered on a 2xx, else due again after the backoff (or given up on once
-- the event is three days old). Only the sender of attempt p_attempt sets a failure: a late
-- answer from a sender whose lease ran out does not move the row another sender holds.
create or replace function public.vtai_outbox_done(
  p_event uuid,
  p_url text,
  p_attempt integer,
  p_status integer,
  p_error text,
  p_base_seconds numeric default 5
)
returns text
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
  if p_error is null and p_status between 200 and 299 then
    update webhook_deliveries d
    set delivered_at = now(), last_status = p_status, last_error = null, updated_at = now()
    where d.event_id = p_event and d.url = p_url and d.delivered_at is null;
    return 'delivered';
  end if;
  update webhook_deliveries d
  set last_status = p_status,
      last_error = left(coalesce(p_error, 'HTTP ' || p_status), 500),
      next_attempt_at = now() + make_interval(secs => least(
        3600, p_base_seconds * power(2::numeric, least(greatest(p_attempt, 1) - 1, 20)))::double precision),
      failed_at = case when ev.created_at < now() - interval '3 days' then now() end,
      updated_at = now()
  from webhook_events ev
  where ev.id = d.event_id and d.event_id = p_event and d.url = p_url
    and d.attempts = p_attempt and d.delivered_at is null;
  if not found then
    return 'stale';
  end if;
  return (select case when d.failed_at is null then 'retry' else 'failed' end
          from webhook_deliveries d where d.event_id = p_event and d.url = p_url);
end
$$;

-- `vtai webhooks retry`: every undelivered row, given up on or waiting, due now.
create or replace function public.vtai_outbox_retry()
returns integer
language sql
security definer
set search_path = public, pg_temp
as $$
  with moved as (
    update webhook_deliveries d set next_attempt_at = now(), failed_at = null, updated_at = now()
    -- One a sender holds now may go twice (at least once; receivers dedupe by event id).
    where d.delivered_at is null
    returning 1
  )
  select count(*)::integer from moved
$$;

-- Per URL: delivered, pending (due or waiting, no failure yet), failing (waiting after a
-- failure), failed (given up), the oldest undelivered event and the newest error.
create or replace function public.vtai_outbox_status()
returns table (
  url text, active boolean, delivered bigint, pending bigint, failing bigint, failed bigint,
  oldest_undelivered timestamptz, last_error text, last_error_at timestamptz
)
language sql stable
security definer
set search_path = public, pg_temp
as $$
  select u.url, coalesce(e.active, false),
         count(*) filter (where d.delivered_at is not null),
         count(*) filter (where d.delivered_at is null and d.failed_at is null
                            and d.last_error is null),
         count(*) filter (where d.delivered_at is null and d.failed_at is null
                            and d.last_error is not null),
         count(*) filter (where d.delivered_at is null and d.failed_at is not null),
         min(ev.created_at) filter (where d.delivered_at is null),
         (array_agg(d.last_error order by d.updated_at desc)
            filter (where d.delivered_at is null and d.last_error is not null))[1],
         max(d.updated_at) filter (where d.delivered_at is null and d.last_error is not null)
  from (select url from webhook_endpoints union select url from webhook_deliveries) u
  left join webhook_endpoints e on e.url = u.url
  left join webhook_deliveries d on d.url = u.url
  left join webhook_events ev on ev.id = d.event_id
  group by u.url, e.active
  order by u.url
$$;

-- The newest undelivered deliveries that have failed at least once, for /admin and the CLI.
create or replace function public.vtai_outbox_failures(p_limit integer default 50)
returns table (
  event_id uuid, type text, url text, attempts integer, last_status integer, last_error text,
  next_attempt_at timestamptz, failed_at timestamptz, created_at timestamptz
)
language sql stable
security definer
set search_path = public, pg_temp
as $$
  select d.event_id, ev.type, d.url, d.attempts, d.last_status, d.last_error,
         d.next_attempt_at, d.failed_at, ev.created_at
  from webhook_deliveries d join webhook_events ev on ev.id = d.event_id
  where d.delivered_at is null and d.last_error is not null
  order by d.updated_at desc
  limit p_limit
$$;

revoke all on function
  public.vtai_outbox_add(text, jsonb, text),
  public.vtai_webhook_endpoints_set(text[]),
  public.vtai_notices(uuid, text, timestamptz, integer[]),
  public.vtai_quota_refused(uuid, text, timestamptz, text),
  public.vtai_tier_changed(),
  public.vtai_balance_low(text, numeric, text, numeric, timestamptz),
  public.vtai_outbox_claim(integer, numeric),
  public.vtai_outbox_done(uuid, text, integer, integer, text, numeric),
  public.vtai_outbox_retry(),
  public.vtai_outbox_status(),
  public.vtai_outbox_failures(integer)
  from public, anon, authenticated;
grant execute on function
  public.vtai_outbox_add(text, jsonb, text),
  public.vtai_webhook_endpoints_set(text[]),
  public.vtai_notices(uuid, text, timestamptz, integer[]),
  public.vtai_quota_refused(uuid, text, timestamptz, text),
  public.vtai_balance_low(text, numeric, text, numeric, timestamptz),
  public.vtai_outbox_claim(integer, numeric),
  public.vtai_outbox_done(uuid, text, integer, integer, text, numeric),
  public.vtai_outbox_retry(),
  public.vtai_outbox_status(),
  public.vtai_outbox_failures(integer)
  to service_role;
