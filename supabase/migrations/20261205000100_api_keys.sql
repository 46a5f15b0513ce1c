-- Personal API keys for the OpenAI-compatible endpoint /v1 (issue #18), metered by the same gate
-- as the chat.
--
-- Tables and columns only. The lookup the endpoint makes on every request, vtai_api_key_owner(),
-- is in supabase/migrations/functions/40_api_keys.sql.
--
-- * api_keys: a key belongs to a profile (deleting the user deletes the keys). Only the
--   sha256 of the key is stored (key_hash), never the key itself; `prefix` is its first
--   characters, enough for a person to recognise it. A key works while it is not revoked, not
--   expired, and its profile exists and is not disabled.
-- * A signed-in user (authenticated) reads the metadata of their own keys and nothing else:
--   a column-level grant leaves key_hash out, and RLS leaves other users' rows out. Keys are
--   created and revoked by the app (service_role or the table's owner), never by the API.
-- * request_logs: where a row came from (`source`: 'chat' or 'api'; null on the rows before
--   this, all from the chat) and which key made it. No foreign key on api_key_id: deleting a
--   key (with its user) never touches the ledger.
--
-- Columns with no default are added without rewriting any table.

create table if not exists public.api_keys (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references public.profiles (id) on delete cascade,
  label text not null check (length(label) between 1 and 100),
  prefix text not null check (length(prefix) between 1 and 32),
  key_hash text not null unique check (key_hash ~ '^[0-9a-f]{64}$'),
  created_at timestamptz not null default now(),
  last_used_at timestamptz,
  expires_at timestamptz,
  revoked_at timestamptz
);
create index if not exists api_keys_user_id_idx on public.api_keys (user_id);

alter table public.request_logs
  add column if not exists source text check (source in ('chat', 'api')),
  add column if not exists api_key_id uuid;

-- A key's tokens this period (the /account page) without a scan of the ledger. Partial, so a
-- chat row (api_key_id null) adds no entry: the chat's ledger inserts pay one predicate check,
-- and only API rows pay for an index entry. Built while request_logs is locked against writes
-- for one scan of it (every existing row is a chat row, so nothing is written to the index).
create index if not exists request_logs_api_key_period_idx
  on public.request_logs (api_key_id, period_start)
  where api_key_id is not null;

alter table public.api_keys enable row level security;
-- Supabase's default privileges grant anon and authenticated ALL on a new table; take it back,
-- then give signed-in users only the columns that are not the hash.
revoke all on public.api_keys from public, anon, authenticated;
grant select (id, user_id, label, prefix, created_at, last_used_at, expires_at, revoked_at)
  on public.api_keys to authenticated;
grant all on public.api_keys to service_role;

drop policy if exists "api_keys: users read their own" on public.api_keys;
create policy "api_keys: users read their own" on public.api_keys
  for select to authenticated using ((select auth.uid()) = user_id);
