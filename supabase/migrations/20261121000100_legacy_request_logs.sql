-- Upgrade a legacy request_logs table in place, before the baseline defines it.
--
-- Databases of the earlier VT.ai carry one of two request_logs shapes (docs/supabase.md):
--   A: id bigint identity, end_user text, status text default '', total_cost real,
--      litellm_call_id text unique (nullable), tokens only inside additional_details;
--   B: id uuid, end_user uuid references auth.users, request_id, updated_at, no call id.
-- 20261121000200_baseline.sql does `create table if not exists request_logs`, so on those
-- databases it would keep the old table and fail or misbehave later. This file turns the old
-- table into the metering shape without losing a row, so that statement becomes a no-op.
-- 20261121000400_legacy_backfill.sql then brings the upgraded rows into the usage counters and
-- the dashboards' buckets.
--
-- Rules for legacy rows (all tagged additional_details.legacy = true):
-- * every original end_user value is kept in legacy_end_user; end_user keeps it as a uuid
--   only when it is one (a uuid whose profile does not exist yet stays attributed, so a
--   Supabase Auth user who logs in later finds their history);
-- * tokens and cost come from the typed columns when present, else from additional_details
--   (prompt/input, completion/output, total, cost keys, top level or under "usage"),
--   accepting numbers and numeric strings; anything else counts as 0;
-- * a missing call id becomes 'legacy-' || the old id, so it is deterministic;
-- * statuses become success or failure; the original is kept as legacy_status;
-- * period_start is the UTC calendar month of created_at (the default VTAI_USAGE_PERIOD;
--   SQL can't see the app's setting). A missing created_at becomes 1970-01-01, charged to a
--   period long gone rather than to today's quota, and is flagged created_at_unknown.
--
-- No-op on a fresh database (no request_logs) and on a table already in the metering shape.
-- Runs as the non-superuser owner Supabase gives the migration role. The table is locked while
-- it is rewritten: a notice gives its row count and a time estimate first (about 20,000 rows/s
-- were measured on 2 cores with PostgreSQL 15; the estimate assumes half that).

do $$
declare
  v_rel regclass := to_regclass('public.request_logs');
  v_modern constant text[][] := array[
    array['id', 'bigint'],
    array['created_at', 'timestamp with time zone'],
    array['end_user', 'uuid'],
    array['session_id', 'text'],
    array['model', 'text'],
    array['provider', 'text'],
    array['status', 'text'],
    array['prompt_tokens', 'integer'],
    array['completion_tokens', 'integer'],
    array['total_tokens', 'integer'],
    array['total_cost', 'numeric(18,8)'],
    array['response_time', 'real'],
    array['litellm_call_id', 'text'],
    array['period_start', 'timestamp with time zone'],
    array['messages', 'jsonb'],
    array['response', 'jsonb'],
    array['error', 'jsonb'],
    array['additional_details', 'jsonb']
  ];
  -- The columns the metering table declares not null.
  v_not_null constant text[] := array[
    'id', 'created_at', 'model', 'status', 'prompt_tokens', 'completion_tokens', 'total_tokens',
    'total_cost', 'litellm_call_id', 'additional_details'
  ];
  -- A number as JSON or text writes it: 12, "12", " 12.0 ", 1e3. %1$s is the text expression.
  v_num constant text :=
    'case when (%1$s) ~ ''^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?\s*$'''
    ' then btrim(%1$s)::numeric end';
  -- Money beyond numeric(18, 8) is garbage, not a bill: it becomes null, then 0.
  v_cost constant text :=
    'case when abs(' || v_num || ') < 1e10 then round(' || v_num || ', 8) end';
  -- Null stays null (greatest() would turn it into 0 and hide the next key).
  v_tok constant text :=
    'case when ' || v_num || ' < 0 then 0 when ' || v_num || ' > 2147483647 then 2147483647'
    ' else round(' || v_num || ')::integer end';
  v_uuid constant text := '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$';
  v_col text;
  v_type text;
  v_have text;
  v_legacy boolean := false;
  v_had_id_type text;
  v_seq text;
  v_con record;
  v_row record;
  v_count bigint;
begin
  if v_rel is null then
    return;
  end if;

  -- Legacy means: a metering column is missing or typed differently, or a not-null is absent.
  for i in 1 .. array_length(v_modern, 1) loop
    select format_type(a.atttypid, a.atttypmod) into v_have
    from pg_attribute a
    where a.attrelid = v_rel and a.attname = v_modern[i][1] and a.attnum > 0
      and not a.attisdropped;
    if v_have is null or replace(v_have, ', ', ',') <> v_modern[i][2] then
      v_legacy := true;
    end if;
  end loop;
  if not v_legacy then
    v_legacy := exists (
      select 1 from pg_attribute a
      where a.attrelid = v_rel and a.attname = any (v_not_null) and a.attnum > 0
        and not a.attisdropped and not a.attnotnull
    );
  end if;
  if not v_legacy then
    return;
  end if;

  lock table public.request_logs in access exclusive mode;
  select count(*) into v_count from public.request_logs;
  raise notice 'upgrading legacy public.request_logs in place: % row(s), about % s',
    v_count, ceil(v_count / 10000.0);

  -- Foreign keys: shape B points end_user at auth.users, but local logins have no auth user,
  -- so vtai_record() would fail for them. The metering table has none.
  for v_con in
    select conname from pg_constraint where conrelid = v_rel and contype = 'f'
  loop
    execute format('alter table public.request_logs drop constraint %I', v_con.conname);
  end loop;

  -- additional_details first: everything else may be read from it.
  if not exists (select 1 from pg_attribute where attrelid = v_rel
                 and attname = 'additional_details' and not attisdropped) then
    alter table public.request_logs add column additional_details jsonb;
  end if;
  select format_type(atttypid, atttypmod) into v_have from pg_attribute
  where attrelid = v_rel and attname = 'additional_details' and not attisdropped;
  if v_have <> 'jsonb' then
    alter table public.request_logs alter column additional_details drop default;
    execute format(
      'alter table public.request_logs alter column additional_details type jsonb using %s',
      case when v_have = 'json' then 'additional_details::jsonb'
           else 'to_jsonb(additional_details)' end);
  end if;
  -- Some legacy writers stored json.dumps(...) text inside the jsonb column.
  for v_row in
    select ctid as rid, additional_details #>> '{}' as txt from public.request_logs
    where jsonb_typeof(additional_details) = 'string'
      and additional_details #>> '{}' ~ '^\s*\{'
  loop
    begin
      update public.request_logs set additional_details = v_row.txt::jsonb
      where ctid = v_row.rid and jsonb_typeof(v_row.txt::jsonb) = 'object';
    exception when others then
      null;  -- not JSON after all: kept below as legacy_additional_details
    end;
  end loop;
  update public.request_logs
  set additional_details = case
    when additional_details is null then '{}'::jsonb
    else jsonb_build_object('legacy_additional_details', additional_details) end
  where additional_details is null or jsonb_typeof(additional_details) <> 'object';

  -- Shape B's uuid id moves to legacy_id; the ledger's id is bigint (vtai_record returns it).
  select format_type(atttypid, atttypmod) into v_had_id_type from pg_attribute
  where attrelid = v_rel and attname = 'id' and not attisdropped;
  if v_had_id_type is not null and v_had_id_type not in ('bigint', 'integer', 'smallint') then
    for v_con in
      select conname from pg_constraint where conrelid = v_rel and contype = 'p'
    loop
      execute format('alter table public.request_logs drop constraint %I', v_con.conname);
    end loop;
    alter table public.request_logs rename column id to legacy_id;
    alter table public.request_logs alter column legacy_id drop default;
    alter table public.request_logs alter column legacy_id drop not null;
  end if;
  if not exists (select 1 from pg_attribute where attrelid = v_rel and attname = 'id'
                 and not attisdropped) then
    alter table public.request_logs add column id bigint;
    -- Oldest first, so the new ids follow the order the rows were written in.
    execute format(
      'update public.request_logs r set id = n.rn from (select ctid as rid,'
      ' row_number() over (order by %s ctid) as rn from public.request_logs) n'
      ' where r.ctid = n.rid',
      case when exists (select 1 from pg_attribute where attrelid = v_rel
                        and attname = 'created_at' and not attisdropped)
        then 'created_at nulls first,' else '' end);
  elsif v_had_id_type in ('integer', 'smallint') then
    alter table public.request_logs alter column id type bigint;
  end if;
  alter table public.request_logs alter column id set not null;
  if not exists (select 1 from pg_constraint where conrelid = v_rel and contype = 'p') then
    alter table public.request_logs add primary key (id);
  end if;
  if not exists (select 1 from pg_attribute where attrelid = v_rel and attname = 'id'
                 and (attidentity <> '' or atthasdef)) then
    alter table public.request_logs alter column id add generated by default as identity;
  end if;
  v_seq := pg_get_serial_sequence('public.request_logs', 'id');
  if v_seq is not null then
    perform setval(v_seq, greatest(coalesce((select max(id) from public.request_logs), 0), 1),
                   exists (select 1 from public.request_logs));
    -- Supabase's default privileges hand anon ALL on new sequences; nobody but the server
    -- writes this table.
    execute format('revoke all on sequence %s from public, anon, authenticated', v_seq);
  end if;

  -- Keep every original end_user, before the column changes type.
  alter table public.request_logs add column if not exists legacy_end_user text;
  if exists (select 1 from pg_attribute where attrelid = v_rel and attname = 'end_user'
             and not attisdropped) then
    update public.request_logs set legacy_end_user = end_user::text
    where end_user is not null and legacy_end_user is null;
  end if;

  -- Columns the legacy table lacks, added nullable and filled below.
  for i in 1 .. array_length(v_modern, 1) loop
    continue when exists (select 1 from pg_attribute where attrelid = v_rel
                          and attname = v_modern[i][1] and not attisdropped);
    execute format('alter table public.request_logs add column %I %s',
                   v_modern[i][1], v_modern[i][2]);
  end loop;

  -- Columns present with another type. Defaults go first: a text default such as ''
  -- can't be cast to uuid.
  for i in 1 .. array_length(v_modern, 1) loop
    v_col := v_modern[i][1];
    v_type := v_modern[i][2];
    select replace(format_type(atttypid, atttypmod), ', ', ',') into v_have
    from pg_attribute where attrelid = v_rel and attname = v_col and not attisdropped;
    continue when v_have = v_type or v_col = 'id';
    execute format('alter table public.request_logs alter column %I drop default', v_col);
    execute format(
      'alter table public.request_logs alter column %I type %s using %s', v_col, v_type,
      case
        when v_type = 'uuid' then
          format('case when btrim(%1$I::text) ~ %2$L then btrim(%1$I::text)::uuid end',
                 v_col, v_uuid)
        when v_type = 'jsonb' and v_have = 'json' then format('%I::jsonb', v_col)
        when v_type = 'jsonb' then format('to_jsonb(%I)', v_col)
        when v_type = 'text' then format('%I::text', v_col)
        when v_type = 'timestamp with time zone' and v_have = 'timestamp without time zone'
          then format('%I at time zone ''UTC''', v_col)
        when v_type = 'timestamp with time zone' then format('%I::text::timestamptz', v_col)
        -- NaN and infinities (possible in real) are not money: they become null, then 0.
        when v_type = 'numeric(18,8)' then format(v_cost, format('%I::text', v_col))
        when v_type = 'integer' then format(v_tok, format('%I::text', v_col))
        else format('(' || v_num || ')::%s', format('%I::text', v_col), v_type)
      end);
  end loop;

  -- Fill the typed columns of every legacy row. Keys are looked up at the top level of
  -- additional_details and under "usage", where LiteLLM's usage object ends up.
  execute format($sql$
    update public.request_logs r set
      prompt_tokens = coalesce(r.prompt_tokens, %1$s, %2$s, %3$s, %4$s, 0),
      completion_tokens = coalesce(r.completion_tokens, %5$s, %6$s, %7$s, %8$s, 0),
      total_cost = coalesce(r.total_cost, %9$s, %10$s, %11$s, 0),
      model = coalesce(r.model, r.additional_details ->> 'model', ''),
      session_id = coalesce(r.session_id, r.additional_details ->> 'session_id'),
      provider = coalesce(r.provider, r.additional_details ->> 'provider',
                          r.additional_details ->> 'custom_llm_provider'),
      litellm_call_id = case when nullif(btrim(r.litellm_call_id), '') is null
        then 'legacy-' || %12$s else r.litellm_call_id end,
      status = case
        when lower(btrim(r.status)) in ('success', 'succeeded', 'ok', 'completed', 'complete')
          then 'success'
        when r.status = 'refused' then 'refused'
        else 'failure' end,
      additional_details = r.additional_details || jsonb_build_object(
        'legacy', true, 'legacy_status', r.status)
        || case when r.created_at is null
             then '{"created_at_unknown": true}'::jsonb else '{}'::jsonb end,
      created_at = coalesce(r.created_at, %13$s timestamptz '1970-01-01 00:00:00+00')
    $sql$,
    format(v_tok, $q$r.additional_details ->> 'prompt_tokens'$q$),
    format(v_tok, $q$r.additional_details ->> 'input_tokens'$q$),
    format(v_tok, $q$r.additional_details #>> '{usage,prompt_tokens}'$q$),
    format(v_tok, $q$r.additional_details #>> '{usage,input_tokens}'$q$),
    format(v_tok, $q$r.additional_details ->> 'completion_tokens'$q$),
    format(v_tok, $q$r.additional_details ->> 'output_tokens'$q$),
    format(v_tok, $q$r.additional_details #>> '{usage,completion_tokens}'$q$),
    format(v_tok, $q$r.additional_details #>> '{usage,output_tokens}'$q$),
    format(v_cost, $q$r.additional_details ->> 'total_cost'$q$),
    format(v_cost, $q$r.additional_details ->> 'cost'$q$),
    format(v_cost, $q$r.additional_details ->> 'response_cost'$q$),
    case when exists (select 1 from pg_attribute where attrelid = v_rel
                      and attname = 'legacy_id' and not attisdropped)
      then 'r.legacy_id::text' else 'r.id::text' end,
    case when exists (select 1 from pg_attribute where attrelid = v_rel
                      and attname = 'updated_at' and not attisdropped)
      then 'r.updated_at,' else '' end);

  -- The total follows the parts unless the legacy row states one.
  execute format($sql$
    update public.request_logs r set total_tokens = coalesce(r.total_tokens, %1$s, %2$s,
      least(r.prompt_tokens::bigint + r.completion_tokens, 2147483647)::integer)
    where r.total_tokens is null
    $sql$,
    format(v_tok, $q$r.additional_details ->> 'total_tokens'$q$),
    format(v_tok, $q$r.additional_details #>> '{usage,total_tokens}'$q$));
  update public.request_logs
  set period_start = date_trunc('month', created_at at time zone 'UTC') at time zone 'UTC'
  where period_start is null;

  -- Legacy checks (for example on status values) would reject what the ledger writes now.
  for v_con in
    select conname from pg_constraint
    where conrelid = v_rel and contype = 'c'
      and conname not in ('request_logs_status_check', 'request_logs_prompt_tokens_check',
                          'request_logs_completion_tokens_check',
                          'request_logs_total_tokens_check')
  loop
    execute format('alter table public.request_logs drop constraint %I', v_con.conname);
  end loop;

  -- Defaults and not-nulls exactly as the metering table declares them.
  alter table public.request_logs
    alter column created_at set default now(),
    alter column end_user drop default,
    alter column session_id drop default,
    alter column model set default '',
    alter column provider drop default,
    alter column status drop default,
    alter column prompt_tokens set default 0,
    alter column completion_tokens set default 0,
    alter column total_tokens set default 0,
    alter column total_cost set default 0,
    alter column response_time drop default,
    alter column litellm_call_id drop default,
    alter column period_start drop default,
    alter column additional_details set default '{}'::jsonb;
  foreach v_col in array v_not_null loop
    execute format('alter table public.request_logs alter column %I set not null', v_col);
  end loop;

  -- A legacy-only column that is not null without a default would reject every new row.
  for v_col in
    select a.attname from pg_attribute a
    where a.attrelid = v_rel and a.attnum > 0 and not a.attisdropped and a.attnotnull
      and not a.atthasdef and a.attidentity = ''
      and a.attname::text <> all (v_not_null)
  loop
    execute format('alter table public.request_logs alter column %I drop not null', v_col);
  end loop;

  if not exists (select 1 from pg_constraint where conrelid = v_rel
                 and conname = 'request_logs_status_check') then
    alter table public.request_logs add constraint request_logs_status_check
      check (status in ('success', 'failure', 'refused'));
  end if;
  foreach v_col in array array['prompt_tokens', 'completion_tokens', 'total_tokens'] loop
    if not exists (select 1 from pg_constraint where conrelid = v_rel
                   and conname = 'request_logs_' || v_col || '_check') then
      execute format('alter table public.request_logs add constraint %I check (%I >= 0)',
                     'request_logs_' || v_col || '_check', v_col);
    end if;
  end loop;
  -- vtai_record() relies on ON CONFLICT (litellm_call_id): it needs a plain unique index.
  if not exists (
    select 1 from pg_index i
    where i.indrelid = v_rel and i.indisunique and i.indpred is null and i.indexprs is null
      and i.indnkeyatts = 1
      and i.indkey[0] = (select attnum from pg_attribute
                         where attrelid = v_rel and attname = 'litellm_call_id')
  ) then
    alter table public.request_logs add constraint request_logs_litellm_call_id_key
      unique (litellm_call_id);
  end if;
end
$$;

-- The permissive policies of the legacy setup let anyone with the public anon key forge or
-- read usage. Dropped by name; the baseline creates the correct ones.
do $$
declare
  v_table text;
  v_name text;
  v_policy text;
begin
  foreach v_table in array array['request_logs', 'usage_logs'] loop
    continue when to_regclass('public.' || v_table) is null;
    foreach v_name in array array[
      'Allow all inserts to %s',
      'Service role has full access to %s',
      'Enable read access for all users',
      'Anonymous users can insert %s',
      'Anonymous users can insert %s (fixed)',
      'Users can insert their own %s',
      'Users can insert their own %s (fixed)',
      'Allow authenticated users to insert %s',
      'Allow users to view their own %s',
      'Allow service role to view all %s'
    ] loop
      -- The legacy names spell the table both ways: request_logs and "request logs".
      for v_policy in
        select polname from pg_policy
        where polrelid = ('public.' || v_table)::regclass
          and polname in (format(v_name, v_table), format(v_name, replace(v_table, '_', ' ')))
      loop
        execute format('drop policy %I on public.%I', v_policy, v_table);
        raise notice 'dropped legacy policy "%" on public.%', v_policy, v_table;
      end loop;
    end loop;
  end loop;
  -- usage_logs stays until scripts/migrate_remove_usage_logs.py copies it; meanwhile nobody
  -- but the server may read or write it.
  if to_regclass('public.usage_logs') is not null then
    if pg_has_role((select relowner from pg_class where oid = 'public.usage_logs'::regclass),
                   'USAGE') then
      alter table public.usage_logs enable row level security;
      revoke all on public.usage_logs from public, anon, authenticated;
    end if;
  end if;
end
$$;
