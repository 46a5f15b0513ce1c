-- Batched ledger writes: one transaction and one WAL flush for many turns.
--
-- * vtai_record_batch() is now the only definition of how a ledger row is accounted;
--   vtai_record() is a one-row batch. The rules are unchanged (see 20261122000200_metering):
--   idempotent on litellm_call_id, the reservation is released and the counter moved in the
--   same transaction, and only for rows that are new.
-- * Locks are taken in key order (ledger rows by call id, then counters by user and period),
--   so concurrent batches queue instead of deadlocking; the order ledger -> reservation ->
--   counter is the one vtai_reserve() already respects.
-- * The aggregates trigger on INSERT becomes a statement trigger over the inserted rows, so a
--   batch of 100 turns does one upsert per bucket instead of two per row. UPDATE and DELETE
--   keep the row trigger: they are rare (admin fixes, legacy scripts).

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

-- Every ledger insert pays for every index. The first two are prefixes of the keyset indexes
-- of 20261122000600_provider_balances, which serve the same queries; nothing looks rows up by
-- (end_user, period_start): counters are verified with a scan of the whole ledger.
drop index if exists public.request_logs_created_idx;
drop index if exists public.request_logs_end_user_created_idx;
drop index if exists public.request_logs_period_idx;

revoke all on function public.vtai_record_batch(jsonb, text) from public, anon, authenticated;
revoke all on function public.vtai_record(jsonb, text) from public, anon, authenticated;
revoke all on function public.vtai_request_logs_aggregate_inserted()
  from public, anon, authenticated;
grant execute on function public.vtai_record_batch(jsonb, text), public.vtai_record(jsonb, text)
  to service_role;
