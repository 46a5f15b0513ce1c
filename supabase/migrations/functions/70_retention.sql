-- Retention and user data requests: the content purge, a user's deletion, the audit trail's
-- anonymisation and the audited logout.
-- version: 2
--
-- A function file (functions/20_metering.sql says what that means); the index and the audit
-- trigger's exception are in 20261207000200_retention.sql. vtai/retention/ is the only caller
-- (docs/operations.md, "Retention and data requests").
--
-- Rules:
-- * The purge removes text, never accounting: request_logs keeps every token, cost, status,
--   time, model, user and period column; only messages, response and the error's message go.
--   None of those columns is watched by the aggregates trigger, so a purge moves no bucket.
--   Each call is one short transaction over a bounded range (ids for the ledger, a keyset on
--   createdAt for chat steps), so a purge never holds a lock for long.
-- * A deleted user's ledger rows move to one shared tombstone id (vtai_deleted_user_id()), with
--   their content, chat id, key id and legacy name cleared; their period and day counters are
--   added to the tombstone's. Counters then still equal the ledger (vtai_verify_counters) and
--   the aggregates follow the rows through the ledger's update trigger. The tombstone is no
--   profile: nobody can log in as it, reserve for it or be told apart inside it.
-- * vtai_user_delete locks the user's reservations, then period counters, then day counters,
--   each in key order, and only then moves their ledger rows (which locks their aggregate
--   buckets): a settle takes its buckets last, so the other order deadlocked with one. A
--   settle that inserted its row before the delete and waits for the counters' locks settles
--   afterwards under the user's id, onto a fresh counter (counters and ledger stay equal), with
--   its content, as does a row replayed later from a spool (docs/operations.md says so).

-- The one id every deleted user's ledger rows are kept under (never a real profile's: those
-- are random version-4 uuids).
create or replace function public.vtai_deleted_user_id()
returns uuid
language sql immutable
as $$ select '00000000-0000-0000-0000-00000000dead'::uuid $$;

-- Purges the text of ledger rows with id in [p_from, p_to) created before p_before; how many.
create or replace function public.vtai_retention_purge_ledger(
  p_before timestamptz, p_from bigint, p_to bigint
)
returns integer
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_rows integer;
begin
  update request_logs r
  set messages = null,
      response = null,
      error = case when r.error ? 'message' then r.error - 'message' else r.error end
  where r.id >= p_from and r.id < p_to
    and r.created_at < p_before
    and (r.messages is not null or r.response is not null or r.error ? 'message');
  get diagnostics v_rows = row_count;
  return v_rows;
end
$$;

-- Purges the text of up to p_limit chat steps created before p_before, after the keyset
-- (p_after_created, p_after_id), with their ratings' comments. Returns the batch's last key
-- (null when none was left), how many steps it looked at and how many it emptied.
create or replace function public.vtai_retention_purge_steps(
  p_before timestamptz, p_after_created timestamptz, p_after_id text, p_limit integer
)
returns table (last_created timestamptz, last_id text, scanned integer, purged integer)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_ids text[];
  v_last_created timestamptz;
  v_last_id text;
  v_scanned integer;
  v_purged integer;
begin
  select array_agg(b.id), count(*), max(b."createdAt")
    into v_ids, v_scanned, v_last_created
  from (
    select s.id, s."createdAt" from "Step" s
    where s."createdAt" < p_before
      and (p_after_created is null or (s."createdAt", s.id) > (p_after_created, p_after_id))
    order by s."createdAt", s.id
    limit p_limit
  ) b;
  if v_scanned = 0 then
    return query select null::timestamptz, null::text, 0, 0;
    return;
  end if;
  select s.id into v_last_id from "Step" s
  where s.id = any (v_ids) and s."createdAt" = v_last_created
  order by s.id desc limit 1;
  update "Step" s set input = '', output = ''
  where s.id = any (v_ids) and (coalesce(s.input, '') <> '' or coalesce(s.output, '') <> '');
  get diagnostics v_purged = row_count;
  update "Feedback" f set comment = null
  where f."stepId" = any (v_ids) and f.comment is not null;
  -- A chat's title is its first message until renamed: text like any other.
  update "Thread" t set name = null
  where t.id in (select s."threadId" from "Step" s where s.id = any (v_ids))
    and t."createdAt" < p_before and t.name is not null;
  return query select v_last_created, v_last_id, v_scanned, v_purged;
end
$$;

-- Rewrites the identifying fields of audit rows about a user, or done by them: their name
-- becomes 'deleted-user' in actor and target (a key's 'name/prefix' keeps its prefix), and
-- their name and id are replaced wherever they appear as a JSON string in before and after.
-- The only way round audit_log's append-only trigger (20261207000200_retention.sql).
create or replace function public.vtai_audit_anonymise(p_name text, p_user uuid)
returns integer
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_label constant text := 'deleted-user';
  v_name_json text := to_jsonb(p_name)::text;
  v_id_json text := to_jsonb(p_user::text)::text;
  v_rows integer;
begin
  perform set_config('vtai.audit_anonymise', 'on', true);
  -- Only rows by or about this user (a user.* or key.* action whose target is them) have their
  -- name replaced, and a target only of such an action: a name can equal a tier's, a model's
  -- or another user's value elsewhere. Their id (a uuid) is replaced wherever it appears.
  with about as (
    select a.id,
           a.actor = p_name
             or ((a.action like 'user.%' or a.action like 'key.%')
                 and (a.target = p_name or a.target = p_user::text
                      or starts_with(a.target, p_name || '/'))) as theirs
    from audit_log a
    where a.actor = p_name
       or ((a.action like 'user.%' or a.action like 'key.%')
           and (a.target = p_name or a.target = p_user::text
                or starts_with(a.target, p_name || '/')))
       or strpos(a.before::text, v_id_json) > 0 or strpos(a.after::text, v_id_json) > 0
  )
  update audit_log a
  set actor = case when a.actor = p_name then v_label else a.actor end,
      target = case
        when not (a.action like 'user.%' or a.action like 'key.%') then a.target
        when a.target = p_name or a.target = p_user::text then v_label
        when starts_with(a.target, p_name || '/')
          then v_label || substr(a.target, length(p_name) + 1)
        else a.target end,
      before = replace(case when ab.theirs
                            then replace(a.before::text, v_name_json, '"' || v_label || '"')
                            else a.before::text end,
                       v_id_json, '"' || v_label || '"')::jsonb,
      after = replace(case when ab.theirs
                           then replace(a.after::text, v_name_json, '"' || v_label || '"')
                           else a.after::text end,
                      v_id_json, '"' || v_label || '"')::jsonb
  from about ab
  where a.id = ab.id;
  get diagnostics v_rows = row_count;
  perform set_config('vtai.audit_anonymise', '', true);
  return v_rows;
end
$$;

-- What a Stripe event keeps once its user is deleted: its type and time, and of its object the
-- ids, amounts, currency and status an accountant reconciles with Stripe; no names, emails,
-- addresses or metadata.
create or replace function public.vtai_redact_stripe_payload(p_payload jsonb)
returns jsonb
language sql immutable
set search_path = pg_catalog
as $$
  select case when p_payload is null then null else jsonb_build_object(
    'id', p_payload -> 'id', 'type', p_payload -> 'type', 'created', p_payload -> 'created',
    'redacted', true,
    'data', jsonb_build_object('object', coalesce((
      select jsonb_object_agg(o.key, o.value)
      from jsonb_each(case when jsonb_typeof(p_payload #> '{data,object}') = 'object'
                           then p_payload #> '{data,object}' else '{}'::jsonb end) o
      where o.key in ('id', 'object', 'amount', 'amount_due', 'amount_paid', 'amount_refunded',
                      'amount_total', 'currency', 'status', 'created', 'livemode', 'invoice',
                      'payment_intent', 'subscription')
    ), '{}'::jsonb))
  ) end
$$;

-- Deletes a user: ledger rows to the tombstone (content cleared), counters added to the
-- tombstone's, chats, keys, sessions, billing links and grants gone (with the profile, by its
-- foreign keys), billing events and audit rows anonymised, and one audit row saying so.
create or replace function public.vtai_user_delete(p_user uuid, p_actor text)
returns table (ledger_rows bigint, threads bigint, billing_events bigint, audit_rows bigint)
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_dead constant uuid := vtai_deleted_user_id();
  v_name text;
  v_customers text[];
  v_ledger bigint;
  v_threads bigint;
  v_events bigint;
  v_audit integer;
begin
  select p.username into v_name from profiles p where p.id = p_user for update;
  if v_name is null then
    raise exception 'no such user' using errcode = 'P0002';
  end if;
  select coalesce(array_agg(c.customer_id), '{}') into v_customers
  from billing_customers c where c.user_id = p_user;

  -- Reservations, then counters, before any ledger row: a settle takes its ledger row, then
  -- its reservation and counters, and its aggregate buckets last (the ledger's statement
  -- trigger), so taking the ledger rows (and through them the buckets) first would deadlock
  -- with one. A settle is now either committed, and its row moved below, or waiting here.
  perform 1 from reservations res where res.end_user = p_user order by res.id for update;
  delete from reservations res where res.end_user = p_user;
  perform 1 from usage_counters c where c.end_user = p_user order by c.period_start for update;
  perform 1 from daily_counters d where d.end_user = p_user order by d.day_start for update;

  update request_logs r
  set end_user = v_dead, session_id = null, api_key_id = null, legacy_end_user = null,
      messages = null, response = null,
      error = case when r.error ? 'message' then r.error - 'message' else r.error end
  where r.end_user = p_user;
  get diagnostics v_ledger = row_count;
  -- The trigger left the user's buckets at zero; a zero bucket adds nothing, but names them.
  delete from usage_aggregates a
  where a.end_user = p_user and a.requests = 0 and a.failures = 0 and a.refusals = 0
    and a.prompt_tokens = 0 and a.completion_tokens = 0 and a.total_tokens = 0 and a.cost = 0;

  insert into usage_counters as c (end_user, period_start, used, reserved, used_raw, cost_used)
  select v_dead, u.period_start, u.used, 0, u.used_raw, u.cost_used
  from usage_counters u where u.end_user = p_user
  order by u.period_start
  on conflict (end_user, period_start) do update set
    used = c.used + excluded.used,
    used_raw = c.used_raw + excluded.used_raw,
    cost_used = c.cost_used + excluded.cost_used,
    updated_at = now();
  delete from usage_counters u where u.end_user = p_user;

  insert into daily_counters as d (end_user, day_start, used, reserved)
  select v_dead, x.day_start, x.used, 0
  from daily_counters x where x.end_user = p_user
  order by x.day_start
  on conflict (end_user, day_start) do update set
    used = d.used + excluded.used, updated_at = now();
  delete from daily_counters x where x.end_user = p_user;

  select count(*) into v_threads from "Thread" t where t."userId" = p_user::text;
  -- Threads, steps, elements and ratings go with their "User" row (foreign keys cascade).
  delete from "Thread" t where t."userId" = p_user::text;
  delete from "User" u where u.id = p_user::text;

  update billing_events e
  set user_id = null, payload = vtai_redact_stripe_payload(e.payload)
  where e.user_id = p_user
     or (e.payload #>> '{data,object,customer}') = any (v_customers);
  get diagnostics v_events = row_count;

  v_audit := vtai_audit_anonymise(v_name, p_user);

  -- Keys, sessions, password store, billing links, grants and resets go by their foreign keys.
  delete from profiles p where p.id = p_user;

  insert into audit_log (actor, action, target, before, after)
  values (left(p_actor, 200), 'user.delete', 'deleted-user', null,
          jsonb_build_object('ledger_rows', v_ledger, 'threads', v_threads,
                             'billing_events', v_events, 'audit_rows', v_audit));

  return query select v_ledger, v_threads, v_events, v_audit::bigint;
end
$$;

-- Ends one login and records it in the audit trail (POST /logout): vtai_session_end's twin
-- for the direct path, in one transaction.
create or replace function public.vtai_session_end_audited(p_session uuid)
returns boolean
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
  v_user uuid;
  v_name text;
begin
  update vtai_private.login_sessions s set revoked_at = now()
  where s.id = p_session and s.revoked_at is null
  returning s.user_id into v_user;
  if v_user is null then
    return false;
  end if;
  select p.username into v_name from profiles p where p.id = v_user;
  insert into audit_log (actor, action, target, before, after)
  values (coalesce(v_name, v_user::text), 'user.logout', coalesce(v_name, v_user::text), null,
          jsonb_build_object('sessions', 1));
  return true;
end
$$;

revoke all on function
  public.vtai_deleted_user_id(),
  public.vtai_retention_purge_ledger(timestamptz, bigint, bigint),
  public.vtai_retention_purge_steps(timestamptz, timestamptz, text, integer),
  public.vtai_audit_anonymise(text, uuid),
  public.vtai_redact_stripe_payload(jsonb),
  public.vtai_user_delete(uuid, text),
  public.vtai_session_end_audited(uuid)
  from public, anon, authenticated;
-- vtai_audit_anonymise and vtai_redact_stripe_payload run only inside vtai_user_delete.
grant execute on function
  public.vtai_deleted_user_id(),
  public.vtai_retention_purge_ledger(timestamptz, bigint, bigint),
  public.vtai_retention_purge_steps(timestamptz, timestamptz, text, integer),
  public.vtai_user_delete(uuid, text),
  public.vtai_session_end_audited(uuid)
  to service_role;
