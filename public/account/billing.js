// The account page's plan: the plans on sale (/billing/plans), Upgrade and Manage billing.
// With billing off /billing/plans is 404 and the section stays hidden.
"use strict";

(function () {
  const $ = (sel) => document.querySelector(sel);

  function say(text, isError) {
    const el = $("#billing-message");
    el.textContent = text || "";
    el.className = isError ? "error" : "";
  }

  async function post(path, body) {
    const r = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      cache: "no-store",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
    });
    const answer = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(answer.detail || r.statusText);
    return answer;
  }

  async function choose(offer, button) {
    button.disabled = true;
    say("Opening " + offer.label + "…");
    try {
      const r = await post("/billing/checkout", { price: offer.price_id });
      if (r.url) {
        window.location.href = r.url;
        return;
      }
      say(r.message);
      await load();
    } catch (err) {
      say(err.message, true);
    } finally {
      button.disabled = false;
    }
  }

  async function manage(button) {
    button.disabled = true;
    try {
      const r = await post("/billing/portal");
      window.location.href = r.url;
    } catch (err) {
      say(err.message, true);
      button.disabled = false;
    }
  }

  async function load() {
    const r = await fetch("/billing/plans", { credentials: "same-origin", cache: "no-store" });
    if (!r.ok) return; // billing off (404) or signed out: account.js handles the latter
    const plans = await r.json();
    const sub = plans.subscription;
    let now = "You are on the " + plans.tier + " plan.";
    if (sub) {
      now += " Subscription " + sub.status;
      if (sub.current_period_end) {
        now += (sub.cancel_at_period_end ? ", ends " : ", renews ") + sub.current_period_end.slice(0, 10);
      }
      now += ".";
    }
    $("#plan-now").textContent = now;
    const box = $("#plans");
    box.replaceChildren();
    const offers = new Map(plans.offers.map((o) => [o.price_id, o]));
    for (const id of plans.upgrades) {
      const offer = offers.get(id);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "upgrade";
      button.dataset.price = id;
      button.textContent = "Upgrade: " + offer.label;
      button.addEventListener("click", () => choose(offer, button));
      box.appendChild(button);
    }
    if (!plans.upgrades.length) box.textContent = "No higher plan is on sale.";
    $("#manage-billing").hidden = !plans.manage;
    $("#billing").hidden = false;
    document.body.dataset.billing = "true";
  }

  $("#manage-billing").addEventListener("click", (e) => manage(e.target));
  load().catch((e) => say(e.message, true));
})();
