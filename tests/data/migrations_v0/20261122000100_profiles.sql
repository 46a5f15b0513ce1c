-- Tiers, user profiles, and the password store.
--
-- Supabase's default privileges grant anon and authenticated ALL on every new table and
-- function in public, so each object below revokes explicitly and relies on RLS.

create table if not exists public.tiers (
  name text primary key,
  -- null means unlimited
  token_limit bigint check (token_limit is null or token_limit >= 0),
  rank int not null default 0
);

-- The app overwrites limits from VTAI_LIMIT_* at start-up (vtai/tiers.py holds the defaults).
insert into public.tiers (name, token_limit, rank) values
  ('free', 10000, 0),
  ('basic', 100000, 1),
  ('premium', 500000, 2),
  ('unlimited', null, 3)
on conflict (name) do nothing;

create table if not exists public.profiles (
  -- On Supabase Auth logins this equals auth.users.id; local logins get a fresh uuid.
  id uuid primary key default gen_random_uuid(),
  username text not null unique
    check (length(username) between 1 and 64 and username !~ '[[:space:][:cntrl:]]'),
  tier text not null default 'free' references public.tiers (name) on update cascade,
  is_admin boolean not null default false,
  created_at timestamptz not null default now()
);

-- Password hashes live outside public so PostgREST never exposes them, with no grants to
-- any user-level role and RLS on with no policy as a second lock.
create schema if not exists vtai_private;
revoke all on schema vtai_private from public, anon, authenticated;

create table if not exists vtai_private.credentials (
  profile_id uuid primary key references public.profiles (id) on delete cascade,
  password_hash text not null,
  updated_at timestamptz not null default now()
);

alter table vtai_private.credentials enable row level security;
revoke all on vtai_private.credentials from public, anon, authenticated;

alter table public.tiers enable row level security;
alter table public.profiles enable row level security;
revoke all on public.tiers, public.profiles from public, anon, authenticated;
grant select on public.tiers, public.profiles to authenticated;
grant all on public.tiers, public.profiles to service_role;

drop policy if exists "tiers: authenticated users read" on public.tiers;
create policy "tiers: authenticated users read" on public.tiers
  for select to authenticated using (true);

drop policy if exists "profiles: users read their own" on public.profiles;
create policy "profiles: users read their own" on public.profiles
  for select to authenticated using ((select auth.uid()) = id);
