-- Logins the server can end, and a login throttle that holds under parallel guesses.
--
-- Every login is a row in vtai_private.login_sessions; its id travels in Chainlit's signed
-- cookie, and every request and socket event asks vtai_session_live() (two primary-key
-- lookups). Logout, a password change, `vtai user logout` and `vtai user disable` set
-- revoked_at, so the old cookie is refused on its next request.
--
-- vtai_login_attempt() counts each login attempt per name and per client address before the
-- password is checked, in one locked statement per key, so parallel guesses queue: an
-- attempt waits for its slot, and one whose slot is more than 10 s away is refused without a
-- check. Entries expire 15 minutes after their last slot; an expired entry starts again on
-- the next attempt for its key, and every call deletes a few other expired ones.
--
-- Both tables live in vtai_private (PostgREST never exposes it) with RLS on and no policy;
-- the functions run only for the server (service_role over REST, the owner directly).

alter table public.profiles add column if not exists disabled_at timestamptz;

create table if not exists vtai_private.login_sessions (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references public.profiles (id) on delete cascade,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  revoked_at timestamptz
);
create index if not exists login_sessions_user_live
  on vtai_private.login_sessions (user_id) where revoked_at is null;
create index if not exists login_sessions_expires on vtai_private.login_sessions (expires_at);

create table if not exists vtai_private.login_throttle (
  -- 'name:' || sha256 of the lower-cased name (typed names are not kept), or 'addr:' || the
  -- client address (IPv6: its /64).
  key text primary key,
  -- Attempts in the window whose password was checked and did not succeed (or still runs).
  attempts integer not null default 0,
  -- Attempts refused unchecked because the queue was full.
  refused integer not null default 0,
  -- When the next attempt for this key may be checked.
  next_at timestamptz not null,
  expires_at timestamptz not null
);
create index if not exists login_throttle_expires on vtai_private.login_throttle (expires_at);

alter table vtai_private.login_sessions enable row level security;
alter table vtai_private.login_throttle enable row level security;
revoke all on vtai_private.login_sessions, vtai_private.login_throttle
  from public, anon, authenticated;

-- A new login for p_user lasting p_ttl seconds; null if the profile is missing or disabled.
create or replace function public.vtai_session_start(p_user uuid, p_ttl integer)
returns uuid
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_id uuid;
begin
  -- Bounded sweep: sessions ended or expired more than a day ago.
  delete from vtai_private.login_sessions s
  where s.id in (
    select o.id from vtai_private.login_sessions o
    where o.expires_at < now() - interval '1 day'
       or o.revoked_at < now() - interval '1 day'
    limit 100
    for update skip locked
  );
  insert into vtai_private.login_sessions (user_id, expires_at)
  select p.id, now() + make_interval(secs => greatest(p_ttl, 1))
  from profiles p
  where p.id = p_user and p.disabled_at is null
  returning id into v_id;
  return v_id;
end
$$;

-- Whether a login still holds: not ended, not expired, its user there and not disabled.
create or replace function public.vtai_session_live(p_session uuid, p_user uuid)
returns boolean
language sql
stable
security definer
set search_path = public, pg_temp
as $$
  select exists (
    select 1
    from vtai_private.login_sessions s
    join profiles p on p.id = s.user_id
    where s.id = p_session
      and s.user_id = p_user
      and s.revoked_at is null
      and s.expires_at > now()
      and p.disabled_at is null
  )
$$;

-- Ends one login (logout); true if it was still live.
create or replace function public.vtai_session_end(p_session uuid)
returns boolean
language sql
security definer
set search_path = public, pg_temp
as $$
  with ended as (
    update vtai_private.login_sessions
    set revoked_at = now()
    where id = p_session and revoked_at is null
    returning 1
  )
  select exists (select 1 from ended)
$$;

-- Ends every login of a user (password change, `vtai user logout`, disable); how many.
create or replace function public.vtai_sessions_end_all(p_user uuid)
returns integer
language sql
security definer
set search_path = public, pg_temp
as $$
  with ended as (
    update vtai_private.login_sessions
    set revoked_at = now()
    where user_id = p_user and revoked_at is null
    returning 1
  )
  select count(*)::integer from ended
$$;

-- The throttle's keys for a name and an optional client address, in lock order.
create or replace function public.vtai_login_keys(p_name text, p_addr text)
returns text[]
language sql
immutable
set search_path = pg_catalog, pg_temp
as $$
  select array(
    select k from unnest(array[
      'name:' || encode(sha256(convert_to(lower(btrim(coalesce(p_name, ''))), 'UTF8')), 'hex'),
      case
        when p_addr is null or p_addr = '' then null
        when family(p_addr::inet) = 6 then 'addr:' || network(set_masklen(p_addr::inet, 64))::text
        else 'addr:' || host(p_addr::inet)
      end
    ]) k
    where k is not null
    order by k
  )
$$;

-- Call before checking a password. Returns the seconds to wait before checking it, or -1:
-- refused, check nothing (answer as for a wrong password). The attempt counts against the
-- name and the address until vtai_login_succeeded() says it was right.
--
-- Rules: a name gets 3 free attempts, an address 10 (a NAT hides many people); after that
-- each attempt pushes the key's next slot 0.5 s further, doubling up to 8 s. An attempt's
-- slot is the latest of its keys' next slots; more than 10 s away is refused. A key expires
-- 15 minutes after its last slot.
create or replace function public.vtai_login_attempt(p_name text, p_addr text default null)
returns double precision
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_window constant interval := interval '15 minutes';
  v_max_wait constant double precision := 10;
  v_now timestamptz := clock_timestamp();
  v_slot timestamptz;
  v_keys text[] := vtai_login_keys(p_name, p_addr);
  v_key text;
  v_next timestamptz;
begin
  v_slot := v_now;
  -- One key at a time, in a fixed order, so two attempts never wait on each other in a cycle.
  -- An expired entry starts again here, as if deleted and made anew.
  foreach v_key in array v_keys loop
    insert into vtai_private.login_throttle as t (key, next_at, expires_at)
    values (v_key, v_now, v_now + v_window)
    on conflict (key) do update
      set attempts = 0, refused = 0, next_at = v_now, expires_at = v_now + v_window
      where t.expires_at <= v_now
    returning t.next_at into v_next;
    if v_next is null then
      -- Live entry, not updated: lock it and read its next slot.
      select t.next_at into v_next
      from vtai_private.login_throttle t where t.key = v_key for update;
    end if;
    v_slot := greatest(v_slot, v_next);
  end loop;

  if extract(epoch from v_slot - v_now) > v_max_wait then
    update vtai_private.login_throttle set refused = refused + 1 where key = any(v_keys);
    return -1;
  end if;

  update vtai_private.login_throttle t
  set attempts = t.attempts + 1,
      next_at = v_slot + sp.spacing,
      expires_at = v_slot + sp.spacing + v_window
  from (
    select a.key,
      case when a.attempts + 1 < f.free then interval '0'
           else make_interval(secs => 0.5 * 2 ^ least(a.attempts + 1 - f.free, 4))
      end as spacing
    from vtai_private.login_throttle a
    cross join lateral (
      select case when a.key like 'name:%' then 3 else 10 end as free
    ) f
    where a.key = any(v_keys)
  ) sp
  where t.key = sp.key;

  -- Bounded sweep of other keys' expired entries; skips any another attempt holds.
  delete from vtai_private.login_throttle d
  where d.key in (
    select o.key from vtai_private.login_throttle o
    where o.expires_at <= v_now and o.key <> all(v_keys)
    order by o.expires_at
    limit 20
    for update skip locked
  );

  return greatest(extract(epoch from v_slot - v_now), 0)::double precision;
end
$$;

-- Call after the password was right: the name starts again, and the address gets back the
-- attempt vtai_login_attempt() counted (so it counts only failures).
create or replace function public.vtai_login_succeeded(p_name text, p_addr text default null)
returns void
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_keys text[] := vtai_login_keys(p_name, p_addr);
begin
  delete from vtai_private.login_throttle where key = any(v_keys) and key like 'name:%';
  update vtai_private.login_throttle
  set attempts = greatest(attempts - 1, 0)
  where key = any(v_keys) and key like 'addr:%';
end
$$;

revoke all on function public.vtai_session_start(uuid, integer),
  public.vtai_session_live(uuid, uuid),
  public.vtai_session_end(uuid),
  public.vtai_sessions_end_all(uuid),
  public.vtai_login_keys(text, text),
  public.vtai_login_attempt(text, text),
  public.vtai_login_succeeded(text, text)
  from public, anon, authenticated;
grant execute on function public.vtai_session_start(uuid, integer),
  public.vtai_session_live(uuid, uuid),
  public.vtai_session_end(uuid),
  public.vtai_sessions_end_all(uuid),
  public.vtai_login_attempt(text, text),
  public.vtai_login_succeeded(text, text)
  to service_role;
