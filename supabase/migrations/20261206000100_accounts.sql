-- Accounts people make and recover themselves (issue #19, item 6): an email on each profile
-- and one-time password-reset tokens.
--
-- * profiles.email: optional (users an operator makes with `vtai user add` may have none), kept
--   lower-cased and trimmed by the app, and unique whatever its case (the index is on
--   lower(email), so a value written around the app can't make a second account either).
--   Added with no default: no table rewrite.
-- * password_resets: only the sha256 of a reset token is kept (token_hash), never the token,
--   which exists only in the email. A token works once (used_at) and until expires_at; the app
--   marks it used in the same statement that checks it. Deleting the user deletes their tokens.
-- * No user reads password_resets over the API: RLS on, no policies, and every grant to anon
--   and authenticated taken back (Supabase's default privileges give them ALL on a new table).
--   Signed-in users already read their own profile row (email included) by the baseline's
--   policy; they can't write it.

alter table public.profiles
  add column if not exists email text
    check (email is null or (length(email) between 3 and 254 and email = lower(btrim(email))));
create unique index if not exists profiles_email_lower_key on public.profiles (lower(email));

create table if not exists public.password_resets (
  token_hash text primary key check (token_hash ~ '^[0-9a-f]{64}$'),
  user_id uuid not null references public.profiles (id) on delete cascade,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  used_at timestamptz
);
create index if not exists password_resets_user_idx on public.password_resets (user_id);
create index if not exists password_resets_expires_idx on public.password_resets (expires_at);

alter table public.password_resets enable row level security;
revoke all on public.password_resets from public, anon, authenticated;
grant all on public.password_resets to service_role;
