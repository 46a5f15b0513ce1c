-- Give back a reservation no turn will use: a chat's reservation for its next turn
-- (vtai/next_turn.py) when the chat closes or the message that came is bigger than it.
-- Idempotent: a reservation already settled, expired or released is simply not there.
-- Lock order is the ledger's (reservation, then counter), so it queues behind a settle and
-- never deadlocks with one; vtai_reserve() skips locked reservations.

create or replace function public.vtai_release(p_reservation uuid, p_user uuid)
returns boolean
language sql
security definer
set search_path = public, pg_temp
as $$
  with released as (
    delete from reservations r
    where r.id = p_reservation and r.end_user = p_user
    returning r.end_user, r.period_start, r.amount
  ), moved as (
    -- Data-modifying CTEs run to completion whether or not they are read.
    update usage_counters c
    set reserved = greatest(c.reserved - rel.amount, 0), updated_at = now()
    from released rel
    where c.end_user = rel.end_user and c.period_start = rel.period_start
  )
  select exists (select 1 from released)
$$;

revoke all on function public.vtai_release(uuid, uuid) from public, anon, authenticated;
grant execute on function public.vtai_release(uuid, uuid) to service_role;
