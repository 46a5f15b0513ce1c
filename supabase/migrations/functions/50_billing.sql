-- What a Stripe event does: link a customer, move a tier, add or refund a top-up grant.
-- version: 2
--
-- A function file (supabase/migrations/functions/20_metering.sql says what that means); the
-- tables are in 20261206000000_billing.sql, and vtai/billing/webhook.py is the only caller
-- besides the grace sweep (vtai/billing/grace.py).
--
-- Rules (docs/billing.md explains them for operators):
-- * Each event is stored once in billing_events and applied in the same transaction. An event
--   already stored changes nothing: the function answers applied = false. `outcome` says in
--   words what the event did.
-- * Out-of-order events never move a user backwards. A subscription event is applied only when
--   Stripe made it no earlier than the newest event applied (its `created`, not when it
--   arrived); at the same second, when its status is no less advanced (incomplete < live <
--   canceled) and then its current_period_end no older. Not the period end first: a move from
--   a yearly to a monthly Price really moves it earlier. A deletion always applies, and a
--   canceled subscription never comes back. Invoice events never touch event_created (a late
--   invoice.paid must not hide an earlier upgrade that arrives after it).
-- * Only subscriptions to a Price VTAI_STRIPE_PRICES maps to a tier are VT.ai's: another
--   product's subscription on the same Stripe account is stored nowhere and never moves a
--   tier. A subscription keeps the tier it had while its Price stays the same, so dropping a
--   grandfathered Price from VTAI_STRIPE_PRICES doesn't downgrade its subscribers.
-- * A user's tier is derived, not set: a user with at least one subscription row gets the best
--   tier (largest token_limit, null = unlimited best) among subscriptions that are active,
--   trialing, past_due or unpaid, minus those whose payment first failed more than the grace
--   period ago; none left: 'free'. Users without subscription rows are never touched (admins
--   set their tier). A change is written to audit_log and NOTIFYs running apps through the
--   profiles trigger of functions/30_plan_changes.sql.
-- * A refund takes the user's current period counter row lock (vtai_reserve's) before it
--   touches token_grants, because vtai_reserve counts grants while holding that lock.
-- * Lock order: billing_events row -> billing_subscriptions row -> profiles row; a refund
--   takes usage_counters -> token_grants. Neither takes a lock the other takes first.

-- Signatures this file replaced.
drop function if exists public.vtai_billing_checkout(text, text, timestamptz, uuid, text, jsonb,
                                                     bigint, text, timestamptz);

-- Stores the event; false when it was already stored (a replay or a concurrent duplicate,
-- which waits here for the first delivery's transaction and then finds it).
create or replace function public.vtai_billing_store_event(
  p_event_id text, p_type text, p_created timestamptz, p_payload jsonb
)
returns boolean
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
  insert into billing_events as e (event_id, type, created, outcome, payload)
  values (p_event_id, p_type, p_created, 'received', p_payload)
  on conflict (event_id) do nothing;
  return found;
end
$$;

create or replace function public.vtai_billing_outcome(
  p_event_id text, p_user uuid, p_outcome text
)
returns void
language sql
security definer
set search_path = public, pg_temp
as $$
  update billing_events e set user_id = p_user, outcome = p_outcome
  where e.event_id = p_event_id
$$;

-- The tier a user's subscriptions give, and the change to it. p_actor names who changed it in
-- audit_log ('stripe:<event id>', or the sweep).
create or replace function public.vtai_billing_retier(
  p_user uuid, p_now timestamptz, p_grace_days integer, p_actor text
)
returns table (changed boolean, old_tier text, new_tier text)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_old text;
  v_name text;
  v_new text;
begin
  if not exists (
    select 1 from billing_subscriptions s where s.user_id = p_user and s.tier is not null
  ) then
    return query select false, null::text, null::text;
    return;
  end if;
  select p.tier, p.username into v_old, v_name from profiles p where p.id = p_user for update;
  if not found then
    return query select false, null::text, null::text;
    return;
  end if;
  select s.tier into v_new
  from billing_subscriptions s join tiers t on t.name = s.tier
  where s.user_id = p_user
    and s.status in ('active', 'trialing', 'past_due', 'unpaid')
    and (s.payment_failed_at is null
         or s.payment_failed_at + make_interval(days => p_grace_days) > p_now)
  order by t.token_limit desc nulls first, t.rank desc, t.name
  limit 1;
  v_new := coalesce(v_new, 'free');
  if v_new = v_old then
    return query select false, v_old, v_new;
    return;
  end if;
  update profiles p set tier = v_new where p.id = p_user;
  insert into audit_log (actor, action, target, before, after)
  values (left(p_actor, 200), 'user.tier', v_name,
          jsonb_build_object('tier', v_old), jsonb_build_object('tier', v_new));
  return query select true, v_old, v_new;
end
$$;

-- The words for a recompute's result, appended to an outcome.
create or replace function public.vtai_billing_tier_words(
  p_changed boolean, p_old text, p_new text
)
returns text
language sql immutable
set search_path = pg_catalog
as $$
  select case when p_changed then format('tier %s -> %s', p_old, p_new)
              when p_new is null then 'tier not managed by billing'
              else format('tier stays %s', p_new) end
$$;

-- checkout.session.completed: the customer is the user's; a top-up (p_grant_tokens, paid by
-- PaymentIntent p_grant_ref) adds a grant until p_grant_expires, by default the end of the
-- user's period (p_period: VTAI_USAGE_PERIOD) and never sooner than 30 days. A refund or
-- dispute Stripe sent before this event (a retried delivery) is taken off the grant.
create or replace function public.vtai_billing_checkout(
  p_event_id text,
  p_type text,
  p_created timestamptz,
  p_user uuid,
  p_customer text,
  p_payload jsonb,
  p_grant_tokens bigint default null,
  p_grant_ref text default null,
  p_grant_expires timestamptz default null,
  p_period text default 'month'
)
returns table (applied boolean, user_id uuid, old_tier text, new_tier text, outcome text)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_user uuid := p_user;
  v_words text[] := '{}';
  v_expires timestamptz;
  v_tier text;
  v_tokens bigint := p_grant_tokens;
  v_paid bigint;
  v_refunded bigint;
begin
  if not vtai_billing_store_event(p_event_id, p_type, p_created, p_payload) then
    return query select false, null::uuid, null::text, null::text, 'duplicate';
    return;
  end if;
  if v_user is null and p_customer is not null then
    select c.user_id into v_user from billing_customers c where c.customer_id = p_customer;
  end if;
  select p.id, p.tier into v_user, v_tier from profiles p where p.id = v_user;
  if v_user is null then
    perform vtai_billing_outcome(p_event_id, null, 'ignored: no VT.ai user for this checkout');
    return query select true, null::uuid, null::text, null::text,
      'ignored: no VT.ai user for this checkout';
    return;
  end if;

  if p_customer is not null then
    insert into billing_customers as c (user_id, customer_id)
    values (v_user, p_customer)
    on conflict do nothing;
    if exists (select 1 from billing_customers c
               where c.user_id = v_user and c.customer_id = p_customer) then
      v_words := v_words || format('customer %s', p_customer);
    else
      v_words := v_words || format('customer %s not linked: another link exists', p_customer);
    end if;
  end if;

  if coalesce(p_grant_tokens, 0) > 0 then
    if p_grant_ref is null then
      raise exception 'a top-up grant needs its PaymentIntent (p_grant_ref)'
        using errcode = '22023';
    end if;
    v_expires := coalesce(p_grant_expires, greatest(
      (select up.period_end from vtai_user_period(v_user, p_period, p_created) up),
      p_created + interval '30 days'));
    -- Refunds and disputes that came first (their events found no grant then).
    select max((e.payload #>> '{data,object,amount}')::bigint),
           max(case when e.type = 'charge.dispute.created'
                    then (e.payload #>> '{data,object,amount}')::bigint
                    else (e.payload #>> '{data,object,amount_refunded}')::bigint end)
    into v_paid, v_refunded
    from billing_events e
    where e.type in ('charge.refunded', 'charge.dispute.created')
      and e.payload #>> '{data,object,payment_intent}' = p_grant_ref;
    if coalesce(v_refunded, 0) > 0 and coalesce(v_paid, 0) > 0 then
      v_tokens := greatest(p_grant_tokens - ceil(
        p_grant_tokens::numeric * least(v_refunded, v_paid) / v_paid)::bigint, 0);
      -- Counted as applied, so a later refund of the same charge takes only its own part.
      update billing_events e
      set user_id = v_user,
          outcome = format('refund %s of %s: taken off the grant when it was made',
                           e.payload #>> '{data,object,amount_refunded}',
                           e.payload #>> '{data,object,amount}')
      where e.type = 'charge.refunded'
        and e.payload #>> '{data,object,payment_intent}' = p_grant_ref;
    end if;
    insert into token_grants as g (end_user, tokens, expires_at, source, ref)
    values (v_user, v_tokens, v_expires, 'stripe', p_grant_ref)
    on conflict (ref) do nothing;
    if found then
      v_words := v_words || format('grant %s tokens until %s', v_tokens,
                                   to_char(v_expires at time zone 'UTC',
                                           'YYYY-MM-DD"T"HH24:MI:SS"Z"'));
    else
      v_words := v_words || format('grant for %s already made', p_grant_ref);
    end if;
  end if;

  perform vtai_billing_outcome(p_event_id, v_user, array_to_string(v_words, '; '));
  return query select true, v_user, v_tier, v_tier, array_to_string(v_words, '; ');
end
$$;

-- How far along a subscription's status is, for events Stripe made in the same second.
create or replace function public.vtai_billing_status_rank(p_status text)
returns integer
language sql immutable
set search_path = pg_catalog
as $$
  select case when p_status in ('incomplete', 'incomplete_expired') then 0
              when p_status = 'canceled' then 2
              else 1 end
$$;

-- customer.subscription.created / .updated / .deleted (deleted: p_status 'canceled').
-- p_user: from the subscription's metadata, or null to find it by the customer. p_tier: the
-- tier VTAI_STRIPE_PRICES maps p_price to, null when unmapped.
create or replace function public.vtai_billing_subscription(
  p_event_id text,
  p_type text,
  p_created timestamptz,
  p_user uuid,
  p_customer text,
  p_subscription text,
  p_status text,
  p_price text,
  p_tier text,
  p_period_start timestamptz,
  p_period_end timestamptz,
  p_cancel_at_period_end boolean,
  p_grace_days integer,
  p_payload jsonb
)
returns table (applied boolean, user_id uuid, old_tier text, new_tier text, outcome text)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_user uuid := p_user;
  v_tier text := p_tier;
  v_row billing_subscriptions%rowtype;
  v_failed timestamptz;
  v_words text := '';
  v_changed boolean;
  v_old text;
  v_new text;
  v_outcome text;
begin
  if not vtai_billing_store_event(p_event_id, p_type, p_created, p_payload) then
    return query select false, null::uuid, null::text, null::text, 'duplicate';
    return;
  end if;
  if p_subscription is null or p_status is null then
    raise exception 'a subscription event needs its subscription id and status'
      using errcode = '22023';
  end if;

  select * into v_row from billing_subscriptions s
  where s.subscription_id = p_subscription
  for update;
  if found then
    -- The subscription's owner does not change with a later event's metadata.
    v_user := v_row.user_id;
  elsif v_user is null and p_customer is not null then
    select c.user_id into v_user from billing_customers c where c.customer_id = p_customer;
  end if;
  if v_user is null or not exists (select 1 from profiles p where p.id = v_user) then
    v_outcome := format('ignored: no VT.ai user for customer %s', coalesce(p_customer, '?'));
    perform vtai_billing_outcome(p_event_id, null, v_outcome);
    return query select true, null::uuid, null::text, null::text, v_outcome;
    return;
  end if;

  if v_row.subscription_id is not null and (
       v_row.status = 'canceled'
       or (p_status <> 'canceled' and (
             p_created < v_row.event_created
             or (p_created = v_row.event_created and (
                   vtai_billing_status_rank(p_status) < vtai_billing_status_rank(v_row.status)
                   or (vtai_billing_status_rank(p_status) = vtai_billing_status_rank(v_row.status)
                       and coalesce(p_period_end, '-infinity')
                             < coalesce(v_row.current_period_end, '-infinity'))))))) then
    v_outcome := case when v_row.status = 'canceled'
                      then 'ignored: the subscription is canceled'
                      else 'ignored: older than the state applied' end;
    perform vtai_billing_outcome(p_event_id, v_user, v_outcome);
    return query select true, v_user, null::text, null::text, v_outcome;
    return;
  end if;

  if p_customer is not null then
    insert into billing_customers as c (user_id, customer_id)
    values (v_user, p_customer)
    on conflict do nothing;
  end if;
  if v_tier is not null and not exists (select 1 from tiers t where t.name = v_tier) then
    v_words := format('; unknown tier %s for %s', v_tier, coalesce(p_price, '?'));
    v_tier := null;
  end if;
  if v_tier is null and v_row.subscription_id is not null and p_price = v_row.price_id then
    v_tier := v_row.tier;  -- a grandfathered Price keeps its tier
  end if;
  if v_tier is null and v_row.subscription_id is null then
    v_outcome := format('ignored: %s is not a tier''s Price (VTAI_STRIPE_PRICES)',
                        coalesce(p_price, 'the Price'));
    perform vtai_billing_outcome(p_event_id, v_user, v_outcome || v_words);
    return query select true, v_user, null::text, null::text, v_outcome || v_words;
    return;
  end if;

  -- The grace period counts from the first sign of a failed payment; a return to active or
  -- trialing means it was paid.
  v_failed := case
    when p_status in ('past_due', 'unpaid') then coalesce(v_row.payment_failed_at, p_created)
    when p_status in ('active', 'trialing') then null
    else v_row.payment_failed_at end;

  insert into billing_subscriptions as s (
    subscription_id, user_id, customer_id, price_id, tier, status, current_period_start,
    current_period_end, cancel_at_period_end, payment_failed_at, event_created, updated_at)
  values (p_subscription, v_user, coalesce(p_customer, v_row.customer_id, ''), p_price, v_tier,
          p_status, p_period_start, p_period_end, coalesce(p_cancel_at_period_end, false),
          v_failed, p_created, now())
  on conflict (subscription_id) do update set
    customer_id = excluded.customer_id, price_id = excluded.price_id, tier = excluded.tier,
    status = excluded.status, current_period_start = excluded.current_period_start,
    current_period_end = excluded.current_period_end,
    cancel_at_period_end = excluded.cancel_at_period_end,
    payment_failed_at = excluded.payment_failed_at, event_created = excluded.event_created,
    updated_at = excluded.updated_at;

  select r.changed, r.old_tier, r.new_tier into v_changed, v_old, v_new
  from vtai_billing_retier(v_user, now(), p_grace_days, 'stripe:' || p_event_id) r;
  v_outcome := format('%s %s', p_subscription, p_status)
    || case when p_cancel_at_period_end then ' (cancels at period end)' else '' end
    || '; ' || vtai_billing_tier_words(v_changed, v_old, v_new) || v_words;
  perform vtai_billing_outcome(p_event_id, v_user, v_outcome);
  return query select true, v_user, v_old, v_new, v_outcome;
end
$$;

-- invoice.payment_failed: the grace period starts (at the first failure of a run); invoice.paid
-- ends it. Then the tier is recomputed.
create or replace function public.vtai_billing_invoice(
  p_event_id text,
  p_type text,
  p_created timestamptz,
  p_customer text,
  p_subscription text,
  p_grace_days integer,
  p_payload jsonb
)
returns table (applied boolean, user_id uuid, old_tier text, new_tier text, outcome text)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_row billing_subscriptions%rowtype;
  v_failed timestamptz;
  v_changed boolean;
  v_old text;
  v_new text;
  v_outcome text;
begin
  if not vtai_billing_store_event(p_event_id, p_type, p_created, p_payload) then
    return query select false, null::uuid, null::text, null::text, 'duplicate';
    return;
  end if;
  if p_type not in ('invoice.paid', 'invoice.payment_failed') then
    raise exception 'not an invoice event VT.ai applies: %', p_type using errcode = '22023';
  end if;
  select * into v_row from billing_subscriptions s
  where s.subscription_id = p_subscription
  for update;
  if not found then
    v_outcome := format('ignored: no subscription %s', coalesce(p_subscription, '(none)'));
    perform vtai_billing_outcome(p_event_id, null, v_outcome);
    return query select true, null::uuid, null::text, null::text, v_outcome;
    return;
  end if;

  v_failed := v_row.payment_failed_at;
  if p_type = 'invoice.paid' then
    -- A failure after this payment is a newer run of failures: it stays.
    if v_failed is not null and v_failed <= p_created then
      v_failed := null;
    end if;
  elsif v_failed is null then
    -- A failure older than a payment already applied for this user is stale.
    if v_row.status in ('past_due', 'unpaid') or not exists (
      select 1 from billing_events e
      where e.user_id = v_row.user_id and e.type = 'invoice.paid' and e.created >= p_created
        and e.event_id <> p_event_id and e.outcome not like 'ignored%'
    ) then
      v_failed := p_created;
    end if;
  end if;

  if v_failed is not distinct from v_row.payment_failed_at then
    v_outcome := case when p_type = 'invoice.paid' then 'nothing to clear'
                      else 'ignored: older than the state applied' end;
    if p_type = 'invoice.payment_failed' and v_failed is not null then
      v_outcome := format('payment failing since %s', v_failed);
    end if;
  else
    update billing_subscriptions s set payment_failed_at = v_failed, updated_at = now()
    where s.subscription_id = p_subscription;
    v_outcome := case when v_failed is null then 'payment recovered'
                      else format('payment failing since %s', v_failed) end;
  end if;
  select r.changed, r.old_tier, r.new_tier into v_changed, v_old, v_new
  from vtai_billing_retier(v_row.user_id, now(), p_grace_days, 'stripe:' || p_event_id) r;
  v_outcome := format('%s %s; %s', p_subscription, v_outcome,
                      vtai_billing_tier_words(v_changed, v_old, v_new));
  perform vtai_billing_outcome(p_event_id, v_row.user_id, v_outcome);
  return query select true, v_row.user_id, v_old, v_new, v_outcome;
end
$$;

-- charge.refunded: the grant PaymentIntent p_ref paid for loses the refunded share of what is
-- left of it, and all of it once the refund is whole, never below what was used. Refunds add
-- up (amount_refunded is the charge's running total): only the part not applied before counts,
-- read from the charge.refunded events already applied for p_ref.
-- p_period: the gate's period (VTAI_USAGE_PERIOD); vtai_user_period() (functions/
-- 20_metering.sql) says which counter row vtai_reserve locks for the user.
create or replace function public.vtai_billing_refund(
  p_event_id text,
  p_type text,
  p_created timestamptz,
  p_ref text,
  p_amount bigint,
  p_amount_refunded bigint,
  p_payload jsonb,
  p_period text default 'month'
)
returns table (applied boolean, user_id uuid, old_tier text, new_tier text, outcome text)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_user uuid;
  v_start timestamptz;
  v_grant token_grants%rowtype;
  v_before bigint;
  v_tokens bigint;
  v_outcome text;
begin
  if p_period is distinct from 'billing' and vtai_period_start(p_period, now()) is null then
    raise exception 'unknown usage period %', p_period using errcode = '22023';
  end if;
  if not vtai_billing_store_event(p_event_id, p_type, p_created, p_payload) then
    return query select false, null::uuid, null::text, null::text, 'duplicate';
    return;
  end if;
  select g.end_user into v_user from token_grants g where g.ref = p_ref;
  if v_user is null then
    v_outcome := format('ignored: no grant paid by %s', coalesce(p_ref, '(none)'));
    perform vtai_billing_outcome(p_event_id, null, v_outcome);
    return query select true, null::uuid, null::text, null::text, v_outcome;
    return;
  end if;
  -- The period row vtai_reserve locks for this user now (per user with VTAI_USAGE_PERIOD=billing).
  select up.period_start into v_start from vtai_user_period(v_user, p_period, now()) up;

  -- vtai_reserve's lock first, as it takes it, so no reserve counts the grant mid-change.
  perform 1 from usage_counters c
  where c.end_user = v_user and c.period_start = v_start
  for update;
  if not found then
    insert into usage_counters as c (end_user, period_start)
    values (v_user, v_start)
    on conflict (end_user, period_start) do nothing;
    perform 1 from usage_counters c
    where c.end_user = v_user and c.period_start = v_start
    for update;
  end if;
  select * into v_grant from token_grants g where g.ref = p_ref for update;

  select coalesce(max((e.payload #>> '{data,object,amount_refunded}')::bigint), 0)
  into v_before
  from billing_events e
  where e.user_id = v_user and e.type = 'charge.refunded' and e.event_id <> p_event_id
    and e.outcome like 'refund%'
    and e.payload #>> '{data,object,payment_intent}' = p_ref;

  if p_amount is null or p_amount <= 0 or p_amount_refunded is null
     or p_amount_refunded <= v_before then
    v_outcome := 'ignored: older than the state applied';
  else
    v_tokens := case
      when p_amount_refunded >= p_amount then v_grant.used
      else greatest(v_grant.used, v_grant.tokens - ceil(
        v_grant.tokens::numeric * (p_amount_refunded - v_before) / (p_amount - v_before)
      )::bigint) end;
    update token_grants g set tokens = v_tokens where g.id = v_grant.id;
    v_outcome := format('refund %s of %s: grant %s -> %s tokens (%s used)',
                        p_amount_refunded, p_amount, v_grant.tokens, v_tokens, v_grant.used);
    -- Chats holding a reservation taken ahead under the larger grant give it back.
    perform pg_notify('vtai_plans', 'token_grants');
  end if;
  perform vtai_billing_outcome(p_event_id, v_user, v_outcome);
  return query select true, v_user, null::text, null::text, v_outcome;
end
$$;

-- customer.deleted: the link goes, so the user's next Checkout makes a new customer rather
-- than naming one Stripe no longer has.
create or replace function public.vtai_billing_customer_deleted(
  p_event_id text, p_type text, p_created timestamptz, p_customer text, p_payload jsonb
)
returns table (applied boolean, user_id uuid, old_tier text, new_tier text, outcome text)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_user uuid;
  v_outcome text;
begin
  if not vtai_billing_store_event(p_event_id, p_type, p_created, p_payload) then
    return query select false, null::uuid, null::text, null::text, 'duplicate';
    return;
  end if;
  delete from billing_customers c where c.customer_id = p_customer returning c.user_id
  into v_user;
  v_outcome := case when v_user is null then format('ignored: no link to %s', p_customer)
                    else format('customer %s unlinked', p_customer) end;
  perform vtai_billing_outcome(p_event_id, v_user, v_outcome);
  return query select true, v_user, null::text, null::text, v_outcome;
end
$$;

-- Any other event: kept, doing nothing.
create or replace function public.vtai_billing_record(
  p_event_id text, p_type text, p_created timestamptz, p_payload jsonb
)
returns table (applied boolean, user_id uuid, old_tier text, new_tier text, outcome text)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
  if not vtai_billing_store_event(p_event_id, p_type, p_created, p_payload) then
    return query select false, null::uuid, null::text, null::text, 'duplicate';
    return;
  end if;
  perform vtai_billing_outcome(p_event_id, null, 'ignored');
  return query select true, null::uuid, null::text, null::text, 'ignored';
end
$$;

-- Users whose grace period ran out by p_now move to what their subscriptions still give
-- (usually free); the users moved. Only users with a failing subscription and a tier other
-- than free are looked at, so a user stuck unpaid costs nothing after the first move.
create or replace function public.vtai_billing_sweep(p_now timestamptz, p_grace_days integer)
returns table (user_id uuid, old_tier text, new_tier text)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
  v_user uuid;
  v_changed boolean;
  v_old text;
  v_new text;
begin
  for v_user in
    select distinct s.user_id
    from billing_subscriptions s join profiles p on p.id = s.user_id
    where s.payment_failed_at is not null and s.tier is not null
      and s.payment_failed_at + make_interval(days => p_grace_days) <= p_now
      and p.tier <> 'free'
    order by s.user_id
  loop
    select r.changed, r.old_tier, r.new_tier into v_changed, v_old, v_new
    from vtai_billing_retier(v_user, p_now, p_grace_days, 'stripe:grace-period-ended') r;
    if v_changed then
      return query select v_user, v_old, v_new;
    end if;
  end loop;
end
$$;

-- Only the server runs these: never anon, nor signed-in users (who could buy themselves a
-- tier by calling them).
revoke all on function
  public.vtai_billing_store_event(text, text, timestamptz, jsonb),
  public.vtai_billing_outcome(text, uuid, text),
  public.vtai_billing_retier(uuid, timestamptz, integer, text),
  public.vtai_billing_tier_words(boolean, text, text),
  public.vtai_billing_status_rank(text),
  public.vtai_billing_customer_deleted(text, text, timestamptz, text, jsonb),
  public.vtai_billing_checkout(text, text, timestamptz, uuid, text, jsonb, bigint, text,
                               timestamptz, text),
  public.vtai_billing_subscription(text, text, timestamptz, uuid, text, text, text, text, text,
                                   timestamptz, timestamptz, boolean, integer, jsonb),
  public.vtai_billing_invoice(text, text, timestamptz, text, text, integer, jsonb),
  public.vtai_billing_refund(text, text, timestamptz, text, bigint, bigint, jsonb, text),
  public.vtai_billing_record(text, text, timestamptz, jsonb),
  public.vtai_billing_sweep(timestamptz, integer)
  from public, anon, authenticated;
grant execute on function
  public.vtai_billing_store_event(text, text, timestamptz, jsonb),
  public.vtai_billing_outcome(text, uuid, text),
  public.vtai_billing_retier(uuid, timestamptz, integer, text),
  public.vtai_billing_tier_words(boolean, text, text),
  public.vtai_billing_status_rank(text),
  public.vtai_billing_customer_deleted(text, text, timestamptz, text, jsonb),
  public.vtai_billing_checkout(text, text, timestamptz, uuid, text, jsonb, bigint, text,
                               timestamptz, text),
  public.vtai_billing_subscription(text, text, timestamptz, uuid, text, text, text, text, text,
                                   timestamptz, timestamptz, boolean, integer, jsonb),
  public.vtai_billing_invoice(text, text, timestamptz, text, text, integer, jsonb),
  public.vtai_billing_refund(text, text, timestamptz, text, bigint, bigint, jsonb, text),
  public.vtai_billing_record(text, text, timestamptz, jsonb),
  public.vtai_billing_sweep(timestamptz, integer)
  to service_role;
