"""HTTP routes of vtai.accounts: /signup, /reset, /reset/confirm and /account/password.

Plain forms, rendered on the server (vtai.accounts.pages). Every answer to a form is one line
above the form again, with what was typed kept (but passwords); the status says what happened
(400 bad input, 404 sign-up off, 429 throttled with Retry-After, 503 not available here).
State-changing requests from another origin are refused (vtai.admin.auth.same_origin), as on
/account; the session cookie is SameSite=lax on top of that.

No `from __future__ import annotations`: FastAPI must see the route annotations as objects.
"""

import logging

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from vtai.accounts import mail, password, reset, rules, signup
from vtai.accounts.gotrue import GotrueUnavailable
from vtai.accounts.pages import field, form, hidden, page
from vtai.accounts.session import signed_in
from vtai.accounts.throttle import Throttled
from vtai.admin.auth import NotSignedIn, same_origin

log = logging.getLogger(__name__)

UNAVAILABLE = "This can't be done right now (the sign-in service is not answering): try later."
# Fills the reset form from the fragment of Supabase Auth's default recovery link, which the
# server never sees. Served from here, not inline, so the page's CSP stays script-src 'self'.
CONFIRM_JS = """
document.addEventListener("DOMContentLoaded", function () {
  var f = new URLSearchParams(location.hash.slice(1));
  var t = document.getElementById("access_token");
  if (t && f.get("access_token")) t.value = f.get("access_token");
  if (f.get("error_description")) {
    var p = document.createElement("p");
    p.className = "msg bad";
    p.textContent = f.get("error_description");
    document.querySelector("h1").after(p);
  }
  history.replaceState(null, "", location.pathname + location.search);
});
"""


def _services():
    from vtai.ui import chat

    return chat.services()


def _origin(request: Request, settings) -> str:
    # Never the request's Host header: anyone can forge it, and the victim's mail would then
    # link to the forger's site with a live token. VTAI_PUBLIC_URL, else the first allowed
    # origin, else where `make run` serves the app.
    if settings.public_url:
        return settings.public_url
    if settings.allowed_origins:
        return settings.allowed_origins[0]
    return f"http://{settings.chainlit_host}:{settings.chainlit_port}"


async def _form(request: Request) -> dict[str, str]:
    try:
        data = await request.form()
    except Exception:
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)}


def _signup_form(email: str = "") -> str:
    return form(
        "/signup",
        "Create account",
        field("email", "Email", "email", email, "email"),
        field(
            "password",
            f"Password (at least {rules.MIN_PASSWORD} characters)",
            "password",
            auto="new-password",
        ),
    )


def _reset_form(email: str = "") -> str:
    return form("/reset", "Send me a link", field("email", "Email", "email", email, "email"))


def _confirm_form(token: str = "", token_hash: str = "", supabase: bool = False) -> str:
    fields = [
        field(
            "password",
            f"New password (at least {rules.MIN_PASSWORD} characters)",
            "password",
            auto="new-password",
        ),
        field("again", "New password again", "password", auto="new-password"),
    ]
    if supabase:
        fields += [hidden("token_hash", token_hash), hidden("access_token", "")]
    else:
        fields.append(hidden("token", token))
    return form("/reset/confirm", "Set password", *fields)


def _change_form() -> str:
    return form(
        "/account/password",
        "Change password",
        field("current", "Current password", "password", auto="current-password"),
        field(
            "new",
            f"New password (at least {rules.MIN_PASSWORD} characters)",
            "password",
            auto="new-password",
        ),
        field("again", "New password again", "password", auto="new-password"),
    )


def _refusal(title: str, exc: Exception, form_html: str, links=(("/login", "Sign in"),)):
    if isinstance(exc, Throttled):
        return page(
            title,
            message=str(exc),
            bad=True,
            form=form_html,
            links=links,
            status=429,
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, GotrueUnavailable):
        log.error("%s", exc)
        return page(title, message=UNAVAILABLE, bad=True, form=form_html, links=links, status=503)
    return page(title, message=str(exc), bad=True, form=form_html, links=links, status=400)


REFUSED = (rules.InputError, Throttled, GotrueUnavailable)
TO_LOGIN = (("/login", "Sign in"), ("/reset", "Forgot your password?"))


def build_router() -> APIRouter:
    router = APIRouter(dependencies=[Depends(same_origin)], include_in_schema=False)

    @router.get("/accounts/options")
    async def options():
        """What the login page may link to (a script there can ask)."""
        settings = _services().settings
        return JSONResponse({"signup": settings.signup, "reset": reset.available(settings)})

    # --- sign-up ---------------------------------------------------------------------------

    @router.get("/signup")
    async def signup_page():
        if not _services().settings.signup:
            return page("Sign up", message=signup.OFF, bad=True, status=404)
        return page("Sign up", form=_signup_form(), links=TO_LOGIN)

    @router.post("/signup")
    async def signup_post(request: Request):
        services = _services()
        if not services.settings.signup:
            return page("Sign up", message=signup.OFF, bad=True, status=404)
        data = await _form(request)
        email = data.get("email", "")
        try:
            done = await signup.sign_up(
                services,
                email,
                data.get("password"),
                _origin(request, services.settings) + "/login",
            )
        except REFUSED as exc:
            return _refusal(
                "Sign up", exc, _signup_form(rules.normalise_email(email)[:254]), TO_LOGIN
            )
        return page("Sign up", message=done, status=201)

    # --- reset -----------------------------------------------------------------------------

    @router.get("/reset")
    async def reset_page():
        if not reset.available(_services().settings):
            return page("Reset password", message=mail.OFF, bad=True, status=503)
        return page("Reset password", form=_reset_form())

    @router.post("/reset")
    async def reset_post(request: Request):
        services = _services()
        if not reset.available(services.settings):
            return page("Reset password", message=mail.OFF, bad=True, status=503)
        data = await _form(request)
        email = data.get("email", "")
        try:
            done = await reset.request(services, email, _origin(request, services.settings))
        except REFUSED as exc:
            return _refusal("Reset password", exc, _reset_form(rules.normalise_email(email)[:254]))
        return page("Reset password", message=done)

    @router.get("/reset/confirm.js")
    async def confirm_js():
        return Response(
            CONFIRM_JS,
            media_type="text/javascript",
            headers={"Cache-Control": "no-cache"},
        )

    @router.get("/reset/confirm")
    async def confirm_page(request: Request):
        services = _services()
        settings = services.settings
        if not reset.available(settings):
            return page("Set a new password", message=mail.OFF, bad=True, status=503)
        q = request.query_params
        if settings.supabase_auth:
            return page(
                "Set a new password",
                form=_confirm_form(token_hash=q.get("token_hash", ""), supabase=True),
                script="/reset/confirm.js",
            )
        token = q.get("token", "")
        if not await reset.usable(services, token):
            return page(
                "Set a new password",
                message=reset.DEAD,
                bad=True,
                links=(("/reset", "Ask for a new link"),),
                status=400,
            )
        return page("Set a new password", form=_confirm_form(token=token))

    @router.post("/reset/confirm")
    async def confirm_post(request: Request):
        services = _services()
        settings = services.settings
        if not reset.available(settings):
            return page("Set a new password", message=mail.OFF, bad=True, status=503)
        data = await _form(request)
        token, token_hash = data.get("token", ""), data.get("token_hash", "")
        try:
            done = await reset.confirm(
                services,
                data.get("password"),
                data.get("again"),
                token=token,
                token_hash=token_hash,
                access_token=data.get("access_token", ""),
            )
        except REFUSED as exc:
            if str(exc) == reset.DEAD:
                return page(
                    "Set a new password",
                    message=reset.DEAD,
                    bad=True,
                    links=(("/reset", "Ask for a new link"),),
                    status=400,
                )
            supabase = settings.supabase_auth
            again = _confirm_form(token=token, token_hash=token_hash, supabase=supabase)
            return _refusal("Set a new password", exc, again)
        return page("Set a new password", message=done)

    # --- change ----------------------------------------------------------------------------

    @router.get("/account/password")
    async def change_page(request: Request):
        try:
            await signed_in(_services(), request)
        except NotSignedIn:
            return RedirectResponse("/login", status_code=303)
        return page(
            "Change password", form=_change_form(), links=(("/account", "Account"), ("/", "Chat"))
        )

    @router.post("/account/password")
    async def change_post(request: Request):
        services = _services()
        try:
            user = await signed_in(services, request)
        except NotSignedIn:
            return page("Change password", message="Sign in first.", bad=True, status=401)
        data = await _form(request)
        try:
            done = await password.change(
                services, user, data.get("current"), data.get("new"), data.get("again")
            )
        except REFUSED as exc:
            return _refusal("Change password", exc, _change_form(), (("/account", "Account"),))
        response = page("Change password", message=done)
        _clear_cookie(request, response)
        return response

    return router


def _clear_cookie(request: Request, response: Response) -> None:
    # The login this cookie holds has just ended; the browser may as well forget it.
    from chainlit.auth.cookie import clear_auth_cookie

    clear_auth_cookie(request, response)


def register(app: FastAPI) -> None:
    """Add this package's routes to Chainlit's FastAPI app, ahead of its catch-all page.

    Calling it again (Chainlit's --watch re-imports main.py) replaces the routes.
    """
    app.router.routes[:] = [r for r in app.router.routes if not getattr(r, "vtai_accounts", False)]
    before = len(app.router.routes)
    app.include_router(build_router())
    added = app.router.routes[before:]
    for route in added:
        route.vtai_accounts = True
    del app.router.routes[before:]
    app.router.routes[0:0] = added
