-- Notices and operator webhooks (issue #20; docs/operations.md, "Quota notices" and "Webhooks").
--
-- Tables only. What crosses a threshold, what is sent once, how a delivery is claimed, retried
-- and given up on: supabase/migrations/functions/60_notify.sql.
--
-- * quota_notices: each threshold (VTAI_WARN_AT, percent) of each cap a user has been told
--   about, once per period: unique on (user, cap, threshold, period_start). cap is `tokens`
--   (the period's tokens, top-ups included), `daily` (period_start is the UTC day) or `usd`.
-- * quota_refusals: the first refusal of a user at each cap in each period, so the operator's
--   `quota.refused` event is sent once, not once per refused turn.
-- * webhook_endpoints: the URLs (VTAI_WEBHOOK_URLS) the app last started with. No active
--   endpoint, no event is written: webhooks are off and nothing fills a table nobody drains.
-- * webhook_events: the transactional outbox. An event is written in the same transaction as
--   the fact it reports; `dedupe`, when given, makes a second event with the same key a no-op.
-- * webhook_deliveries: one row per event and URL, each URL delivered and retried on its own.
--   A sender claims a due row by moving next_attempt_at past a lease, commits, then sends.
-- * No user reads these over the API: RLS on, no policies, and every grant to anon and
--   authenticated taken back (Supabase's default privileges give them ALL on a new table).

create table if not exists public.quota_notices (
  end_user uuid not null references public.profiles (id) on delete cascade,
  cap text not null check (cap in ('tokens', 'daily', 'usd')),
  threshold integer not null check (threshold between 1 and 1000),
  period_start timestamptz not null,
  used numeric not null,
  cap_limit numeric not null,
  created_at timestamptz not null default now(),
  primary key (end_user, cap, threshold, period_start)
);

create table if not exists public.quota_refusals (
  end_user uuid not null references public.profiles (id) on delete cascade,
  cap text not null check (cap in ('tokens', 'daily', 'usd')),
  period_start timestamptz not null,
  reason text not null,
  created_at timestamptz not null default now(),
  primary key (end_user, cap, period_start)
);

create table if not exists public.webhook_endpoints (
  url text primary key check (length(url) between 8 and 2000),
  active boolean not null default true,
  updated_at timestamptz not null default now()
);

create table if not exists public.webhook_events (
  id uuid primary key default gen_random_uuid(),
  type text not null check (length(type) between 1 and 100),
  payload jsonb not null default '{}'::jsonb,
  dedupe text unique check (dedupe is null or length(dedupe) between 1 and 500),
  created_at timestamptz not null default now()
);
create index if not exists webhook_events_created_idx on public.webhook_events (created_at);

create table if not exists public.webhook_deliveries (
  event_id uuid not null references public.webhook_events (id) on delete cascade,
  url text not null,
  attempts integer not null default 0,
  next_attempt_at timestamptz not null default now(),
  delivered_at timestamptz,
  -- given up on (too old to be worth sending); `vtai webhooks retry` puts it back
  failed_at timestamptz,
  last_status integer,
  last_error text,
  updated_at timestamptz not null default now(),
  primary key (event_id, url)
);
-- The sender's read: due rows, oldest first.
create index if not exists webhook_deliveries_due_idx
  on public.webhook_deliveries (next_attempt_at) where delivered_at is null and failed_at is null;

alter table public.quota_notices enable row level security;
alter table public.quota_refusals enable row level security;
alter table public.webhook_endpoints enable row level security;
alter table public.webhook_events enable row level security;
alter table public.webhook_deliveries enable row level security;
revoke all on public.quota_notices, public.quota_refusals, public.webhook_endpoints,
  public.webhook_events, public.webhook_deliveries from public, anon, authenticated;
grant all on public.quota_notices, public.quota_refusals, public.webhook_endpoints,
  public.webhook_events, public.webhook_deliveries to service_role;
