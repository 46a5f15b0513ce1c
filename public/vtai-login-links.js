// Links under Chainlit's login form to the account pages the server has turned on
// (/accounts/options): "Create an account" with VTAI_SIGNUP=on, "Forgot your password?" when
// mail (or Supabase Auth) can send a reset link. Chainlit renders the form with React, so the
// links are put back whenever it renders the form again.
(function () {
  let options = null;

  function place() {
    if (location.pathname !== "/login" || !options) return;
    const form = document.querySelector("form");
    if (!form || form.parentElement.querySelector(".vtai-login-links")) return;
    const links = document.createElement("p");
    links.className = "vtai-login-links";
    links.style.cssText = "display:flex;gap:1rem;justify-content:center;margin-top:1rem";
    for (const [on, href, text] of [
      [options.signup, "/signup", "Create an account"],
      [options.reset, "/reset", "Forgot your password?"],
    ]) {
      if (!on) continue;
      const a = document.createElement("a");
      a.href = href;
      a.textContent = text;
      links.appendChild(a);
    }
    if (links.childElementCount) form.insertAdjacentElement("afterend", links);
  }

  fetch("/accounts/options", { credentials: "same-origin" })
    .then((r) => (r.ok ? r.json() : null))
    .then((found) => {
      options = found;
      place();
      new MutationObserver(place).observe(document.body, { childList: true, subtree: true });
    })
    .catch(() => {});
})();
