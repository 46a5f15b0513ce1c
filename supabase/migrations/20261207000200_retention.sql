-- Retention and user data requests (issue #20, item 5): what the purge and `vtai user delete`
-- need from the tables. The functions that use them are in functions/70_retention.sql.
--
-- * "Step"."createdAt": the purge of chat history walks steps oldest first in small batches
--   (keyset on createdAt, id); without this index every batch would scan the whole table.
-- * audit_log stays append-only, with one narrow exception: vtai_audit_anonymise() (a
--   security-definer function) may rewrite the identifying fields of a deleted user's rows.
--   It sets the transaction-local flag vtai.audit_anonymise; under it an UPDATE may change
--   actor, target, before and after only, and actor and target only to a 'deleted-user'
--   label. id, at and action never change; DELETE and TRUNCATE stay refused for everyone.
--   The flag is no secret (any session may set it), so it widens nothing: only a role that
--   already has UPDATE on the table (its owner, the embedded app role) could use it, and
--   then only to anonymise.

create index if not exists step_created_idx on public."Step" ("createdAt", id);

-- The row trigger moves to a guard of its own; TRUNCATE keeps the plans migration's trigger.
create or replace function public.vtai_audit_log_guard()
returns trigger
language plpgsql
set search_path = pg_catalog
as $$
begin
  if tg_op = 'UPDATE'
     and current_setting('vtai.audit_anonymise', true) = 'on'
     and new.id = old.id and new.at = old.at and new.action = old.action
     and (new.actor = old.actor or new.actor like 'deleted-user%')
     and (new.target = old.target or new.target like 'deleted-user%') then
    return new;
  end if;
  raise exception 'audit_log is append-only' using errcode = '42501';
end
$$;

drop trigger if exists audit_log_append_only on public.audit_log;
create trigger audit_log_append_only
  before update or delete on public.audit_log
  for each row execute function public.vtai_audit_log_guard();

revoke all on function public.vtai_audit_log_guard() from public, anon, authenticated;
