-- Supabase compatibility for plain Postgres (embedded, CI, self-hosted).
--
-- A Supabase project already has the anon / authenticated / service_role roles, the auth
-- schema, auth.uid(), auth.role(), auth.jwt() and auth.users. On Supabase the migration role
-- (postgres) is not a superuser and owns nothing in auth, so this file creates only what is
-- missing and never replaces what Supabase ships. The result: the same RLS policies are
-- enforced, and tested, on every database VT.ai runs on.

do $$
declare
  r text;
begin
  foreach r in array array['anon', 'authenticated', 'service_role'] loop
    if not exists (select 1 from pg_roles where rolname = r) then
      execute format('create role %I nologin noinherit', r);
      -- Lets the migrating role switch into it (SET ROLE), as Supabase's postgres can.
      execute format('grant %I to current_user', r);
    end if;
  end loop;
end
$$;

-- The server acts as service_role when it goes through the REST API; as on Supabase, that
-- role bypasses RLS. Only a superuser may grant BYPASSRLS, so elsewhere this is skipped.
do $$
begin
  if (select rolsuper from pg_roles where rolname = current_user)
     and not (select rolbypassrls from pg_roles where rolname = 'service_role') then
    alter role service_role bypassrls;
  end if;
end
$$;

do $$
begin
  if not exists (select 1 from pg_namespace where nspname = 'auth') then
    create schema auth;
    grant usage on schema auth to anon, authenticated, service_role;
  end if;
end
$$;

-- Same bodies as Supabase's: claims come from the request.jwt.claims setting that PostgREST
-- sets per request (and that tests set with set_config).
do $$
begin
  if to_regprocedure('auth.uid()') is null then
    create function auth.uid() returns uuid
    language sql stable
    as $f$
      select coalesce(
        nullif(current_setting('request.jwt.claim.sub', true), ''),
        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
      )::uuid
    $f$;
  end if;
  if to_regprocedure('auth.role()') is null then
    create function auth.role() returns text
    language sql stable
    as $f$
      select coalesce(
        nullif(current_setting('request.jwt.claim.role', true), ''),
        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
      )::text
    $f$;
  end if;
  if to_regprocedure('auth.jwt()') is null then
    create function auth.jwt() returns jsonb
    language sql stable
    as $f$
      select coalesce(
        nullif(current_setting('request.jwt.claim', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')
      )::jsonb
    $f$;
  end if;
  if to_regclass('auth.users') is null then
    create table auth.users (
      id uuid primary key default gen_random_uuid(),
      email text unique,
      created_at timestamptz not null default now()
    );
    revoke all on auth.users from anon, authenticated;
  end if;
end
$$;
