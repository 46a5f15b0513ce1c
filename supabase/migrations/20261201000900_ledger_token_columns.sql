-- Cached prompt tokens and reasoning tokens in typed columns of request_logs, so that a row's
-- cost can be re-derived from the ledger (docs/metering.md, "Cost"): a provider bills prompt
-- tokens read from its cache at a lower rate, and some bill reasoning tokens at their own.
--
-- The app's rows carry the two counts in additional_details (cached_tokens, reasoning_tokens):
-- vtai_record_batch() is defined once, in the baseline, and inserts the columns it names. A
-- BEFORE INSERT trigger moves the counts into their columns, whichever way the row arrives
-- (vtai_record_batch, a spool replay, a script), and out of additional_details. Columns with a
-- constant default are added without rewriting the ledger; rows before this count 0.

alter table public.request_logs
  add column if not exists cached_tokens integer not null default 0,
  add column if not exists reasoning_tokens integer not null default 0;

create or replace function public.vtai_request_logs_token_columns()
returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
begin
  if new.additional_details ?| array['cached_tokens', 'reasoning_tokens'] then
    -- Never negative, never more than the tokens they are part of.
    new.cached_tokens := least(greatest(
      coalesce((new.additional_details ->> 'cached_tokens')::integer, 0), 0), new.prompt_tokens);
    new.reasoning_tokens := least(greatest(
      coalesce((new.additional_details ->> 'reasoning_tokens')::integer, 0), 0),
      new.completion_tokens);
    new.additional_details := new.additional_details - 'cached_tokens' - 'reasoning_tokens';
  end if;
  return new;
end
$$;

drop trigger if exists request_logs_token_columns on public.request_logs;
create trigger request_logs_token_columns
  before insert on public.request_logs
  for each row execute function public.vtai_request_logs_token_columns();

revoke all on function public.vtai_request_logs_token_columns() from public, anon, authenticated;
