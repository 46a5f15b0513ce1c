// The admin dashboard: reads /admin/api/*, draws with the vendored Chart.js.
// Everything the page loaded is kept on window.vtaiAdmin, which the browser test inspects.
"use strict";

const state = (window.vtaiAdmin = { summary: null, series: null, users: null, logs: null });
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

async function loadUsers() {
  const u = (state.users = await api("/admin/api/users"));
  const body = $("#users tbody");
  body.replaceChildren();
  for (const user of u.users) {
    const tr = document.createElement("tr");
    tr.dataset.user = user.username;
    cell(tr, user.username + (user.is_admin ? " (admin)" : ""));
    const td = cell(tr, "");
    const select = document.createElement("select");
    select.className = "tier";
    for (const t of u.tiers) select.add(new Option(t.name, t.name, false, t.name === user.tier));
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
    body.appendChild(tr);
  }
  fillSelect($("#log-filter [name=user]"), u.users.map((x) => [x.id, x.username]));
  fillSelect($("#log-filter [name=model]"), u.models.map((m) => [m, m || "(none)"]));
}

function fillSelect(select, pairs) {
  const keep = select.value;
  select.replaceChildren(new Option("all", ""));
  for (const [value, label] of pairs) select.add(new Option(label, value));
  select.value = keep;
}

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

Promise.all([loadSummary(), loadSeries(), loadUsers(), loadLogs(0), loadFeedback()])
  .then(() => (document.body.dataset.loaded = "true"))
  .catch((e) => say(e.message, true));
