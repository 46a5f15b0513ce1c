-- The gate's common path in fewer statements: the counter row is locked with one SELECT
-- (inserted only in a user's first turn of a period), and expired reservations are looked
-- for with an index probe before the delete that returns their quota. Same rules, same
-- signature and result as 20261122000200_metering; only the function body changes.

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
