-- Provider balances for the admin dashboard, and the indexes its request log browser pages on.
--
-- One row per configured provider, written only by the server (vtai/balances.py). A failed
-- sync keeps the last good balance and fetched_at and records error / error_at beside them,
-- so the dashboard can show "$12.30 as of yesterday; last sync failed: timeout".
-- Supabase's default privileges grant anon and authenticated ALL on new tables in public, so
-- access is revoked explicitly; no user-level role may read balances (RLS on, no policy).

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

-- Keyset pagination of the log browser: `(created_at, id) < (cursor)` newest first, for all
-- users and for one user. Without the id column the row comparison can't use an index and
-- ties on created_at would be sorted per page instead of once.
create index if not exists request_logs_created_id_idx
  on public.request_logs (created_at desc, id desc);
create index if not exists request_logs_end_user_created_id_idx
  on public.request_logs (end_user, created_at desc, id desc);
