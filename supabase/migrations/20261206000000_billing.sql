-- Billing with Stripe (issue #19): customers, subscriptions, the events that moved them, and
-- top-up grants counted by the gate on top of a tier's period token limit.
--
-- Tables only. What an event does (tiers, grants, refunds) is in
-- supabase/migrations/functions/50_billing.sql; how the gate counts grants is in
-- functions/20_metering.sql.
--
-- * billing_customers: the Stripe customer of a profile, one each way, so an upgrade reuses it.
-- * billing_subscriptions: the newest state VT.ai has applied of each Stripe subscription.
--   `event_created` is the time of the newest event applied, so an older event that arrives
--   late changes nothing. `tier` is null for a Price that VTAI_STRIPE_PRICES does not map.
-- * billing_events: every Stripe event, once (its id is the key), with what it did. A replay
--   of an event already stored is a no-op.
-- * token_grants: tokens bought (or given) on top of the tier's period limit, until
--   `expires_at`. `used` only grows and never passes `tokens`; a refund lowers `tokens` to
--   no less than `used`. `ref` is the Stripe PaymentIntent that paid for it, found by refunds.
-- * No user reads these over the API: RLS on, no policies, and every grant to anon and
--   authenticated taken back (Supabase's default privileges give them ALL on a new table).

create table if not exists public.billing_customers (
  user_id uuid primary key references public.profiles (id) on delete cascade,
  customer_id text not null unique check (length(customer_id) between 1 and 255),
  created_at timestamptz not null default now()
);

create table if not exists public.billing_subscriptions (
  subscription_id text primary key check (length(subscription_id) between 1 and 255),
  user_id uuid not null references public.profiles (id) on delete cascade,
  customer_id text not null,
  price_id text,
  tier text references public.tiers (name) on update cascade,
  status text not null,
  current_period_start timestamptz,
  current_period_end timestamptz,
  cancel_at_period_end boolean not null default false,
  -- When a payment first failed in the current run of failures: the grace period counts from
  -- it (VTAI_BILLING_GRACE_DAYS); null once an invoice is paid.
  payment_failed_at timestamptz,
  event_created timestamptz not null,
  updated_at timestamptz not null default now()
);
create index if not exists billing_subscriptions_user_idx
  on public.billing_subscriptions (user_id);

create table if not exists public.billing_events (
  event_id text primary key check (length(event_id) between 1 and 255),
  type text not null,
  created timestamptz not null,
  received_at timestamptz not null default now(),
  user_id uuid references public.profiles (id) on delete set null,
  outcome text not null,
  payload jsonb
);
create index if not exists billing_events_received_idx on public.billing_events (received_at);
-- A refund's earlier refunds, a late payment failure's later payments: one user's events.
create index if not exists billing_events_user_type_idx
  on public.billing_events (user_id, type, created);

create table if not exists public.token_grants (
  id uuid primary key default gen_random_uuid(),
  end_user uuid not null references public.profiles (id) on delete cascade,
  tokens bigint not null check (tokens >= 0),
  used bigint not null default 0 check (used >= 0 and used <= tokens),
  expires_at timestamptz not null,
  source text not null check (source in ('stripe', 'admin')),
  ref text unique,
  created_at timestamptz not null default now()
);
-- The gate's read: a user's grants with tokens left, earliest expiry first.
create index if not exists token_grants_open_idx
  on public.token_grants (end_user, expires_at) where used < tokens;

alter table public.billing_customers enable row level security;
alter table public.billing_subscriptions enable row level security;
alter table public.billing_events enable row level security;
alter table public.token_grants enable row level security;
revoke all on public.billing_customers, public.billing_subscriptions, public.billing_events,
  public.token_grants from public, anon, authenticated;
grant all on public.billing_customers, public.billing_subscriptions, public.billing_events,
  public.token_grants to service_role;
