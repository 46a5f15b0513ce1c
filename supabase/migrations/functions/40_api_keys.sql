-- Who owns an API key: the lookup the /v1 endpoint makes on every request (vtai/api/keys.py).
-- version: 1
--
-- A function file (supabase/migrations/functions/20_metering.sql says what that means); the
-- table is in 20261205000100_api_keys.sql.
--
-- vtai_api_key_owner(sha256 hex of the key) answers one row (key_id, user_id, label) for a key
-- that is not revoked, not expired, and whose profile exists and is not disabled; no row
-- otherwise. Each of those is read at the call, so a key revoked, expired, or whose user was
-- disabled or deleted stops working on the very next request.
--
-- It records when the key was last used, at most once a minute per key: a request within the
-- minute writes nothing, and one that finds the row locked (another request is writing it, or
-- the key is being revoked) skips the write instead of waiting for it.
--
-- One primary-key-sized lookup: key_hash is unique, so it has its own index.

create or replace function public.vtai_api_key_owner(p_hash text)
returns table (key_id uuid, user_id uuid, label text)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_key uuid;
  v_user uuid;
  v_label text;
  v_used timestamptz;
begin
  select k.id, k.user_id, k.label, k.last_used_at
    into v_key, v_user, v_label, v_used
  from public.api_keys k
  join public.profiles p on p.id = k.user_id
  where k.key_hash = p_hash
    and k.revoked_at is null
    and (k.expires_at is null or k.expires_at > now())
    and p.disabled_at is null;
  if v_key is null then
    return;
  end if;
  if v_used is null or v_used < now() - interval '1 minute' then
    update public.api_keys k set last_used_at = now()
    where k.id = (
      select l.id from public.api_keys l
      where l.id = v_key
        and (l.last_used_at is null or l.last_used_at < now() - interval '1 minute')
      for update skip locked
    );
  end if;
  key_id := v_key;
  user_id := v_user;
  label := v_label;
  return next;
end
$$;

revoke all on function public.vtai_api_key_owner(text) from public, anon, authenticated;
grant execute on function public.vtai_api_key_owner(text) to service_role;
