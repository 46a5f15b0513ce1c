"""Same-origin only, against the real `chainlit run vtai/main.py` and, where a browser's own
rules matter (CORS, cookies, CSP), in headless Chromium.

One app serves the whole module. Two small pages run on other ports of 127.0.0.1: a
"stranger" (any other page on the machine, which the admin's SameSite=lax cookie still
reaches) and a "friend" listed in VTAI_ALLOWED_ORIGINS. VTAI_PUBLIC_URL names the origin a
proxy would show the browser.
"""

from __future__ import annotations

import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import asyncpg
import httpx
import pytest
import socketio

from tests.browser import PASSWORD, browser_page, free_port, login, running_app, send
from tests.conftest import add_user, create_database, drop_database

pytestmark = pytest.mark.browser

PUBLIC_URL = "https://chat.example.test"
SOCKET = "/ws/socket.io/"
HEADERS = ("content-security-policy", "x-frame-options", "referrer-policy")


class _Page(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = b"<!doctype html><title>elsewhere</title><p>another origin</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _serve_page() -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def pages():
    friend, friend_origin = _serve_page()
    stranger, stranger_origin = _serve_page()
    yield friend_origin, stranger_origin
    friend.shutdown()
    stranger.shutdown()


@pytest.fixture(scope="module")
async def app(pg_server, template_db, pages, tmp_path_factory):
    """The running app, its database connection, and the accounts in it."""
    friend, stranger = pages
    url = await create_database(pg_server, template_db)
    conn = await asyncpg.connect(url)
    root = await add_user(conn, "root", admin=True)
    bob = await add_user(conn, "bob")
    try:
        async with running_app(
            url,
            tmp_path_factory.mktemp("web_security"),
            VTAI_ALLOWED_ORIGINS=friend,
            VTAI_PUBLIC_URL=PUBLIC_URL,
            VTAI_MAX_TOKENS="16",
        ) as base:
            async with httpx.AsyncClient(base_url=base) as http:
                r = await http.post("/login", data={"username": "root", "password": PASSWORD})
                assert r.status_code == 200, r.text
                cookie = http.cookies["access_token"]
            yield {
                "base": base,
                "conn": conn,
                "root": root,
                "bob": bob,
                "cookie": cookie,
                "friend": friend,
                "stranger": stranger,
            }
    finally:
        await conn.close()
        await drop_database(pg_server, url)


@pytest.fixture
async def admin_http(app):
    """An HTTP client holding the admin's cookie (the one a browser would send along)."""
    async with httpx.AsyncClient(
        base_url=app["base"], cookies={"access_token": app["cookie"]}, timeout=30
    ) as http:
        yield http


@pytest.fixture(scope="module")
async def admin_page(app):
    """Chromium with the admin logged in to the app (the cookie is now in the browser)."""
    async with browser_page() as page:
        violations: list[str] = []
        page.on(
            "console",
            lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
        )
        await page.add_init_script(
            "document.addEventListener('securitypolicyviolation', e =>"
            " (window.__csp = window.__csp || []).push("
            "   e.violatedDirective + ' ' + e.blockedURI))"
        )
        await login(page, app["base"], "root")
        page.csp_console = violations
        yield page


# JavaScript run in a page: what fetching the app with the user's cookie gives that page.
READ_WITH_COOKIE = """
async (base) => {
  const out = {};
  const tries = {
    users: [base + '/admin/api/users', {credentials: 'include'}],
    logs: [base + '/admin/api/logs', {credentials: 'include'}],
    threads: [base + '/project/threads', {
      method: 'POST', credentials: 'include',
      headers: {'content-type': 'application/json'},
      body: JSON.stringify({pagination: {first: 20}, filter: {}}),
    }],
  };
  for (const [name, [url, init]] of Object.entries(tries)) {
    try {
      const r = await fetch(url, init);
      out[name] = {status: r.status, body: (await r.text()).slice(0, 2000)};
    } catch (e) {
      out[name] = {blocked: String(e)};
    }
  }
  return out;
}
"""

OPEN_WEBSOCKET = """
(url) => new Promise(resolve => {
  const ws = new WebSocket(url);
  let opened = false;
  ws.onopen = () => { opened = true; };
  ws.onmessage = e => { resolve({opened, first: String(e.data)}); ws.close(); };
  ws.onclose = e => resolve({opened, closed: e.code});
  setTimeout(() => resolve({opened, timeout: true}), 10000);
})
"""


def _ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + SOCKET + "?EIO=4&transport=websocket"


async def test_page_on_another_port_cannot_read_admin_api_with_the_admins_cookie(app, admin_page):
    page = admin_page
    await page.goto(app["stranger"] + "/", wait_until="domcontentloaded")
    stranger = await page.evaluate(READ_WITH_COOKIE, app["base"])
    assert all("blocked" in v for v in stranger.values()), stranger

    # A page VTAI_ALLOWED_ORIGINS lists does read them, with the same cookie: the browser does
    # send the cookie across ports, and it is CORS that now keeps the stranger out.
    await page.goto(app["friend"] + "/", wait_until="domcontentloaded")
    friend = await page.evaluate(READ_WITH_COOKIE, app["base"])
    assert friend["users"]["status"] == 200 and '"root"' in friend["users"]["body"], friend
    assert friend["logs"]["status"] == 200 and friend["threads"]["status"] == 200, friend

    # And the app's own page, of course.
    await page.goto(app["base"] + "/public/favicon.svg", wait_until="domcontentloaded")
    own = await page.evaluate(READ_WITH_COOKIE, app["base"])
    assert {v.get("status") for v in own.values()} == {200}, own


async def test_page_on_another_port_cannot_change_a_tier_with_the_admins_cookie(app, admin_page):
    page = admin_page
    bob = app["bob"]
    await page.goto(app["stranger"] + "/", wait_until="domcontentloaded")
    # A "simple" request: no preflight, so only the server's own origin check stands between
    # the page and the change.
    await page.evaluate(
        """async ([base, id]) => {
          await fetch(base + '/admin/api/users/' + id + '/tier', {
            method: 'POST', mode: 'no-cors', credentials: 'include',
            headers: {'content-type': 'text/plain'}, body: '{"tier": "unlimited"}'});
          await fetch(base + '/logout', {method: 'POST', mode: 'no-cors', credentials: 'include'});
        }""",
        [app["base"], str(bob.id)],
    )
    assert await app["conn"].fetchval("select tier from profiles where id = $1", bob.id) == "free"
    # Still signed in: the logout was refused too.
    await page.goto(app["base"] + "/public/favicon.svg", wait_until="domcontentloaded")
    own = await page.evaluate(READ_WITH_COOKIE, app["base"])
    assert own["users"]["status"] == 200, own


async def test_websocket_from_a_page_on_another_port_is_refused(app, admin_page):
    page = admin_page
    await page.goto(app["stranger"] + "/", wait_until="domcontentloaded")
    stranger = await page.evaluate(OPEN_WEBSOCKET, _ws_url(app["base"]))
    assert stranger["opened"] is False and "first" not in stranger, stranger

    await page.goto(app["friend"] + "/", wait_until="domcontentloaded")
    friend = await page.evaluate(OPEN_WEBSOCKET, _ws_url(app["base"]))
    assert friend["opened"] and friend["first"].startswith("0{"), friend

    await page.goto(app["base"] + "/public/favicon.svg", wait_until="domcontentloaded")
    own = await page.evaluate(OPEN_WEBSOCKET, _ws_url(app["base"]))
    assert own["opened"] and own["first"].startswith("0{"), own


async def test_socketio_from_another_origin_is_refused(app):
    base, cookie = app["base"], app["cookie"]
    handshake = SOCKET + "?EIO=4&transport=polling"
    async with httpx.AsyncClient(base_url=base, cookies={"access_token": cookie}) as http:
        for origin in (app["stranger"], "null", "http://127.0.0.1", "https://evil.example"):
            r = await http.get(handshake, headers={"Origin": origin})
            assert r.status_code == 403, (origin, r.status_code, r.text)
        for origin in (base, app["friend"], PUBLIC_URL, None):
            headers = {"Origin": origin} if origin else {}
            r = await http.get(handshake, headers=headers)
            assert r.status_code == 200 and r.text.startswith("0{"), (origin, r.text)

    async def connect(origin: str | None, transport: str) -> socketio.AsyncClient:
        # Our own HTTP session, closed below: a refused client leaves its own one open.
        client = socketio.AsyncClient(reconnection=False, http_session=session)
        headers = {"Cookie": f"access_token={cookie}"}
        if origin:
            headers["Origin"] = origin
        await client.connect(
            base,
            socketio_path="/ws/socket.io",
            headers=headers,
            transports=[transport],
            auth={
                "sessionId": str(uuid.uuid4()),
                "clientType": "webapp",
                "userEnv": "{}",
                "chatProfile": None,
                "threadId": None,
            },
            wait_timeout=10,
        )
        return client

    async with aiohttp.ClientSession() as session:
        for transport in ("websocket", "polling"):
            with pytest.raises(socketio.exceptions.ConnectionError):
                await connect(app["stranger"], transport)
            for origin in (base, None):
                client = await connect(origin, transport)
                assert client.connected
                await client.disconnect()


async def test_state_changing_requests_from_another_origin_are_refused(app, admin_http):
    bob = app["bob"]
    path = f"/admin/api/users/{bob.id}/tier"
    for origin in (app["stranger"], "null", "http://localhost" + app["base"][-6:]):
        r = await admin_http.post(path, json={"tier": "unlimited"}, headers={"Origin": origin})
        assert r.status_code == 403, (origin, r.text)
    for route in ("/logout", "/project/threads", "/admin/api/balances/sync"):
        r = await admin_http.post(route, json={}, headers={"Origin": app["stranger"]})
        assert r.status_code == 403, (route, r.text)
    assert await app["conn"].fetchval("select tier from profiles where id = $1", bob.id) == "free"

    for origin, tier in ((app["base"], "basic"), (PUBLIC_URL, "premium"), (None, "free")):
        headers = {"Origin": origin} if origin else {}
        r = await admin_http.post(path, json={"tier": tier}, headers=headers)
        assert r.status_code == 200 and r.json()["tier"] == tier, (origin, r.text)


async def test_cors_answers_only_the_listed_origins(app, admin_http):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x"}
    r = await admin_http.options(
        "/project/threads", headers={"Origin": app["stranger"], **preflight}
    )
    assert "access-control-allow-origin" not in r.headers, r.headers
    r = await admin_http.get("/admin/api/users", headers={"Origin": app["stranger"]})
    assert "access-control-allow-origin" not in r.headers, r.headers

    r = await admin_http.options("/project/threads", headers={"Origin": app["friend"], **preflight})
    assert r.headers["access-control-allow-origin"] == app["friend"]
    r = await admin_http.get("/admin/api/users", headers={"Origin": app["friend"]})
    assert r.headers["access-control-allow-origin"] == app["friend"]
    assert r.headers["access-control-allow-credentials"] == "true"


async def test_responses_carry_csp_and_frame_headers(app, admin_http):
    anonymous = httpx.AsyncClient(base_url=app["base"])
    async with anonymous:
        responses = [
            await anonymous.get("/"),
            await anonymous.get("/login"),
            await anonymous.get("/admin"),
            await anonymous.get("/no/such/page"),
            await admin_http.get("/admin"),
            await admin_http.get("/admin/api/users"),
            await admin_http.get("/public/admin/admin.js"),
            await admin_http.get("/public/vendor/chart.umd.min.js"),
            await admin_http.get(SOCKET + "?EIO=4&transport=polling"),
            await admin_http.get(SOCKET + "?EIO=4&transport=polling", headers={"Origin": "null"}),
        ]
    for r in responses:
        where = f"{r.request.method} {r.request.url.path} {r.status_code}"
        csp = r.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, where
        assert "'unsafe-eval'" not in csp and "script-src 'self'" in csp, where
        assert r.headers.get("x-frame-options") == "DENY", where
        assert r.headers.get("referrer-policy") in ("same-origin", "strict-origin"), where
        assert r.headers.get("x-content-type-options") == "nosniff", where
        assert r.headers.get_list("content-security-policy") == [csp], where


async def test_chat_page_and_admin_work_under_the_csp(app, admin_page):
    page = admin_page
    page.csp_console.clear()
    await page.goto(app["base"] + "/", wait_until="domcontentloaded")
    await page.wait_for_selector("#chat-input", timeout=30_000)
    await page.get_by_role("button", name="Usage").first.wait_for(timeout=30_000)
    answer = await send(page, "Say hello.")
    assert "tokens used" in answer, answer
    chat_violations = await page.evaluate("window.__csp || []")

    await page.goto(app["base"] + "/admin", wait_until="domcontentloaded")
    await page.wait_for_selector("body[data-loaded=true]", timeout=30_000)
    assert await page.evaluate("Object.keys(Chart.instances).length") == 3
    admin_violations = await page.evaluate("window.__csp || []")

    assert chat_violations == [] and admin_violations == [], (chat_violations, admin_violations)
    assert page.csp_console == [], page.csp_console


async def test_the_app_cannot_be_framed_by_another_page(app, admin_page):
    page = admin_page
    await page.goto(app["stranger"] + "/", wait_until="domcontentloaded")
    await page.evaluate(
        """(url) => new Promise(resolve => {
          const f = document.createElement('iframe');
          f.src = url;
          f.onload = () => resolve();
          document.body.appendChild(f);
          setTimeout(resolve, 10000);
        })""",
        app["base"] + "/admin",
    )
    child = page.main_frame.child_frames
    assert len(child) == 1
    # Refused by frame-ancestors / X-Frame-Options: Chromium shows its error page instead.
    assert "VT.ai admin" not in await child[0].content()
    assert any("frame-ancestors" in m for m in page.csp_console), page.csp_console


@pytest.mark.parametrize(
    "query",
    [
        "to=9999-12-31",
        "from=9999-12-31",
        "from=1999-12-31",
        "to=2101-01-01",
        "from=0001-01-01",
        "from=2026-02-01&to=2026-01-01",
        "cursor=yesterday",
        "cursor=9999-12-31T23:59:59%2B00:00_1",
        "cursor=0001-01-01T00:00:00%2B00:00_1",
        "cursor=2026-01-01T00:00:00%2B00:00_99999999999999999999",
        "cursor=2026-01-01T00:00:00%2B00:00_-1",
        "cursor=2026-01-01T00:00:00_1",
        "cursor=_",
        "limit=lots",
    ],
)
async def test_admin_logs_to_9999_12_31_is_400_not_500(admin_http, query):
    for path in ("/admin/api/logs", "/admin/api/logs.csv"):
        if path.endswith(".csv") and query.startswith(("cursor", "limit")):
            continue  # the CSV takes neither
        r = await admin_http.get(f"{path}?{query}")
        assert r.status_code == 400, (path, query, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and len(detail) < 120, detail


async def test_admin_logs_at_the_edges_of_the_range_are_fine(admin_http):
    for query in ("from=2000-01-01&to=2100-12-31", "to=2100-12-31", "from=2000-01-01"):
        r = await admin_http.get(f"/admin/api/logs?{query}")
        assert r.status_code == 200 and isinstance(r.json()["rows"], list), (query, r.text)
        r = await admin_http.get(f"/admin/api/logs.csv?{query}")
        assert r.status_code == 200 and r.text.startswith("id,created_at"), (query, r.text)
    r = await admin_http.get("/admin/api/logs?cursor=2026-01-01T00:00:00%2B00:00_5")
    assert r.status_code == 200
