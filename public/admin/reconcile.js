// The ledger against the bill: /admin/api/reconciliation as a chart and a table.
// Loaded after admin.js, whose helpers ($, api, cell, usd, when, draw, say, state) it uses.
"use strict";

const money = (v) => (v === null ? "–" : usd(v));
const signed = (v) => (v === null ? "–" : (Number(v) < 0 ? "−" : "+") + usd(Math.abs(Number(v))));
const pct = (v) => (v === null ? "n/a" : (Number(v) > 0 ? "+" : "") + Number(v).toFixed(2) + "%");

function renderReconcileChart(r) {
  // Oldest day first; the providers that report what they charged (the others have no figure).
  const rows = r.rows.filter((x) => x.provider_usd !== null).reverse();
  const box = $("#chart-reconcile").parentElement;
  // Nothing to compare yet: no empty chart (and no Chart instance) until there is.
  box.hidden = !rows.length;
  if (!rows.length) return;
  const providers = [...new Set(rows.map((x) => x.provider))];
  const labels = [...new Set(rows.map((x) => x.day))];
  const datasets = [];
  const colours = ["#2563eb", "#059669", "#7c3aed"];
  providers.forEach((p, i) => {
    const byDay = Object.fromEntries(rows.filter((x) => x.provider === p).map((x) => [x.day, x]));
    const pick = (key) => labels.map((d) => (byDay[d] && byDay[d][key] !== null ? Number(byDay[d][key]) : null));
    const c = colours[i % colours.length];
    const name = providers.length > 1 ? p + " " : "";
    datasets.push(
      { type: "bar", label: name + "ledger $", data: pick("ledger_usd"), backgroundColor: c, yAxisID: "usd" },
      { type: "bar", label: name + "provider $", data: pick("provider_usd"), backgroundColor: "#93c5fd", yAxisID: "usd" },
      { type: "line", label: name + "drift %", data: pick("drift_percent"), borderColor: "#b91c1c", yAxisID: "pct", spanGaps: true }
    );
  });
  draw("chart-reconcile", {
    type: "bar",
    data: { labels, datasets },
    options: {
      scales: {
        usd: { position: "left", beginAtZero: true, title: { display: true, text: "USD" } },
        pct: { position: "right", title: { display: true, text: "drift %" }, grid: { drawOnChartArea: false } },
      },
    },
  });
}

function renderReconcileTable(r) {
  const body = $("#reconcile-table tbody");
  body.replaceChildren();
  if (!r.rows.length) {
    const tr = document.createElement("tr");
    cell(tr, "Nothing reconciled yet: a day is reconciled after it ends (UTC), at the next balance sync.");
    body.appendChild(tr);
  }
  for (const x of r.rows) {
    const tr = document.createElement("tr");
    tr.dataset.provider = x.provider;
    tr.dataset.day = x.day;
    cell(tr, x.day);
    cell(tr, x.provider);
    cell(tr, usd(x.ledger_usd), "num");
    if (x.provider_usd === null) {
      // No provider figure: say why instead of showing a zero that looks like a match.
      const td = cell(tr, x.note || "", "wrap");
      td.colSpan = 5;
    } else {
      cell(tr, money(x.provider_usd), "num");
      cell(tr, signed(x.drift_usd), "num");
      cell(tr, pct(x.drift_percent), "num");
      cell(tr, when(x.window_start).slice(0, 16) + " → " + when(x.window_end).slice(0, 16));
      const alert = cell(tr, x.alert ? "drift alert" + (x.alert_event ? " (webhook sent)" : "") : "ok");
      if (x.alert) alert.style.color = "var(--bad)";
    }
    body.appendChild(tr);
  }
}

function renderReconcileProviders(r) {
  const machine = r.providers.filter((p) => p.spend_api).map((p) => p.provider);
  const byHand = r.providers.filter((p) => !p.spend_api).map((p) => p.provider + " (" + p.note + ")");
  const parts = [];
  if (machine.length) parts.push("Checked against the provider's own figures: " + machine.join(", ") + ".");
  if (byHand.length) parts.push("Not checkable by machine: " + byHand.join("; ") + ".");
  parts.push("A day alerts at a drift of " + r.alert_percent + "% and $" + r.alert_min_usd + " or more (VTAI_DRIFT_ALERT_PERCENT, VTAI_DRIFT_ALERT_MIN_USD).");
  $("#reconcile-providers").textContent = parts.join(" ");
}

async function loadReconciliation() {
  const r = (state.reconciliation = await api("/admin/api/reconciliation?days=30"));
  renderReconcileProviders(r);
  renderReconcileTable(r);
  renderReconcileChart(r);
}

loadReconciliation()
  .then(() => (document.body.dataset.reconcileLoaded = "true"))
  .catch((e) => say("Ledger against the bill: " + e.message, true));
