-- Supabase's default privileges hand anon and authenticated ALL on every new sequence in
-- public, as on every new table. Only the server writes the tables these sequences number, so
-- nobody else may take or set their values (the legacy upgrade did this for request_logs
-- alone; a fresh database needs it for every sequence).
do $$
declare
  r record;
begin
  for r in
    select c.oid::regclass as seq
    from pg_class c
    join pg_namespace n on n.oid = c.relnamespace
    where c.relkind = 'S' and n.nspname = 'public'
  loop
    execute format('revoke all on sequence %s from public, anon, authenticated', r.seq);
  end loop;
end
$$;
