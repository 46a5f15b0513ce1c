// The account page: the signed-in user's API keys, from /account/api/*.
// What the page loaded is kept on window.vtaiAccount (not the new key's secret).
"use strict";

const state = (window.vtaiAccount = { keys: null });

const $ = (sel) => document.querySelector(sel);
const num = (v) => Number(v || 0).toLocaleString("en-US");
const when = (iso) => (iso ? iso.replace("T", " ").slice(0, 16) : "");

function say(text, isError) {
  const el = $("#message");
  el.textContent = text || "";
  el.className = isError ? "error" : "";
}

async function api(path, options) {
  const r = await fetch(path, { credentials: "same-origin", cache: "no-store", ...options });
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

// "label: at most 100 characters" names the form field first; mark that input.
function markInvalid(form, message) {
  for (const el of form.querySelectorAll(".invalid")) el.classList.remove("invalid");
  const m = /^([a-z_]+): /.exec(message || "");
  const input = m && form.querySelector('[name="' + m[1] + '"]');
  if (input) {
    input.classList.add("invalid");
    input.focus();
  }
}

async function revoke(key, button) {
  if (!window.confirm("Revoke the key " + key.label + " (" + key.prefix + "…)? Its next request is refused.")) return;
  button.disabled = true;
  try {
    await api("/account/api/keys/" + encodeURIComponent(key.id) + "/revoke", { method: "POST" });
    say("Revoked " + key.label + ".");
    await loadKeys();
  } catch (err) {
    say("Not revoked: " + err.message, true);
    button.disabled = false;
  }
}

async function loadKeys() {
  const k = (state.keys = await api("/account/api/keys"));
  $("#who").textContent = "signed in as " + k.username;
  $("#period").textContent =
    "Tokens are counted this " + k.period + (k.period === "lifetime" ? "" : ", from " + when(k.period_start).slice(0, 10)) + " (UTC).";
  const body = $("#keys tbody");
  body.replaceChildren();
  if (!k.keys.length) {
    const tr = document.createElement("tr");
    cell(tr, "No keys yet.");
    body.appendChild(tr);
  }
  for (const key of k.keys) {
    const tr = document.createElement("tr");
    tr.className = "state-" + key.state;
    tr.dataset.key = key.id;
    cell(tr, key.label);
    cell(tr, key.prefix + "…", "key");
    cell(tr, num(key.tokens), "num");
    cell(tr, when(key.created_at));
    cell(tr, key.last_used_at ? when(key.last_used_at) : "never");
    cell(tr, key.expires_at ? when(key.expires_at) : "never");
    cell(tr, key.state);
    const td = cell(tr, "");
    if (key.state !== "revoked") {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "revoke";
      button.textContent = "Revoke";
      button.addEventListener("click", () => revoke(key, button));
      td.appendChild(button);
    }
    body.appendChild(tr);
  }
}

function showKey(secret, notice) {
  $("#new-key-secret").textContent = secret;
  $("#new-key-notice").textContent = notice;
  $("#new-key").hidden = false;
}

function hideKey() {
  // The key leaves the page: nothing keeps it once this is done.
  $("#new-key-secret").textContent = "";
  $("#new-key").hidden = true;
}

$("#hide-key").addEventListener("click", hideKey);
$("#copy-key").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText($("#new-key-secret").textContent);
    say("Copied.");
  } catch (err) {
    say("Copy failed: select the key and copy it.", true);
  }
});

$("#create-key").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = e.target;
  const button = form.querySelector("button[type=submit]");
  const label = form.elements.label.value;
  const days = form.elements.expires_days.value.trim();
  button.disabled = true;
  try {
    const r = await api("/account/api/keys", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ label, expires_days: days === "" ? null : days }),
    });
    markInvalid(form, "");
    form.reset();
    showKey(r.secret, r.notice);
    say("Created " + r.key.label + ".");
    await loadKeys();
  } catch (err) {
    say("Not created: " + err.message, true);
    markInvalid(form, err.message);
  } finally {
    button.disabled = false;
  }
});

loadKeys()
  .then(() => (document.body.dataset.loaded = "true"))
  .catch((e) => say(e.message, true));
