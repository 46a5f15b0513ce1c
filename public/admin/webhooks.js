// Operator webhooks: /admin/api/webhooks as two tables (per URL; failing deliveries) and a
// retry button. Loaded after admin.js, whose helpers ($, api, cell, num, when, say) it uses.
"use strict";

function renderWebhooks(w) {
  const state = $("#webhooks-state");
  const parts = [];
  parts.push(
    w.enabled
      ? "Events go to " + w.configured.join(", ") + ", signed with VTAI_WEBHOOK_SECRET."
      : "Off: set VTAI_WEBHOOK_URLS and VTAI_WEBHOOK_SECRET to send events (docs/operations.md)."
  );
  if (w.local.length) parts.push(w.local.length + " event(s) wait in this process's own queue (sent while the database was down).");
  state.textContent = parts.join(" ");

  const ends = $("#webhooks-endpoints tbody");
  ends.replaceChildren();
  for (const e of w.endpoints) {
    const tr = document.createElement("tr");
    cell(tr, e.url, "wrap");
    cell(tr, e.active ? "active" : "not configured");
    cell(tr, num(e.delivered), "num");
    cell(tr, num(e.pending), "num");
    const failing = cell(tr, num(e.failing), "num");
    const failed = cell(tr, num(e.failed), "num");
    if (e.failing) failing.style.color = "var(--bad)";
    if (e.failed) failed.style.color = "var(--bad)";
    cell(tr, e.last_error ? when(e.last_error_at) + " " + e.last_error : "", "wrap");
    ends.appendChild(tr);
  }

  const fails = $("#webhooks-failures tbody");
  fails.replaceChildren();
  for (const f of w.failures) {
    const tr = document.createElement("tr");
    tr.dataset.event = f.event_id;
    cell(tr, when(f.created_at));
    cell(tr, f.type + " " + f.event_id.slice(0, 8));
    cell(tr, f.url, "wrap");
    cell(tr, num(f.attempts), "num");
    cell(tr, f.last_error || "", "wrap");
    cell(tr, f.failed_at ? "given up " + when(f.failed_at) : when(f.next_attempt_at));
    fails.appendChild(tr);
  }
  $("#webhooks-failures").hidden = !w.failures.length;
}

async function loadWebhooks() {
  renderWebhooks(await api("/admin/api/webhooks"));
}

$("#webhooks-retry").addEventListener("click", async () => {
  try {
    const r = await api("/admin/api/webhooks/retry", { method: "POST" });
    say(r.retried + " undelivered webhook deliveries are due now.");
    await loadWebhooks();
  } catch (e) {
    say("Webhooks: " + e.message, true);
  }
});

loadWebhooks()
  .then(() => (document.body.dataset.webhooksLoaded = "true"))
  .catch((e) => say("Webhooks: " + e.message, true));
