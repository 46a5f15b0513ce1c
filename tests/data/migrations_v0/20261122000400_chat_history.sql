-- Chat history: the tables Chainlit's own asyncpg data layer
-- (chainlit.data.chainlit_data_layer.ChainlitDataLayer) reads and writes, in VT.ai's database.
--
-- Names and columns follow Chainlit's published schema (the chainlit-datalayer Prisma schema
-- plus the Step columns its 2.1.0 / 2.3.0 / 2.9.4 migration guides add), so Chainlit's queries
-- run unchanged. Where this file differs from Prisma's output, it is on purpose:
-- * timestamptz instead of timestamp(3): Chainlit writes naive local times and the UI reads
--   back ISO strings; with a time zone the sidebar's "Today / Yesterday" is right everywhere.
-- * Step.type is text, not an enum: a Chainlit upgrade that adds a step type must not start
--   failing every insert until someone writes a migration.
-- * Feedback cascades with its step, so deleting a chat deletes its ratings and comments too.
--
-- "User".id is VT.ai's profiles.id (vtai/history.py makes it so), which is auth.uid() on
-- Supabase, so the policies below compare against auth.uid() directly. Ids stay text, as
-- Chainlit treats every id as an opaque string.
--
-- Billing is separate by design: nothing here references request_logs or usage_counters, so
-- deleting a chat (Thread row, cascading to its steps) never touches what a user was charged.
--
-- Supabase's default privileges grant anon and authenticated ALL on every new table in public,
-- so each table revokes explicitly and relies on RLS. The app writes as the table owner (RLS
-- does not apply to owners); signed-in users may only read their own rows.

create table if not exists public."User" (
  id text primary key default gen_random_uuid()::text,
  "createdAt" timestamptz not null default now(),
  "updatedAt" timestamptz not null default now(),
  metadata jsonb not null default '{}'::jsonb,
  identifier text not null unique
);

create table if not exists public."Thread" (
  id text primary key default gen_random_uuid()::text,
  "createdAt" timestamptz not null default now(),
  "updatedAt" timestamptz not null default now(),
  "deletedAt" timestamptz,
  name text,
  metadata jsonb not null default '{}'::jsonb,
  tags text[] default '{}'::text[],
  "userId" text references public."User" (id) on delete cascade
);

create table if not exists public."Step" (
  id text primary key default gen_random_uuid()::text,
  "createdAt" timestamptz not null default now(),
  "updatedAt" timestamptz not null default now(),
  "parentId" text references public."Step" (id) on delete cascade,
  "threadId" text references public."Thread" (id) on delete cascade,
  input text,
  metadata jsonb not null default '{}'::jsonb,
  name text,
  output text,
  type text not null,
  "showInput" text default 'json',
  "isError" boolean default false,
  "startTime" timestamptz not null default now(),
  "endTime" timestamptz not null default now(),
  command text,
  "defaultOpen" boolean,
  modes jsonb
);

create table if not exists public."Element" (
  id text primary key default gen_random_uuid()::text,
  "createdAt" timestamptz not null default now(),
  "updatedAt" timestamptz not null default now(),
  "threadId" text references public."Thread" (id) on delete cascade,
  "stepId" text not null references public."Step" (id) on delete cascade,
  metadata jsonb not null default '{}'::jsonb,
  mime text,
  name text not null,
  "objectKey" text,
  url text,
  "chainlitKey" text,
  display text,
  size text,
  language text,
  page integer,
  "autoPlay" boolean,
  "playerConfig" jsonb,
  props jsonb default '{}'::jsonb
);

create table if not exists public."Feedback" (
  id text primary key default gen_random_uuid()::text,
  "createdAt" timestamptz not null default now(),
  "updatedAt" timestamptz not null default now(),
  "stepId" text references public."Step" (id) on delete cascade,
  name text not null,
  value double precision not null,
  comment text
);

-- The sidebar's query (a user's threads, newest first) and the Thread policy.
create index if not exists thread_user_updated_idx
  on public."Thread" ("userId", "updatedAt" desc);
-- Opening a chat (steps in order) and the Step/Element policies.
create index if not exists step_thread_start_idx on public."Step" ("threadId", "startTime");
-- Cascades from a deleted parent step.
create index if not exists step_parent_idx on public."Step" ("parentId");
create index if not exists element_thread_idx on public."Element" ("threadId");
create index if not exists element_step_idx on public."Element" ("stepId");
create index if not exists feedback_step_idx on public."Feedback" ("stepId");

alter table public."User" enable row level security;
alter table public."Thread" enable row level security;
alter table public."Step" enable row level security;
alter table public."Element" enable row level security;
alter table public."Feedback" enable row level security;

revoke all on public."User", public."Thread", public."Step", public."Element", public."Feedback"
  from public, anon, authenticated;
grant select on public."User", public."Thread", public."Step", public."Element", public."Feedback"
  to authenticated;
grant all on public."User", public."Thread", public."Step", public."Element", public."Feedback"
  to service_role;

-- (select auth.uid()) is evaluated once per statement, not once per row. Child tables test
-- membership in the set of the user's threads (or steps) for the same reason.
drop policy if exists "User: users read their own" on public."User";
create policy "User: users read their own" on public."User"
  for select to authenticated using ((select auth.uid())::text = id);

drop policy if exists "Thread: users read their own" on public."Thread";
create policy "Thread: users read their own" on public."Thread"
  for select to authenticated using ((select auth.uid())::text = "userId");

drop policy if exists "Step: users read their threads' steps" on public."Step";
create policy "Step: users read their threads' steps" on public."Step"
  for select to authenticated using (
    "threadId" in (
      select t.id from public."Thread" t where t."userId" = (select auth.uid())::text
    )
  );

drop policy if exists "Element: users read their threads' elements" on public."Element";
create policy "Element: users read their threads' elements" on public."Element"
  for select to authenticated using (
    "threadId" in (
      select t.id from public."Thread" t where t."userId" = (select auth.uid())::text
    )
  );

drop policy if exists "Feedback: users read feedback on their threads" on public."Feedback";
create policy "Feedback: users read feedback on their threads" on public."Feedback"
  for select to authenticated using (
    "stepId" in (
      select s.id from public."Step" s
      where s."threadId" in (
        select t.id from public."Thread" t where t."userId" = (select auth.uid())::text
      )
    )
  );
