-- version: 1
-- Plan changes reach every running app process at once: a NOTIFY on channel `vtai_plans` when
-- a tier, a weight rule, the catalogue or a user's tier changes (vtai/metering/plan_watch.py).
-- A process then gives back the reservations its chats took ahead for their next turn (they
-- were granted under the old plan) and reads the catalogue again, so the next turn of every
-- chat is checked by vtai_reserve() under the plan as it is now.
--
-- A function file (supabase/migrations/functions/20_metering.sql says what that means).

create or replace function public.vtai_notify_plan_change()
returns trigger
language plpgsql
set search_path = pg_catalog
as $$
begin
  perform pg_notify('vtai_plans', tg_table_name);
  return null;
end
$$;

revoke all on function public.vtai_notify_plan_change() from public, anon, authenticated;

drop trigger if exists tiers_plan_change on public.tiers;
create trigger tiers_plan_change
  after insert or update or delete on public.tiers
  for each statement execute function public.vtai_notify_plan_change();

drop trigger if exists model_weights_plan_change on public.model_weights;
create trigger model_weights_plan_change
  after insert or update or delete on public.model_weights
  for each statement execute function public.vtai_notify_plan_change();

drop trigger if exists models_plan_change on public.models;
create trigger models_plan_change
  after insert or update or delete on public.models
  for each statement execute function public.vtai_notify_plan_change();

drop trigger if exists profiles_plan_change on public.profiles;
create trigger profiles_plan_change
  after update of tier on public.profiles
  for each statement execute function public.vtai_notify_plan_change();
