// Back from Stripe: wait for the webhook (GET /billing/status), then show the plan it set.
"use strict";

(function () {
  const query = new URLSearchParams(window.location.search);
  const session = query.get("session_id");
  const $ = (sel) => document.querySelector(sel);
  const num = (v) => Number(v || 0).toLocaleString("en-US");
  // Stripe usually sends its webhook within seconds; after this, the page stops asking.
  const GIVE_UP_MS = 120000;
  const started = Date.now();

  function plan(s) {
    const limit = s.token_limit == null ? "no token limit" : num(s.token_limit) + " tokens per " + s.period;
    return "Your plan: " + s.tier + " (" + limit + ").";
  }

  function done(text, s) {
    $("#state").textContent = text;
    if (s) $("#plan").textContent = plan(s);
    document.body.dataset.state = s ? s.state : "none";
  }

  async function poll() {
    const path = "/billing/status" + (session ? "?session_id=" + encodeURIComponent(session) : "");
    const r = await fetch(path, { credentials: "same-origin", cache: "no-store" });
    if (r.status === 401) {
      window.location.href = "/login";
      return;
    }
    const s = await r.json().catch(() => ({}));
    if (!r.ok) return done("This payment can't be checked: " + (s.detail || r.statusText) + ".");
    if (!session) return done("Back from billing.", s);
    if (s.state === "confirmed") return done("Payment confirmed. " + plan(s), s);
    if (s.state === "open") return done("The payment was not completed, so nothing changed.", s);
    if (Date.now() - started > GIVE_UP_MS) {
      return done("Stripe has the payment but has not confirmed it yet: your plan changes as soon as it does.", s);
    }
    $("#plan").textContent = plan(s) + " (before this payment)";
    window.setTimeout(() => poll().catch((e) => done(e.message)), 1500);
  }

  if (query.get("canceled")) done("The payment was cancelled: nothing was charged.");
  else poll().catch((e) => done(e.message));
})();
