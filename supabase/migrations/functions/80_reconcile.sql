-- The ledger against the bill: each UTC day, what the ledger charged per provider beside what
-- the provider says it charged, and the drift alert.
-- version: 1
--
-- A function file (supabase/migrations/functions/20_metering.sql says what that means); the
-- tables are in 20261207000300_reconcile.sql, and vtai/admin/reconcile.py is the only caller.
--
-- Rules (docs/admin.md, "The ledger against the bill", explains them for operators):
-- * A provider with a spend API (vtai_spend_api_providers(): OpenRouter) is reconciled over
--   the window between two of its snapshots: from the newest taken at or before the day's
--   start (else the day's first) to the newest taken at or before the day's end. Windows of
--   consecutive days meet exactly, so no ledger row is counted twice or missed, and the
--   ledger is summed over exactly the window the provider's figures cover.
-- * The provider's figure is the rise of its running usage total between the two snapshots
--   (a top-up is not spend); without a usage total, the fall of its balance.
-- * The ledger's figure is total_cost of every row in the window whose provider is this one
--   (a model routed through OpenRouter counts as OpenRouter's), leaving out `source = 'probe'`
--   rows (vtai doctor's test turns, which the provider does bill: drift from them is known).
-- * drift = ledger - provider; drift % = drift / provider x 100 (null when the provider
--   charged nothing). It alerts when |drift| >= the minimum dollars AND |drift %| >= the
--   percent (or the provider charged nothing), so pennies never alert.
-- * Providers without a spend API get a row with the ledger's figure and a note saying how to
--   check it, never a provider figure of zero.
-- * An alert adds a `ledger.drift` event to the operator webhook outbox
--   (public.vtai_outbox_add, when it is installed) in the transaction that stores the row,
--   once per provider and day (its dedupe key is drift:<provider>:<day>).
-- * A day is reconciled once, after it ends (vtai_reconcile_due); by then no snapshot can
--   land inside its window. vtai_reconcile_day() recomputes one on demand (late ledger rows).

-- Signatures this file replaced: none yet.

-- Which providers report what they charged. Only these can be reconciled by machine.
create or replace function public.vtai_spend_api_providers()
returns text[]
language sql immutable
as $$
  select array['openrouter']::text[]
$$;

-- The provider a ledger row is reconciled under.
create or replace function public.vtai_ledger_provider(p_provider text, p_model text)
returns text
language sql immutable
as $$
  select case
    when coalesce(p_model, '') like 'openrouter/%' then 'openrouter'
    when coalesce(p_provider, '') <> '' then p_provider
    when pg_catalog.strpos(coalesce(p_model, ''), '/') > 0
      then pg_catalog.split_part(p_model, '/', 1)
    else 'unknown'
  end
$$;

-- What a row without a provider figure says instead.
create or replace function public.vtai_reconcile_note(p_provider text)
returns text
language sql immutable
as $$
  select case
    when p_provider = any (public.vtai_spend_api_providers())
      then 'no balance snapshots around this day: keep the provider''s key set and the'
           ' balance sync on (VTAI_BALANCE_SYNC_INTERVAL)'
    when p_provider = 'local' then 'runs locally: there is no provider bill'
    else 'no spend API: reconcile against the provider''s invoice by hand'
  end
$$;

-- The drift rule.
create or replace function public.vtai_drift_alerts(
  p_ledger numeric, p_provider numeric, p_percent numeric, p_min_usd numeric
)
returns boolean
language sql immutable
as $$
  select p_provider is not null
    and p_ledger <> p_provider
    and pg_catalog.abs(p_ledger - p_provider) >= p_min_usd
    and (p_provider = 0
         or pg_catalog.abs(p_ledger - p_provider) * 100 >= p_percent * pg_catalog.abs(p_provider))
$$;

-- What the ledger charged for a provider in [p_from, p_to).
create or replace function public.vtai_ledger_cost(
  p_provider text, p_from timestamptz, p_to timestamptz
)
returns numeric
language sql stable
security definer
set search_path = public, pg_temp
as $$
  select coalesce(sum(l.total_cost), 0)
  from request_logs l
  where l.created_at >= p_from and l.created_at < p_to
    and public.vtai_ledger_provider(l.provider, l.model) = p_provider
    and l.source is distinct from 'probe'
$$;

-- Reconcile one UTC day: every spend-API provider with snapshots around it, and every other
-- provider with ledger rows in it. Stores (replacing) and returns the day's rows.
create or replace function public.vtai_reconcile_day(
  p_day date, p_percent numeric, p_min_usd numeric
)
returns setof public.ledger_reconciliations
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_start timestamptz := p_day::timestamp at time zone 'UTC';
  v_end timestamptz := (p_day + 1)::timestamp at time zone 'UTC';
  v_outbox boolean := pg_catalog.to_regprocedure('public.vtai_outbox_add(text,jsonb,text)')
                      is not null;
  v_provider text;
  s provider_spend_snapshots;
  e provider_spend_snapshots;
  v_ledger numeric;
  v_billed numeric;
  v_pct numeric;
  v_alert boolean;
  v_sent uuid;
  v_event uuid;
begin
  foreach v_provider in array public.vtai_spend_api_providers() loop
    -- SELECT INTO sets the record to nulls when no row is found.
    select * into s from provider_spend_snapshots
    where provider = v_provider and taken_at <= v_start
    order by taken_at desc, id desc limit 1;
    if not found then
      select * into s from provider_spend_snapshots
      where provider = v_provider and taken_at > v_start and taken_at < v_end
      order by taken_at, id limit 1;
    end if;
    e := null;
    if s.id is not null then
      select * into e from provider_spend_snapshots
      where provider = v_provider and taken_at <= v_end and taken_at > s.taken_at
      order by taken_at desc, id desc limit 1;
    end if;
    continue when e.id is null;

    v_ledger := public.vtai_ledger_cost(v_provider, s.taken_at, e.taken_at);
    v_billed := coalesce(e.usage - s.usage, s.balance - e.balance);
    v_pct := case when v_billed <> 0 then round((v_ledger - v_billed) * 100 / v_billed, 4) end;
    v_alert := public.vtai_drift_alerts(v_ledger, v_billed, p_percent, p_min_usd);

    -- The row's lock serialises two recomputations of the day, so one event at most.
    select r.alert_event into v_sent from ledger_reconciliations r
    where r.provider = v_provider and r.day = p_day for update;
    v_event := null;
    if v_alert and v_sent is null and v_outbox then
      -- By name at run time: the outbox's function may be installed after this file.
      execute 'select public.vtai_outbox_add($1, $2, $3)' into v_event
      using 'ledger.drift',
            jsonb_build_object(
              'provider', v_provider, 'day', p_day,
              'window_start', s.taken_at, 'window_end', e.taken_at,
              'ledger_usd', v_ledger, 'provider_usd', v_billed,
              'drift_usd', v_ledger - v_billed, 'drift_percent', v_pct,
              'alert_percent', p_percent, 'alert_min_usd', p_min_usd),
            'drift:' || v_provider || ':' || p_day::text;
    end if;

    insert into ledger_reconciliations as r (
      provider, day, window_start, window_end, ledger_usd, provider_usd, drift_usd,
      drift_percent, alert, alert_event, note
    ) values (
      v_provider, p_day, s.taken_at, e.taken_at, v_ledger, v_billed, v_ledger - v_billed,
      v_pct, v_alert, v_event, null
    )
    on conflict (provider, day) do update set
      window_start = excluded.window_start, window_end = excluded.window_end,
      ledger_usd = excluded.ledger_usd, provider_usd = excluded.provider_usd,
      drift_usd = excluded.drift_usd, drift_percent = excluded.drift_percent,
      alert = excluded.alert, alert_event = coalesce(r.alert_event, excluded.alert_event),
      note = null, computed_at = now();
  end loop;

  -- Everyone else with ledger rows that day, over the whole UTC day.
  insert into ledger_reconciliations as r (
    provider, day, window_start, window_end, ledger_usd, note
  )
  select x.provider, p_day, v_start, v_end, x.cost, public.vtai_reconcile_note(x.provider)
  from (
    select public.vtai_ledger_provider(l.provider, l.model) as provider,
           sum(l.total_cost) as cost
    from request_logs l
    where l.created_at >= v_start and l.created_at < v_end
      and l.source is distinct from 'probe'
    group by 1
  ) x
  where not exists (
    select 1 from ledger_reconciliations d
    where d.provider = x.provider and d.day = p_day and d.provider_usd is not null
  )
  on conflict (provider, day) do update set
    ledger_usd = excluded.ledger_usd, note = excluded.note, computed_at = now();

  return query select * from ledger_reconciliations where day = p_day order by provider;
end
$$;

-- Reconcile every ended UTC day of the last p_days that has no row yet; returns the new rows.
-- Every app process calls it after each balance sync: the lock makes the others wait, and
-- then find nothing to do.
create or replace function public.vtai_reconcile_due(
  p_percent numeric, p_min_usd numeric, p_now timestamptz default now(), p_days integer default 7
)
returns setof public.ledger_reconciliations
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_today date := (p_now at time zone 'UTC')::date;
  v_day date;
begin
  perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('vtai_reconcile_due'));
  for v_day in select v_today - i from pg_catalog.generate_series(p_days, 1, -1) i loop
    continue when exists (select 1 from ledger_reconciliations where day = v_day);
    return query select * from public.vtai_reconcile_day(v_day, p_percent, p_min_usd);
  end loop;
end
$$;

revoke all on function
  public.vtai_spend_api_providers(),
  public.vtai_ledger_provider(text, text),
  public.vtai_reconcile_note(text),
  public.vtai_drift_alerts(numeric, numeric, numeric, numeric),
  public.vtai_ledger_cost(text, timestamptz, timestamptz),
  public.vtai_reconcile_day(date, numeric, numeric),
  public.vtai_reconcile_due(numeric, numeric, timestamptz, integer)
  from public, anon, authenticated;
grant execute on function
  public.vtai_spend_api_providers(),
  public.vtai_ledger_provider(text, text),
  public.vtai_reconcile_note(text),
  public.vtai_drift_alerts(numeric, numeric, numeric, numeric),
  public.vtai_ledger_cost(text, timestamptz, timestamptz),
  public.vtai_reconcile_day(date, numeric, numeric),
  public.vtai_reconcile_due(numeric, numeric, timestamptz, integer)
  to service_role;
