-- `vtai doctor`'s probe turn (issue #20, item 4): a real metered turn on the local model, made by
-- a dedicated user (vtai/ops/probe.py), whose ledger rows say `source = 'probe'`.
--
-- * request_logs.source: 'probe' joins 'chat' and 'api'. The probe's rows count in the
--   counters and the aggregates like any other row (so vtai_verify_counters() and
--   vtai_verify_aggregates() stay empty); /admin leaves them out: the ledger's by their
--   source, the aggregates' by the probe user's id (vtai.ops.probe.PROBE_USER_ID).
-- * The check is replaced NOT VALID: every existing row passes it (the old check was
--   narrower), and validating would hold request_logs against writes while it read every row,
--   so settles would queue (and spool) for the whole scan on a big ledger. New rows are checked.
-- * No table, no function: nothing to grant or revoke.

alter table public.request_logs drop constraint if exists request_logs_source_check;
alter table public.request_logs
  add constraint request_logs_source_check check (source in ('chat', 'api', 'probe')) not valid;
