-- Plans: what a tier may spend, and on which models (docs/metering.md, "Plans").
--
-- Tables and columns only. The rules that use them are in supabase/migrations/functions/
-- (vtai_reserve checks every cap in one transaction), re-applied whenever their text changes.
--
-- * tiers: besides the token limit per period, an optional daily token cap, an optional USD
--   cap per period, an optional request rate, and the model patterns the tier may use.
--   Defaults keep what a tier was before: no other cap, every model.
-- * model_weights: how many tokens one token of a model counts as. Patterns are shell-style;
--   an exact name beats a pattern and a longer pattern a shorter one; no match counts 1. The
--   catalogue's per-model weight (20261201001000_model_catalogue) moves here as exact rules.
-- * Counters: the period counter also holds dollars (used and reserved), raw tokens, and the
--   request count of the current minute; daily_counters holds tokens per UTC day.
-- * request_logs: the weight applied and the tokens counted, next to the raw tokens the
--   provider reported (total_tokens). Rows before this have neither: they counted 1 to 1.
-- * audit_log: every change to a plan, a weight, a model or a user's tier, append-only.
--
-- Columns with a constant default (or none) are added without rewriting any table.

alter table public.tiers
  add column if not exists daily_limit bigint check (daily_limit is null or daily_limit >= 0),
  add column if not exists usd_limit numeric(18, 8) check (usd_limit is null or usd_limit >= 0),
  add column if not exists rpm integer check (rpm is null or rpm >= 0),
  add column if not exists models text[] not null default '{*}'
    check (cardinality(models) <= 200 and array_position(models, null) is null);

create table if not exists public.model_weights (
  pattern text primary key check (length(pattern) between 1 and 200),
  weight numeric not null check (weight >= 0 and weight <= 1000000),
  updated_at timestamptz not null default now()
);

do $$
begin
  if exists (
    select 1 from information_schema.columns
    where table_schema = 'public' and table_name = 'models' and column_name = 'weight'
  ) then
    insert into public.model_weights (pattern, weight)
    select m.model, m.weight from public.models m where m.weight <> 1
    on conflict (pattern) do nothing;
    alter table public.models drop column weight;
  end if;
end
$$;

alter table public.usage_counters
  add column if not exists used_raw bigint not null default 0 check (used_raw >= 0),
  -- USD, unscaled: reserved and settled amounts add up exactly
  add column if not exists cost_used numeric not null default 0,
  add column if not exists cost_reserved numeric not null default 0 check (cost_reserved >= 0),
  add column if not exists minute_start timestamptz,
  add column if not exists minute_requests integer not null default 0;

create table if not exists public.daily_counters (
  end_user uuid not null,
  day_start timestamptz not null,
  used bigint not null default 0 check (used >= 0),
  reserved bigint not null default 0 check (reserved >= 0),
  updated_at timestamptz not null default now(),
  primary key (end_user, day_start)
);

-- What a reservation holds besides its (counted) tokens, so that settling gives back exactly
-- what reserving took, on the day it took it, at the weight it used.
alter table public.reservations
  add column if not exists day_start timestamptz,
  add column if not exists cost numeric not null default 0 check (cost >= 0),
  add column if not exists weight numeric not null default 1;

-- day_start: the UTC day the row counted against, that of its reservation (a turn reserved
-- before midnight counts on the day it reserved on).
alter table public.request_logs
  add column if not exists weight numeric,
  add column if not exists counted_tokens bigint check (counted_tokens >= 0),
  add column if not exists day_start timestamptz;

create table if not exists public.audit_log (
  id bigint generated always as identity primary key,
  at timestamptz not null default now(),
  -- an admin's username, or cli:<OS user>
  actor text not null check (length(actor) between 1 and 200),
  -- tier.set | model.add | model.enable | model.disable | model.weight | user.tier
  action text not null,
  target text not null,
  before jsonb,
  after jsonb
);
create index if not exists audit_log_at_idx on public.audit_log (at desc, id desc);

-- Append-only for every role, the table's owner included: a trigger refuses the rest.
create or replace function public.vtai_audit_log_append_only()
returns trigger
language plpgsql
set search_path = pg_catalog
as $$
begin
  raise exception 'audit_log is append-only' using errcode = '42501';
end
$$;

drop trigger if exists audit_log_append_only on public.audit_log;
create trigger audit_log_append_only
  before update or delete on public.audit_log
  for each row execute function public.vtai_audit_log_append_only();

drop trigger if exists audit_log_no_truncate on public.audit_log;
create trigger audit_log_no_truncate
  before truncate on public.audit_log
  for each statement execute function public.vtai_audit_log_append_only();

revoke all on function public.vtai_audit_log_append_only() from public, anon, authenticated;

alter table public.model_weights enable row level security;
alter table public.daily_counters enable row level security;
alter table public.audit_log enable row level security;
revoke all on public.model_weights, public.daily_counters, public.audit_log
  from public, anon, authenticated;
grant all on public.model_weights, public.daily_counters to service_role;
grant select, insert on public.audit_log to service_role;
revoke all on sequence public.audit_log_id_seq from public, anon, authenticated;
