-- The money functions: reserve, record (settle), release, usage, verify.
-- version: 3 (raise it with every change: a database refuses a build whose file is older)
--
-- A function file, not a migration: VT.ai re-applies it, in one transaction, whenever its text
-- differs from the text last applied to the database (vtai/db/migrations.py, docs/supabase.md
-- "Function files"), after every pending migration. So each function has one body in the tree
-- and a change to a rule is a change to this file. It must stay safe to run again: `create or
-- replace`, and a `drop function if exists` for a signature or result type that changed.
--
-- Rules (docs/metering.md, "Plans", explains them for operators):
-- * vtai_reserve() is the gate: one call, one transaction, serialised on the user's period
--   counter row, so concurrent turns from any number of processes can never overshoot any cap.
--   It reads counter rows, never the user's history.
-- * vtai_record_batch() is the only definition of how a ledger row is accounted; vtai_record()
--   is a one-row batch. A row is written exactly once per litellm_call_id and, in the same
--   transaction, its reservation is released and its counters moved. Replays are no-ops.
-- * Lock order is ledger row -> reservation -> period counter -> day counter everywhere, each
--   in key order, so concurrent batches queue instead of deadlocking; vtai_reserve() takes the
--   period counter first but only touches reservations with SKIP LOCKED, and takes the day
--   counter after the period counter, so the two cannot deadlock either.
-- * Top-up grants (token_grants) add to the period's token limit, never to the daily or
--   dollar caps. The tier's own tokens go first: a settle charges grants only with what it
--   counts past the tier's limit, earliest expiry first. So room = max(limit - used, 0) +
--   tokens left in live grants - reserved. Grants are read under the period counter's lock
--   and changed only under it (settle, refund), so they can't be spent twice.
-- * Counted tokens = ceil(raw tokens x the model's weight). Weight 0 (exempt): nothing counts
--   against the token, daily and dollar caps, but the request rate still applies.

-- Signatures this file replaced: gone, so a call with the old arguments fails loudly.
drop function if exists public.vtai_reserve(uuid, integer, integer, text, integer, timestamptz);
drop function if exists public.vtai_reserve(uuid, integer, integer, text, integer, timestamptz,
                                            text, numeric, numeric, boolean);
drop function if exists public.vtai_usage(uuid, text, timestamptz);
drop function if exists public.vtai_verify_counters();

-- A shell-style pattern as a LIKE pattern: * any characters (/ included), ? one character.
-- No `set search_path` (every name is qualified instead): with one, Postgres can't inline the
-- function and calls it once per rule, which was most of the plan checks' cost
-- (docs/performance.md, "The reserve with every rule on").
create or replace function public.vtai_glob_like(p_pattern text)
returns text
language sql immutable
as $$
  select pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
    pg_catalog.replace(p_pattern, '\', '\\'), '%', '\%'), '_', '\_'), '*', '%'), '?', '_')
$$;

-- The weight of a model: the exact name's rule (a primary-key lookup), else the longest
-- matching pattern's, else 1. Called only by the money functions (security definer, their own
-- search_path), so it needs neither: without them Postgres inlines it.
create or replace function public.vtai_model_weight(p_model text)
returns numeric
language sql stable
as $$
  select coalesce(
    (select w.weight from public.model_weights w where w.pattern = coalesce(p_model, '')),
    (select w.weight from public.model_weights w
     where w.pattern operator(pg_catalog.~) '[*?]'
       and coalesce(p_model, '') like public.vtai_glob_like(w.pattern)
     order by pg_catalog.length(w.pattern) desc, w.pattern
     limit 1),
    1)
$$;

-- Inlined into its caller like vtai_glob_like (no `set search_path`).
create or replace function public.vtai_model_allowed(p_patterns text[], p_model text)
returns boolean
language sql immutable
as $$
  select '*' = any (p_patterns) or exists (
    select 1 from pg_catalog.unnest(p_patterns) p
    where coalesce(p_model, '') like public.vtai_glob_like(p)
  )
$$;

-- The period a user's usage counts in at p_at: [period_start, period_end). For 'billing'
-- (VTAI_USAGE_PERIOD=billing) a subscriber's period follows their Stripe subscription's
-- current period, stepped on by its length (whole months, else its exact length) when p_at
-- falls outside the one the last webhook stored, so resets need no job and no event; everyone
-- else, and every other period, keeps the calendar one. One indexed read, in billing mode only.
create or replace function public.vtai_user_period(p_user uuid, p_period text, p_at timestamptz)
returns table (period_start timestamptz, period_end timestamptz)
language plpgsql stable
security definer
set search_path = public, pg_temp
as $$
declare
  v_start timestamptz;
  v_end timestamptz;
  v_months integer;
  v_steps integer;
begin
  if p_period = 'billing' then
    select s.current_period_start, s.current_period_end into v_start, v_end
    from billing_subscriptions s
    where s.user_id = p_user and s.tier is not null
      and s.status in ('active', 'trialing', 'past_due', 'unpaid')
      and s.current_period_start is not null and s.current_period_end > s.current_period_start
    order by s.current_period_end desc
    limit 1;
    if not found then
      v_start := vtai_period_start('month', p_at);
      return query select v_start, vtai_period_end('month', v_start);
      return;
    end if;
    -- Whole months when the stored period is some (Jan 31 -> Feb 28 is one: Stripe keeps
    -- the anchor's day, clamped to the month's end, as Postgres adds months).
    select m into v_months from unnest(array[1, 2, 3, 6, 12, 24]) m
    where ((v_start at time zone 'UTC') + make_interval(months => m)) at time zone 'UTC' = v_end
    limit 1;
    if v_months is not null then
      v_steps := floor(extract(epoch from p_at - v_start)
                       / extract(epoch from v_end - v_start))::integer;
      -- whole months from the anchor; the estimate may be one off across short months
      loop
        period_start := ((v_start at time zone 'UTC')
                         + make_interval(months => v_months * v_steps)) at time zone 'UTC';
        period_end := ((v_start at time zone 'UTC')
                       + make_interval(months => v_months * (v_steps + 1))) at time zone 'UTC';
        exit when p_at >= period_start and p_at < period_end;
        v_steps := v_steps + case when p_at < period_start then -1 else 1 end;
      end loop;
    else
      v_steps := floor(extract(epoch from p_at - v_start)
                       / extract(epoch from v_end - v_start))::integer;
      period_start := v_start + (v_end - v_start) * v_steps;
      period_end := period_start + (v_end - v_start);
    end if;
    return next;
    return;
  end if;
  v_start := vtai_period_start(p_period, p_at);
  return query select v_start, vtai_period_end(p_period, v_start);
end
$$;

-- The gate. Checks, in this order: the model is allowed; the request rate; then, unless the
-- model is exempt (weight 0), tokens left for the period, tokens left today and dollars left.
-- Grants the prompt plus a completion budget clamped to the tightest cap, so no answer can
-- cross any of them, and says which rule refused. Dollars are reserved at the prices given
-- (USD per token, the caller's price list); a model with no price can't be used under a dollar
-- cap. `p_ahead`: a reservation taken before the user has asked (vtai/metering/ahead.py); a
-- tier with a request rate gets none, since it would count a request nobody made.
create or replace function public.vtai_reserve(
  p_user uuid,
  p_prompt_tokens integer,
  p_max_completion integer,
  p_period text default 'month',
  p_ttl_seconds integer default 900,
  p_now timestamptz default now(),
  p_model text default null,
  p_price_in numeric default null,
  p_price_out numeric default null,
  p_ahead boolean default false,
  p_min_completion integer default 1
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
  resets_at timestamptz,
  weight numeric,
  daily_limit bigint,
  daily_used bigint,
  usd_limit numeric,
  usd_used numeric,
  rpm integer,
  tokens_left bigint
)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_tier text;
  v_token_limit bigint;
  v_daily_limit bigint;
  v_usd_limit numeric;
  v_rpm integer;
  v_allowed boolean;
  v_start timestamptz;
  v_end timestamptz;
  v_day timestamptz := vtai_period_start('day', p_now);
  v_minute timestamptz := date_trunc('minute', p_now);
  v_counter usage_counters%rowtype;
  v_daily daily_counters%rowtype;
  v_weight numeric;
  -- numeric: a tiny weight or price makes the room bigger than a bigint
  v_room numeric;
  v_completion bigint := p_max_completion;
  v_reason text;
  v_resets timestamptz := v_end;
  v_left bigint;
  v_dleft bigint;
  v_uleft numeric;
  v_amount bigint;
  v_cost numeric := 0;
  v_price_in numeric := p_price_in;
  v_price_out numeric := p_price_out;
  v_cat_in numeric;
  v_cat_out numeric;
  v_remaining bigint;
  v_topup bigint := 0;
  v_id uuid;
  -- The ledger keeps a row's cost to 8 decimals, rounded: a reservation holds one unit more,
  -- so a settled row never costs more than was reserved for it.
  c_cent_slack constant numeric := 0.00000001;
begin
  if p_period = 'billing' then
    select up.period_start, up.period_end into v_start, v_end
    from vtai_user_period(p_user, p_period, p_now) up;
  else  -- inline: a plpgsql call costs the gate's hot path more than this
    v_start := vtai_period_start(p_period, p_now);
    v_end := vtai_period_end(p_period, v_start);
  end if;
  v_resets := v_end;
  if v_start is null then
    raise exception 'unknown usage period %', p_period using errcode = '22023';
  end if;
  if p_prompt_tokens < 0 or p_max_completion < 1 then
    raise exception 'bad token counts' using errcode = '22023';
  end if;
  if p_price_in < 0 or p_price_out < 0 then
    raise exception 'bad prices' using errcode = '22023';
  end if;

  -- The plan, the model's place in it and its weight, in one statement.
  select t.name, t.token_limit, t.daily_limit, t.usd_limit, t.rpm,
         vtai_model_allowed(t.models, p_model), vtai_model_weight(p_model)
  into v_tier, v_token_limit, v_daily_limit, v_usd_limit, v_rpm, v_allowed, v_weight
  from profiles p join tiers t on t.name = p.tier where p.id = p_user;
  if not found then
    return query select false, 'unknown_user', null::uuid, 0, null::text, null::bigint,
      0::bigint, 0::bigint, v_start, v_end, null::numeric, null::bigint, 0::bigint,
      null::numeric, 0::numeric, null::integer, null::bigint;
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
      returning r.period_start, r.day_start, r.amount, r.cost
    ), per_period as (
      select e.period_start, sum(e.amount) as amount, sum(e.cost) as cost
      from expired e group by e.period_start
    ), per_day as (
      select e.day_start, sum(e.amount) as amount
      from expired e where e.day_start is not null group by e.day_start
    ), periods as (
      update usage_counters c
      set reserved = greatest(c.reserved - pp.amount, 0),
          cost_reserved = greatest(c.cost_reserved - pp.cost, 0), updated_at = p_now
      from per_period pp
      where c.end_user = p_user and c.period_start = pp.period_start
    )
    update daily_counters d
    set reserved = greatest(d.reserved - pd.amount, 0), updated_at = p_now
    from per_day pd
    where d.end_user = p_user and d.day_start = pd.day_start;

    select * into v_counter from usage_counters c
    where c.end_user = p_user and c.period_start = v_start;
  end if;

  -- A turn whose clock is behind the minute another turn already opened (its transaction
  -- began first, but took the lock second) counts in that minute: moving the window back
  -- would restart its count, and the rate could be exceeded at every minute's boundary.
  if v_counter.minute_start > v_minute then
    v_minute := v_counter.minute_start;
  end if;

  -- 1. The model.
  if v_allowed is not true then
    v_reason := 'model_not_allowed';
  -- 2. The request rate: every model, exempt ones too.
  elsif v_rpm is not null and p_ahead then
    v_reason := 'not_ahead';
  elsif v_rpm is not null and v_counter.minute_start = v_minute
        and v_counter.minute_requests >= v_rpm then
    v_reason := 'rate_limited';
    v_resets := v_minute + interval '1 minute';
  elsif v_rpm = 0 then
    v_reason := 'rate_limited';
    v_resets := v_minute + interval '1 minute';
  elsif v_weight > 0 then
    -- 3. Tokens for the period, in counted tokens; v_room is raw tokens of prompt + answer.
    if v_token_limit is not null then
      v_left := v_token_limit - v_counter.used - v_counter.reserved;
      -- Grants are read only when the tier's own tokens can't hold the whole turn, so the
      -- common reserve pays nothing for them.
      if v_left < ceil((p_prompt_tokens::numeric + p_max_completion) * v_weight) then
        select coalesce(sum(g.tokens - g.used), 0) into v_topup
        from token_grants g
        where g.end_user = p_user and g.used < g.tokens and g.expires_at > p_now;
        if v_topup > 0 then
          v_left := greatest(v_token_limit - v_counter.used, 0) + v_topup - v_counter.reserved;
        end if;
      end if;
      if v_left <= 0 then
        v_reason := 'quota_exhausted';
      else
        v_room := floor(v_left / v_weight);
        -- The quotient is rounded to the scale Postgres picks, so with a weight of many
        -- decimals it can round up to the next whole number: one token less then.
        if ceil(v_room * v_weight) > v_left then
          v_room := v_room - 1;
        end if;
        if v_room <= p_prompt_tokens then
          v_reason := 'prompt_exceeds_quota';
        else
          v_completion := least(v_completion, v_room - p_prompt_tokens);
        end if;
      end if;
    end if;
    -- 4. Tokens today.
    if v_reason is null and v_daily_limit is not null then
      select * into v_daily from daily_counters d
      where d.end_user = p_user and d.day_start = v_day
      for update;
      if not found then
        insert into daily_counters as d (end_user, day_start) values (p_user, v_day)
        on conflict (end_user, day_start) do nothing;
        select * into v_daily from daily_counters d
        where d.end_user = p_user and d.day_start = v_day
        for update;
      end if;
      v_dleft := v_daily_limit - v_daily.used - v_daily.reserved;
      if v_dleft <= 0 then
        v_reason := 'daily_exhausted';
        v_resets := v_day + interval '1 day';
      else
        v_room := floor(v_dleft / v_weight);
        if ceil(v_room * v_weight) > v_dleft then
          v_room := v_room - 1;
        end if;
        if v_room <= p_prompt_tokens then
          v_reason := 'prompt_exceeds_daily';
          v_resets := v_day + interval '1 day';
        else
          v_completion := least(v_completion, v_room - p_prompt_tokens);
        end if;
      end if;
    end if;
    -- 5. Dollars for the period, at the model's prices.
    if v_reason is null and v_usd_limit is not null then
      -- The catalogue's price, where it has one, wins over the caller's (LiteLLM's map): the
      -- database's own, never a process's copy of it.
      -- (as vtai.llm.tokens prices a catalogued model: a missing one of the two is 0).
      select coalesce(m.price_in, 0), coalesce(m.price_out, 0) into v_cat_in, v_cat_out
      from models m where m.model = p_model and (m.price_in is not null or m.price_out is not null);
      if found then
        v_price_in := v_cat_in;
        v_price_out := v_cat_out;
      end if;
      v_uleft := v_usd_limit - v_counter.cost_used - v_counter.cost_reserved;
      if v_price_in is null or v_price_out is null then
        v_reason := 'price_unknown';
      elsif v_uleft <= 0 then
        v_reason := 'usd_exhausted';
      elsif p_prompt_tokens * v_price_in + v_price_out + c_cent_slack > v_uleft then
        v_reason := 'prompt_exceeds_usd';
      elsif v_price_out > 0 then
        v_room := floor((v_uleft - p_prompt_tokens * v_price_in - c_cent_slack) / v_price_out);
        if p_prompt_tokens * v_price_in + v_room * v_price_out + c_cent_slack > v_uleft then
          v_room := v_room - 1;  -- the quotient rounded up, as for tokens
        end if;
        v_completion := least(v_completion, v_room);
      end if;
    end if;
  end if;

  -- A cap leaves less answer than the caller will start for: refused before anything counts
  -- (not even the request rate), and the answer it would get is in max_tokens.
  if v_reason is null and v_completion < p_min_completion then
    v_reason := 'short_answer_only';
  end if;

  if v_reason is not null then
    return query select false, v_reason, null::uuid,
      case when v_reason = 'short_answer_only' then v_completion::integer else 0 end,
      v_tier, v_token_limit,
      v_counter.used, v_counter.reserved, v_start, v_resets, v_weight, v_daily_limit,
      coalesce(v_daily.used, 0::bigint), v_usd_limit, v_counter.cost_used, v_rpm,
      null::bigint;
    return;
  end if;

  if v_weight > 0 then
    v_amount := ceil((p_prompt_tokens + v_completion) * v_weight);
    -- Dollars are held only under a dollar cap: they are what it is checked against.
    if v_usd_limit is not null then
      v_cost := p_prompt_tokens * v_price_in + v_completion * v_price_out + c_cent_slack;
    end if;
  else
    v_amount := 0;
  end if;

  -- Days are counted only under a daily cap (day_start null otherwise): one upsert less.
  insert into reservations (end_user, period_start, day_start, amount, cost, weight, created_at,
                            expires_at)
  values (p_user, v_start, case when v_daily_limit is not null then v_day end, v_amount, v_cost,
          v_weight, p_now,
          p_now + make_interval(secs => p_ttl_seconds))
  returning id into v_id;

  update usage_counters c
  set reserved = c.reserved + v_amount,
      cost_reserved = c.cost_reserved + v_cost,
      minute_requests = case when c.minute_start = v_minute then c.minute_requests + 1 else 1 end,
      minute_start = v_minute,
      updated_at = p_now
  where c.end_user = p_user and c.period_start = v_start
  returning c.used, c.reserved into v_counter.used, v_counter.reserved;

  if v_amount > 0 and v_daily_limit is not null then
    insert into daily_counters as d (end_user, day_start, reserved)
    values (p_user, v_day, v_amount)
    on conflict (end_user, day_start) do update
    set reserved = d.reserved + excluded.reserved, updated_at = p_now
    returning d.used into v_daily.used;
  end if;

  -- What is left under the tightest token cap after this reservation, in counted tokens.
  if v_weight > 0 then
    v_remaining := least(greatest(v_token_limit - v_counter.used, 0) + v_topup
                           - v_counter.reserved,
                         v_dleft - v_amount);
  end if;

  return query select true, 'granted', v_id, v_completion::integer, v_tier, v_token_limit,
    v_counter.used, v_counter.reserved, v_start, v_end, v_weight, v_daily_limit,
    coalesce(v_daily.used, 0::bigint), v_usd_limit, v_counter.cost_used, v_rpm,
    v_remaining;
end
$$;

-- The ledger write, for many rows in one transaction and one WAL flush. Idempotent on
-- litellm_call_id: a row already there changes nothing and its element is false, so retried
-- callbacks and spool replays never charge twice. Each row is counted at the weight its
-- reservation was taken at (the model's weight now, for a row without one).
create or replace function public.vtai_record_batch(p_rows jsonb, p_period text default 'month')
returns boolean[]
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_result boolean[];
  v_overflow jsonb;
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
                    (select up.period_start
                     from vtai_user_period(i.end_user, p_period, i.created) up)) as start,
           -- the day the reservation counted on; for a row without one (the gate was open),
           -- today if the user's tier has a daily cap; else none: days count only under one
           case when res.id is not null then res.day_start
                when (select t.daily_limit from profiles p join tiers t on t.name = p.tier
                      where p.id = i.end_user) is not null
                  then vtai_period_start('day', i.created) end as day,
           coalesce(res.weight, vtai_model_weight(i.r ->> 'model')) as weight,
           greatest(coalesce((i.r ->> 'total_tokens')::integer, i.prompt + i.completion), 0)
             as total,
           coalesce((i.r ->> 'total_cost')::numeric, 0) as cost,
           res.cost as held_cost
    from input i
    -- only the row's own user's reservation: a row can't settle someone else's
    left join reservations res on res.id = i.reservation_id and res.end_user = i.end_user
  ), inserted as (
    insert into request_logs (
      litellm_call_id, created_at, end_user, session_id, model, provider, status,
      prompt_tokens, completion_tokens, total_tokens, total_cost, response_time, period_start,
      messages, response, error, additional_details, weight, counted_tokens, day_start,
      source, api_key_id
    )
    select l.call_id, l.created, l.end_user, l.r ->> 'session_id',
           coalesce(l.r ->> 'model', ''), l.r ->> 'provider', l.r ->> 'status',
           l.prompt, l.completion, l.total, l.cost,
           (l.r ->> 'response_time')::real, l.start,
           l.r -> 'messages', l.r -> 'response', l.r -> 'error',
           coalesce(l.r -> 'additional_details', '{}'::jsonb),
           l.weight, ceil(l.total * l.weight)::bigint, l.day,
           l.r ->> 'source', (l.r ->> 'api_key_id')::uuid
    from located l
    order by l.call_id
    on conflict (litellm_call_id) do nothing
    returning litellm_call_id, end_user, period_start, day_start, total_tokens, counted_tokens,
              weight, total_cost
  ), settled as (
    select ins.end_user, ins.period_start, ins.day_start as day, ins.total_tokens,
           ins.counted_tokens,
           -- against the dollar cap: never more than the reservation held for it
           case when ins.weight = 0 then 0
                when l.held_cost > 0 then least(ins.total_cost, l.held_cost)
                else ins.total_cost end as cost,
           l.reservation_id
    from inserted ins join located l on l.call_id = ins.litellm_call_id
    where ins.end_user is not null
  ), released as (
    delete from reservations res using settled s
    where res.id = s.reservation_id and res.end_user = s.end_user
    returning s.end_user, res.period_start as held_start, res.day_start as held_day, res.amount,
              res.cost
  ), moves as (
    select s.end_user, s.period_start, s.counted_tokens as used, s.total_tokens::bigint as raw,
           s.cost, 0::bigint as freed, 0::numeric as freed_cost
    from settled s
    union all
    select r.end_user, r.held_start, 0, 0, 0, r.amount, r.cost from released r
  ), per_counter as (
    select m.end_user, m.period_start, sum(m.used)::bigint as used, sum(m.raw)::bigint as raw,
           sum(m.cost) as cost, sum(m.freed)::bigint as freed, sum(m.freed_cost) as freed_cost
    from moves m group by m.end_user, m.period_start
  ), counted as (
    insert into usage_counters as c (end_user, period_start, used, used_raw, cost_used)
    select p.end_user, p.period_start, p.used, p.raw, p.cost from per_counter p
    order by p.end_user, p.period_start
    on conflict (end_user, period_start) do update
    set used = c.used + excluded.used,
        used_raw = c.used_raw + excluded.used_raw,
        cost_used = c.cost_used + excluded.cost_used,
        reserved = greatest(c.reserved - (
          select p.freed from per_counter p
          where p.end_user = c.end_user and p.period_start = c.period_start), 0),
        cost_reserved = greatest(c.cost_reserved - (
          select p.freed_cost from per_counter p
          where p.end_user = c.end_user and p.period_start = c.period_start), 0),
        updated_at = now()
    returning c.end_user, c.period_start, c.used
  ), overflow as (
    -- What this batch counted past the tier's token limit is paid from grants.
    select k.end_user,
           greatest(k.used - greatest(k.used - pc.used, t.token_limit), 0) as tokens
    from counted k
    join per_counter pc on pc.end_user = k.end_user and pc.period_start = k.period_start
    join profiles p on p.id = k.end_user
    join tiers t on t.name = p.tier
    where t.token_limit is not null and k.used > t.token_limit
  ), day_moves as (
    select s.end_user, s.day, s.counted_tokens as used, 0::bigint as freed
    from settled s where s.counted_tokens > 0 and s.day is not null
    union all
    select r.end_user, r.held_day, 0, r.amount from released r
    where r.held_day is not null and r.amount > 0
  ), per_day as (
    select m.end_user, m.day, sum(m.used)::bigint as used, sum(m.freed)::bigint as freed
    from day_moves m group by m.end_user, m.day
  ), days as (
    -- Day counters after the period counters: Postgres runs unread data-modifying CTEs in no
    -- promised order (in fact the last first), so reading `counted` here makes the period
    -- counters' locks come first, as in vtai_reserve(); the other order deadlocks with it.
    insert into daily_counters as d (end_user, day_start, used)
    select p.end_user, p.day, p.used from per_day p
    where (select count(*) from counted) >= 0
    order by p.end_user, p.day
    on conflict (end_user, day_start) do update
    set used = d.used + excluded.used,
        reserved = greatest(d.reserved - (
          select p.freed from per_day p
          where p.end_user = d.end_user and p.day = d.day_start), 0),
        updated_at = now()
    returning 1
  )
  select coalesce(
           array_agg(ins.litellm_call_id is not null and i.ord = el.ord order by el.ord),
           '{}'),
         (select jsonb_object_agg(o.end_user, o.tokens) from (
            select ov.end_user, sum(ov.tokens) as tokens from overflow ov
            where ov.tokens > 0 group by ov.end_user) o)
  into v_result, v_overflow
  from elements el
  left join input i on i.call_id = el.call_id
  left join inserted ins on ins.litellm_call_id = el.call_id;

  -- Grants pay for what was counted past the tier's limit, earliest expiry first. A statement
  -- of its own: the one above read the grants before it waited for the counters' locks, and
  -- only now, holding them, are the grants' `used` settled (they change only under them).
  if v_overflow is not null then
    with takes as (
      select g.id,
             least(g.tokens - g.used,
                   greatest((v_overflow ->> g.end_user::text)::bigint
                            - coalesce(sum(g.tokens - g.used) over (
                                partition by g.end_user order by g.expires_at, g.id
                                rows between unbounded preceding and 1 preceding), 0), 0))
               as take
      from token_grants g
      where g.end_user in (select k::uuid from jsonb_object_keys(v_overflow) k)
        and g.used < g.tokens and g.expires_at > now()
    )
    update token_grants g set used = least(g.used + t.take, g.tokens)
    from takes t where g.id = t.id and t.take > 0;
  end if;
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
-- Lock order is the ledger's (reservation, then counters), so it queues behind a settle and
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
    returning r.end_user, r.period_start, r.day_start, r.amount, r.cost
  ), moved as (
    -- Data-modifying CTEs run to completion whether or not they are read.
    update usage_counters c
    set reserved = greatest(c.reserved - rel.amount, 0),
        cost_reserved = greatest(c.cost_reserved - rel.cost, 0), updated_at = now()
    from released rel
    where c.end_user = rel.end_user and c.period_start = rel.period_start
    returning 1
  ), day_moved as (
    -- After the period counter (reading `moved` runs it first), as in vtai_reserve().
    update daily_counters d
    set reserved = greatest(d.reserved - rel.amount, 0), updated_at = now()
    from released rel
    where d.end_user = rel.end_user and d.day_start = rel.day_start and rel.amount > 0
      and (select count(*) from moved) >= 0
  )
  select exists (select 1 from released)
$$;

-- Where a user stands under every cap of their plan: two counter rows, never history.
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
  resets_at timestamptz,
  daily_limit bigint,
  daily_used bigint,
  day_resets_at timestamptz,
  usd_limit numeric,
  usd_used numeric,
  rpm integer,
  models text[],
  topup_left bigint,
  topup_until timestamptz
)
language sql stable
security definer
set search_path = public, pg_temp
as $$
  select p.username, p.tier, t.token_limit,
         coalesce(c.used, 0), coalesce(c.reserved, 0),
         up.period_start, up.period_end,
         t.daily_limit, coalesce(d.used, 0),
         vtai_period_start('day', p_now) + interval '1 day',
         t.usd_limit, coalesce(c.cost_used, 0), t.rpm, t.models,
         coalesce(g.left_tokens, 0), g.until
  from profiles p
  join tiers t on t.name = p.tier
  cross join lateral vtai_user_period(p.id, p_period, p_now) up
  left join usage_counters c
    on c.end_user = p.id and c.period_start = up.period_start
  left join daily_counters d
    on d.end_user = p.id and d.day_start = vtai_period_start('day', p_now)
  left join lateral (
    select sum(tg.tokens - tg.used)::bigint as left_tokens, min(tg.expires_at) as until
    from token_grants tg
    where tg.end_user = p.id and tg.used < tg.tokens and tg.expires_at > p_now
  ) g on true
  where p.id = p_user
$$;

-- Consistency check for operators and tests: every counter that differs from the sum of its
-- ledger rows, in counted tokens (rows before plans count their total). `counter` is
-- 'period' (usage_counters) or 'day' (daily_counters, start of the UTC day in period_start).
-- An empty result means counters equal the ledger.
create or replace function public.vtai_verify_counters()
returns table (
  end_user uuid,
  period_start timestamptz,
  counter_used bigint,
  ledger_used bigint,
  counter text
)
language sql stable
security definer
set search_path = public, pg_temp
as $$
  select coalesce(l.end_user, c.end_user), coalesce(l.period_start, c.period_start),
         coalesce(c.used, 0), coalesce(l.used, 0), 'period'
  from (
    select r.end_user, r.period_start,
           sum(coalesce(r.counted_tokens, r.total_tokens))::bigint as used
    from request_logs r
    where r.end_user is not null
    group by r.end_user, r.period_start
  ) l
  full join usage_counters c
    on c.end_user = l.end_user and c.period_start = l.period_start
  where coalesce(c.used, 0) <> coalesce(l.used, 0)
  union all
  -- Days are counted from plans on: only rows that carry their day.
  select coalesce(l.end_user, d.end_user), coalesce(l.day, d.day_start),
         coalesce(d.used, 0), coalesce(l.used, 0), 'day'
  from (
    select r.end_user, r.day_start as day, sum(r.counted_tokens)::bigint as used
    from request_logs r
    where r.end_user is not null and r.counted_tokens > 0 and r.day_start is not null
    group by r.end_user, r.day_start
  ) l
  full join daily_counters d
    on d.end_user = l.end_user and d.day_start = l.day
  where coalesce(d.used, 0) <> coalesce(l.used, 0)
$$;

-- Money functions run only for the server: never for anon, and not for signed-in users,
-- who could otherwise reserve or record on anyone's behalf.
revoke all on function
  public.vtai_glob_like(text),
  public.vtai_model_weight(text),
  public.vtai_model_allowed(text[], text),
  public.vtai_user_period(uuid, text, timestamptz),
  public.vtai_reserve(uuid, integer, integer, text, integer, timestamptz, text, numeric, numeric,
                      boolean, integer),
  public.vtai_record_batch(jsonb, text),
  public.vtai_record(jsonb, text),
  public.vtai_release(uuid, uuid),
  public.vtai_usage(uuid, text, timestamptz),
  public.vtai_verify_counters()
  from public, anon, authenticated;
grant execute on function
  public.vtai_glob_like(text),
  public.vtai_model_weight(text),
  public.vtai_model_allowed(text[], text),
  public.vtai_user_period(uuid, text, timestamptz),
  public.vtai_reserve(uuid, integer, integer, text, integer, timestamptz, text, numeric, numeric,
                      boolean, integer),
  public.vtai_record_batch(jsonb, text),
  public.vtai_record(jsonb, text),
  public.vtai_release(uuid, uuid),
  public.vtai_usage(uuid, text, timestamptz),
  public.vtai_verify_counters()
  to service_role;
