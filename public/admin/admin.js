// The admin dashboard: reads /admin/api/*, draws with the vendored Chart.js.
// Everything the page loaded is kept on window.vtaiAdmin, which the browser test inspects.
"use strict";

const state = (window.vtaiAdmin = { summary: null, series: null, users: null, logs: null, plans: null, keys: null });
const charts = {};
let cursors = [null]; // cursors[i] opens page i of the log; keyset, so no page numbers in SQL

const $ = (sel) => document.querySelector(sel);
const num = (v) => Number(v || 0).toLocaleString("en-US");
const usd = (v) => "$" + Number(v || 0).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 4 });
const when = (iso) => (iso ? iso.replace("T", " ").slice(0, 19) : "");

function say(text, isError) {
  const el = $("#message");
  el.textContent = text || "";
  el.className = isError ? "error" : "";
}

async function api(path, options) {
  const r = await fetch(path, { credentials: "same-origin", ...options });
  if (r.status === 401) {
    window.location.href = "/login";
    throw new Error("signed out");
  }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.detail || r.statusText);
  return body;
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

// ---- cards -------------------------------------------------------------------------------

function renderBalances(rows) {
  const ul = $("#balances");
  ul.replaceChildren();
  if (!rows.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "Nothing synced yet (no provider key set, or press Sync balances).";
    ul.appendChild(li);
  }
  for (const b of rows) {
    const li = document.createElement("li");
    let text = b.provider + ": ";
    if (b.balance !== null) text += Number(b.balance).toFixed(2) + " " + b.currency + " (as of " + when(b.fetched_at) + ")";
    else text += "n/a" + (b.note ? " (" + b.note + ")" : "");
    li.textContent = text;
    if (b.error) {
      const err = document.createElement("div");
      err.className = "err";
      err.textContent = "last sync failed " + when(b.error_at) + ": " + b.error;
      li.appendChild(err);
    }
    ul.appendChild(li);
  }
}

async function loadSummary() {
  const s = (state.summary = await api("/admin/api/summary"));
  $("#period-label").textContent = "period: " + s.period + (s.period === "lifetime" ? "" : " from " + when(s.period_start).slice(0, 10));
  $("#c-requests-today").textContent = num(s.today.requests);
  $("#c-requests-period").textContent = num(s.this_period.requests);
  $("#c-tokens-today").textContent = num(s.today.tokens);
  $("#c-tokens-period").textContent = num(s.this_period.tokens);
  $("#c-cost-today").textContent = usd(s.today.cost);
  $("#c-cost-period").textContent = usd(s.this_period.cost);
  $("#c-users-today").textContent = num(s.today.users);
  $("#c-users-period").textContent = num(s.this_period.users);
  $("#c-at-limit").textContent = num(s.users_at_limit);
  renderBalances(s.balances);
}

$("#sync-balances").addEventListener("click", async (e) => {
  e.target.disabled = true;
  say("Syncing balances…");
  try {
    const rows = await api("/admin/api/balances/sync", { method: "POST" });
    renderBalances(rows);
    say("Balances synced.");
  } catch (err) {
    say("Balance sync failed: " + err.message, true);
  } finally {
    e.target.disabled = false;
  }
});

// ---- charts ------------------------------------------------------------------------------

function draw(id, config) {
  if (charts[id]) charts[id].destroy();
  config.options = { responsive: true, maintainAspectRatio: false, animation: false, ...config.options };
  charts[id] = new Chart(document.getElementById(id), config);
}

async function loadSeries() {
  const days = $("#range").value;
  const s = (state.series = await api("/admin/api/series?days=" + days));
  const labels = s.points.map((p) => (s.granularity === "hour" ? when(p.bucket).slice(5, 16) : when(p.bucket).slice(0, 10)));
  draw("chart-requests", {
    type: "line",
    data: {
      labels,
      datasets: [
        { label: "requests", data: s.points.map((p) => p.requests), borderColor: "#2563eb", tension: 0.2 },
        { label: "failures", data: s.points.map((p) => p.failures), borderColor: "#b91c1c", tension: 0.2 },
        { label: "refused", data: s.points.map((p) => p.refusals), borderColor: "#b45309", tension: 0.2 },
      ],
    },
    options: { scales: { y: { beginAtZero: true } } },
  });
  draw("chart-cost-model", {
    type: "bar",
    data: {
      labels: s.by_model.map((m) => m.model),
      datasets: [{ label: "cost (USD)", data: s.by_model.map((m) => Number(m.cost)), backgroundColor: "#2563eb" }],
    },
    options: { indexAxis: "y", plugins: { legend: { display: false } } },
  });
  draw("chart-tokens", {
    type: "bar",
    data: {
      labels,
      datasets: [
        { label: "prompt", data: s.points.map((p) => p.prompt_tokens), backgroundColor: "#93c5fd" },
        { label: "completion", data: s.points.map((p) => p.completion_tokens), backgroundColor: "#1d4ed8" },
      ],
    },
    options: { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } },
  });
}

$("#range").addEventListener("change", () => loadSeries().catch((e) => say(e.message, true)));

// ---- users -------------------------------------------------------------------------------
// 100 at a time by name (the route's keyset: `after` the last name shown), "More users" for
// the next 100; the search box asks the server for names starting with what is typed.

const USERS_PAGE = 100;
const users = { after: null, q: "", asked: 0 };

function debounce(fn, ms) {
  let timer;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

function userRow(user, tiers) {
  const tr = document.createElement("tr");
  tr.dataset.user = user.username;
  cell(tr, user.username + (user.is_admin ? " (admin)" : ""));
  const td = cell(tr, "");
  const select = document.createElement("select");
  select.className = "tier";
  for (const t of tiers) select.add(new Option(t.name, t.name, false, t.name === user.tier));
  const save = document.createElement("button");
  save.type = "button";
  save.textContent = "Save";
  save.className = "save-tier";
  save.disabled = true;
  select.addEventListener("change", () => (save.disabled = select.value === user.tier));
  save.addEventListener("click", async () => {
    save.disabled = true;
    try {
      const changed = await api("/admin/api/users/" + user.id + "/tier", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ tier: select.value }),
      });
      say(changed.username + " is now on the " + changed.tier + " tier.");
      await Promise.all([loadUsers(), loadSummary()]);
    } catch (err) {
      say("Tier change failed: " + err.message, true);
      save.disabled = false;
    }
  });
  td.append(select, " ", save);
  cell(tr, num(user.used), "num");
  cell(tr, user.limit === null ? "no limit" : num(user.limit), "num");
  cell(tr, user.remaining === null ? "–" : num(user.remaining), "num");
  cell(tr, user.last_active ? when(user.last_active).slice(0, 16) : "never");
  return tr;
}

// more: append the next page to what is shown; else start again from the first name.
async function loadUsers(more) {
  const asked = ++users.asked;
  const params = new URLSearchParams({ limit: USERS_PAGE });
  if (users.q) params.set("q", users.q);
  if (more && users.after) params.set("after", users.after);
  const u = await api("/admin/api/users?" + params);
  if (asked !== users.asked) return; // a newer search or page was asked for meanwhile
  const body = $("#users tbody");
  if (more && state.users) {
    state.users = { ...u, users: state.users.users.concat(u.users) };
  } else {
    state.users = u;
    body.replaceChildren();
  }
  for (const user of u.users) body.appendChild(userRow(user, u.tiers));
  users.after = u.users.length === USERS_PAGE ? u.users[u.users.length - 1].username : null;
  $("#users-more").hidden = !users.after;
  const shown = state.users.users.length;
  $("#users-shown").textContent = shown
    ? shown + (users.after ? " shown, more below" : " shown") + (users.q ? ' starting with "' + users.q + '"' : "")
    : "no user's name starts with " + JSON.stringify(users.q);
  fillSelect($("#log-filter [name=model]"), u.models.map((m) => [m, m || "(none)"]));
}

$("#users-more").addEventListener("click", () => loadUsers(true).catch((e) => say(e.message, true)));
$("#users-search").addEventListener(
  "input",
  debounce((e) => {
    users.q = e.target.value.trim();
    loadUsers().catch((err) => say(err.message, true));
  }, 250)
);

function fillSelect(select, pairs) {
  const keep = select.value;
  select.replaceChildren(new Option("all", ""));
  for (const [value, label] of pairs) select.add(new Option(label, value));
  select.value = keep;
}

// The log's user filter: the names starting with what is typed (20 at most), from the same
// paged route, never the whole user list. The chosen user stays chosen while the list changes.
const LOG_USERS = 20;
let logUsersAsked = 0;

async function findLogUsers(q) {
  const asked = ++logUsersAsked;
  const params = new URLSearchParams({ limit: LOG_USERS });
  if (q) params.set("q", q);
  const u = await api("/admin/api/users?" + params);
  if (asked !== logUsersAsked) return;
  const select = $("#log-filter [name=user]");
  const chosen = select.value ? [select.value, select.selectedOptions[0].textContent] : null;
  const pairs = u.users.map((x) => [x.id, x.username]);
  if (chosen && !pairs.some(([id]) => id === chosen[0])) pairs.unshift(chosen);
  fillSelect(select, pairs);
  state.logUsers = u.users.map((x) => x.username);
}

$("#log-user-search").addEventListener(
  "input",
  debounce((e) => findLogUsers(e.target.value.trim()).catch((err) => say(err.message, true)), 250)
);

// ---- request log -------------------------------------------------------------------------

function filterParams() {
  const params = new URLSearchParams();
  for (const [k, v] of new FormData($("#log-filter"))) if (v) params.set(k, v);
  return params;
}

async function loadLogs(page) {
  const params = filterParams();
  if (cursors[page]) params.set("cursor", cursors[page]);
  const l = (state.logs = await api("/admin/api/logs?" + params));
  cursors[page + 1] = l.next_cursor;
  cursors.length = page + 2;
  state.logPage = page;
  const body = $("#logs tbody");
  body.replaceChildren();
  for (const r of l.rows) {
    const tr = document.createElement("tr");
    tr.className = "status-" + r.status;
    cell(tr, when(r.created_at));
    cell(tr, r.username || r.end_user || "");
    cell(tr, r.model);
    cell(tr, r.status);
    cell(tr, num(r.prompt_tokens), "num");
    cell(tr, num(r.completion_tokens), "num");
    cell(tr, r.total_cost === null ? "unknown" : usd(r.total_cost), "num");
    cell(tr, r.response_time === null ? "" : Number(r.response_time).toFixed(2), "num");
    cell(tr, r.error || "", "wrap");
    body.appendChild(tr);
  }
  $("#logs-page").textContent = l.rows.length ? "page " + (page + 1) : "no rows match";
  $("#logs-prev").disabled = page === 0;
  $("#logs-first").disabled = page === 0;
  $("#logs-next").disabled = !l.next_cursor;
  $("#csv").href = "/admin/api/logs.csv?" + filterParams();
}

$("#log-filter").addEventListener("submit", (e) => {
  e.preventDefault();
  cursors = [null];
  loadLogs(0).catch((err) => say(err.message, true));
});
$("#logs-next").addEventListener("click", () => loadLogs(state.logPage + 1).catch((e) => say(e.message, true)));
$("#logs-prev").addEventListener("click", () => loadLogs(state.logPage - 1).catch((e) => say(e.message, true)));
$("#logs-first").addEventListener("click", () => loadLogs(0).catch((e) => say(e.message, true)));

// ---- plans -------------------------------------------------------------------------------
// A tier's row keeps what the admin typed until it is saved: a reload (after any save) only
// refreshes the rows nobody has edited, and a refused save leaves every input as it was.

const PLAN_FIELDS = [
  ["tokens", "token_limit"],
  ["daily", "daily_limit"],
  ["usd", "usd_limit"],
  ["rpm", "rpm"],
  ["models", "models"],
];
const planRows = {}; // tier -> { tr, inputs, loaded }

function sayPlans(text, kind) {
  const el = $("#plans-message");
  el.textContent = text || "";
  el.className = kind || "";
}

// "daily: -5 is negative..." names the form field first; mark that input.
function markInvalid(container, message) {
  for (const el of container.querySelectorAll(".invalid")) el.classList.remove("invalid");
  const m = /^([a-z_]+): /.exec(message || "");
  const input = m && container.querySelector('[name="' + m[1] + '"]');
  if (input) {
    input.classList.add("invalid");
    input.focus();
  }
}

function planText(plan, column) {
  const v = plan[column];
  if (column === "models") return v.join(", ");
  return v === null ? "" : String(v);
}

function setPlanRow(row, plan) {
  for (const [field, column] of PLAN_FIELDS) {
    row.loaded[field] = planText(plan, column);
    row.inputs[field].value = row.loaded[field];
  }
}

const rowEdited = (row) => PLAN_FIELDS.some(([f]) => row.inputs[f].value !== row.loaded[f]);

async function savePlan(tier, row, button) {
  // Only what this admin changed: a field someone else saved meanwhile is left as they saved it.
  const body = {};
  for (const [field] of PLAN_FIELDS) {
    if (row.inputs[field].value !== row.loaded[field]) body[field] = row.inputs[field].value;
  }
  button.disabled = true;
  try {
    const r = await api("/admin/api/plans/" + encodeURIComponent(tier), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    setPlanRow(row, r.plan);
    markInvalid(row.tr, "");
    const text = r.changed ? "Saved the " + tier + " plan." : "No change to the " + tier + " plan.";
    if (r.warnings.length) sayPlans(text + " Warning: " + r.warnings.join("; "), "warning");
    else sayPlans(text);
    await loadPlans();
    if (r.changed) await loadUsers();
  } catch (err) {
    sayPlans("The " + tier + " plan was not saved: " + err.message, "error");
    markInvalid(row.tr, err.message);
  } finally {
    button.disabled = false;
  }
}

function renderTiers(tiers) {
  const body = $("#plans-table tbody");
  for (const plan of tiers) {
    let row = planRows[plan.name];
    if (row) {
      if (!rowEdited(row)) setPlanRow(row, plan);
      continue;
    }
    const tr = document.createElement("tr");
    tr.dataset.tier = plan.name;
    cell(tr, plan.name);
    row = planRows[plan.name] = { tr, inputs: {}, loaded: {} };
    for (const [field] of PLAN_FIELDS) {
      const input = document.createElement("input");
      input.name = field;
      input.placeholder = field === "models" ? "no model" : "none";
      input.setAttribute("aria-label", plan.name + " " + field);
      row.inputs[field] = input;
      cell(tr, "").appendChild(input);
    }
    const save = document.createElement("button");
    save.type = "button";
    save.className = "save-plan";
    save.textContent = "Save";
    const thisRow = row;
    save.addEventListener("click", () => savePlan(plan.name, thisRow, save));
    cell(tr, "").appendChild(save);
    body.appendChild(tr);
    setPlanRow(row, plan);
  }
}

const price = (v) => (v === null || v === undefined ? "–" : String(v));

function renderCatalogue(rows) {
  const body = $("#catalogue tbody");
  body.replaceChildren();
  for (const m of rows) {
    const tr = document.createElement("tr");
    tr.dataset.model = m.model;
    cell(tr, m.model);
    cell(tr, m.display_name || "");
    cell(tr, String(m.weight), "num");
    cell(tr, price(m.price_in), "num");
    cell(tr, price(m.price_out), "num");
    if (m.available) cell(tr, "available");
    else cell(tr, "unavailable: " + m.reason, "unavailable");
    const toggle = document.createElement("button");
    toggle.type = "button";
    toggle.className = "toggle-model";
    toggle.textContent = m.enabled ? "Disable" : "Enable";
    toggle.addEventListener("click", async () => {
      toggle.disabled = true;
      try {
        await api("/admin/api/models/enabled", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ model: m.model, enabled: !m.enabled }),
        });
        sayPlans(m.model + (m.enabled ? " is disabled: no longer offered or run." : " is enabled."));
        await loadPlans();
      } catch (err) {
        sayPlans(m.model + ": " + err.message, "error");
        toggle.disabled = false;
      }
    });
    cell(tr, "").appendChild(toggle);
    body.appendChild(tr);
  }
}

function renderWeights(rows) {
  const body = $("#weights tbody");
  body.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    cell(tr, "No weight rules: every model counts 1 token per token.");
    body.appendChild(tr);
  }
  for (const w of rows) {
    const tr = document.createElement("tr");
    tr.dataset.pattern = w.pattern;
    cell(tr, w.pattern);
    cell(tr, String(w.weight), "num");
    cell(tr, w.matches.length ? w.matches.join(", ") : "none yet", "wrap");
    cell(tr, when(w.updated_at).slice(0, 16));
    body.appendChild(tr);
  }
}

const json = (v) => (v === null || v === undefined ? "–" : JSON.stringify(v));

function renderAudit(rows) {
  const body = $("#audit tbody");
  body.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    cell(tr, "No changes recorded yet.");
    body.appendChild(tr);
  }
  for (const a of rows) {
    const tr = document.createElement("tr");
    cell(tr, when(a.at));
    cell(tr, a.actor);
    cell(tr, a.action);
    cell(tr, a.target);
    cell(tr, json(a.before), "json");
    cell(tr, json(a.after), "json");
    body.appendChild(tr);
  }
}

async function loadPlans() {
  const p = (state.plans = await api("/admin/api/plans"));
  renderTiers(p.tiers);
  $("#plans-overrides").textContent = Object.entries(p.overrides)
    .map(([tier, o]) => o.variable + "=" + o.value + " puts the " + tier + " tier's tokens back at every start-up.")
    .join(" ");
  renderCatalogue(p.models);
  renderWeights(p.weights);
  renderAudit(p.audit);
}

function formBody(form) {
  const body = {};
  for (const [k, v] of new FormData(form)) body[k] = v;
  return body;
}

async function submitForm(form, path, done) {
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    const r = await api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(formBody(form)),
    });
    markInvalid(form, "");
    done(r);
    form.reset();
    await loadPlans();
  } catch (err) {
    sayPlans(err.message, "error");
    markInvalid(form, err.message);
  } finally {
    button.disabled = false;
  }
}

$("#weight-form").addEventListener("submit", (e) => {
  e.preventDefault();
  submitForm(e.target, "/admin/api/weights", (r) => {
    const text = r.pattern + ": weight " + r.weight + " (" + (r.matches.join(", ") || "no model yet") + ").";
    if (r.warnings.length) sayPlans(text + " Warning: " + r.warnings.join("; "), "warning");
    else sayPlans(text);
  });
});

$("#model-form").addEventListener("submit", (e) => {
  e.preventDefault();
  submitForm(e.target, "/admin/api/models", (m) =>
    sayPlans("Added " + m.model + (m.available ? " (offered)." : " (unavailable: " + m.reason + ")."))
  );
});

// ---- API keys ----------------------------------------------------------------------------

function sayKeys(text, kind) {
  const el = $("#keys-message");
  el.textContent = text || "";
  el.className = kind || "";
}

async function revokeKey(key, button) {
  if (!window.confirm("Revoke " + key.username + "'s key " + key.label + " (" + key.prefix + "…)?")) return;
  button.disabled = true;
  try {
    await api("/admin/api/keys/" + encodeURIComponent(key.id) + "/revoke", { method: "POST" });
    sayKeys("Revoked " + key.username + "'s key " + key.label + ".");
    await Promise.all([loadKeys(), loadPlans()]);
  } catch (err) {
    sayKeys("Not revoked: " + err.message, "error");
    button.disabled = false;
  }
}

async function loadKeys() {
  const k = (state.keys = await api("/admin/api/keys"));
  const body = $("#keys tbody");
  body.replaceChildren();
  if (!k.keys.length) {
    const tr = document.createElement("tr");
    cell(tr, "No API keys yet.");
    body.appendChild(tr);
  }
  for (const key of k.keys) {
    const tr = document.createElement("tr");
    tr.className = "key-" + key.state;
    tr.dataset.key = key.id;
    cell(tr, key.username);
    cell(tr, key.label);
    cell(tr, key.prefix + "…", "mono");
    cell(tr, num(key.tokens), "num");
    cell(tr, when(key.created_at).slice(0, 16));
    cell(tr, key.last_used_at ? when(key.last_used_at).slice(0, 16) : "never");
    cell(tr, key.expires_at ? when(key.expires_at).slice(0, 16) : "never");
    cell(tr, key.state);
    const td = cell(tr, "");
    if (key.state !== "revoked") {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "revoke-key";
      button.textContent = "Revoke";
      button.addEventListener("click", () => revokeKey(key, button));
      td.appendChild(button);
    }
    body.appendChild(tr);
  }
}

// ---- feedback ----------------------------------------------------------------------------

async function loadFeedback() {
  const rows = await api("/admin/api/feedback");
  const body = $("#feedback tbody");
  body.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    cell(tr, "No feedback yet.");
    body.appendChild(tr);
  }
  for (const f of rows) {
    const tr = document.createElement("tr");
    cell(tr, when(f.at).slice(0, 16));
    cell(tr, f.username || "–");
    cell(tr, f.thread || f.thread_id);
    cell(tr, f.value === "up" ? "👍" : "👎");
    cell(tr, f.comment || "");
    cell(tr, f.answer || "");
    body.appendChild(tr);
  }
}

// ---- start -------------------------------------------------------------------------------

Promise.all([loadSummary(), loadSeries(), loadUsers(), findLogUsers(""), loadLogs(0), loadFeedback(), loadPlans(), loadKeys()])
  .then(() => (document.body.dataset.loaded = "true"))
  .catch((e) => say(e.message, true));
