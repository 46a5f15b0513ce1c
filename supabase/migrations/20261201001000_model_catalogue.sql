-- The operator's model catalogue: the models the chat offers, edited with `vtai model` (docs:
-- README "Models"). The app reads it (vtai/llm/catalogue.py) and offers the enabled models
-- whose key is configured, with VTAI_MODEL first. Seeded with the list VT.ai offered before
-- (vtai/llm/models.py BUILTIN_MODELS, which stays the fallback when no database pool is open).
--
-- A key is never stored here: `api_key_env` and `provider_key` hold the NAME of the
-- environment variable that holds it. No function: a plain table the server reads and writes.

create table if not exists public.models (
  -- the LiteLLM model name the turn calls
  model text primary key check (length(model) between 1 and 200),
  display_name text,
  -- an OpenAI-compatible server's base URL, for models LiteLLM reaches there
  api_base text check (api_base is null or api_base ~ '^https?://'),
  -- the variable holding the key sent to api_base
  api_key_env text check (api_key_env is null or api_key_env ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
  -- the provider key variable that must be set for the model to be offered; null: none needed
  provider_key text check (provider_key is null or provider_key ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
  -- USD per token, for models LiteLLM has no price for; the catalogue's price wins
  price_in numeric check (price_in is null or price_in >= 0),
  price_out numeric check (price_out is null or price_out >= 0),
  weight numeric not null default 1 check (weight >= 0),
  enabled boolean not null default true,
  -- the picker's order after VTAI_MODEL (`vtai model add` appends)
  position integer not null default 0,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

insert into public.models (position, model, display_name, provider_key, price_in, price_out)
values
  (1, 'local/smollm2-135m', 'SmolLM2 135M (local)', null, 0, 0),
  (2, 'gpt-4o-mini', 'GPT-4o mini', 'OPENAI_API_KEY', null, null),
  (3, 'gpt-4o', 'GPT-4o', 'OPENAI_API_KEY', null, null),
  (4, 'gpt-4.1-mini', 'GPT-4.1 mini', 'OPENAI_API_KEY', null, null),
  (5, 'anthropic/claude-3-5-haiku-latest', 'Claude 3.5 Haiku', 'ANTHROPIC_API_KEY', null, null),
  (6, 'anthropic/claude-sonnet-4-20250514', 'Claude Sonnet 4', 'ANTHROPIC_API_KEY', null, null),
  (7, 'gemini/gemini-2.0-flash', 'Gemini 2.0 Flash', 'GEMINI_API_KEY', null, null),
  (8, 'gemini/gemini-2.5-flash', 'Gemini 2.5 Flash', 'GEMINI_API_KEY', null, null),
  (9, 'openrouter/openai/gpt-4o-mini', 'GPT-4o mini (OpenRouter)', 'OPENROUTER_API_KEY', null,
   null),
  (10, 'openrouter/meta-llama/llama-3.3-70b-instruct', 'Llama 3.3 70B (OpenRouter)',
   'OPENROUTER_API_KEY', null, null)
on conflict (model) do nothing;

alter table public.models enable row level security;
revoke all on public.models from public, anon, authenticated;
grant all on public.models to service_role;
