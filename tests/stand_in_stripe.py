"""A STAND-IN for Stripe's hosted Checkout and customer portal, which can't be reached from
here, in front of a real local Stripe server (localstripe, PyPI) for everything else.

localstripe 1.15 serves customers, plans, subscriptions, invoices and payments, but has no
Checkout sessions, no billing portal, and no Prices (it predates them: its subscription items
carry a `plan`). This server answers what localstripe lacks and forwards every other /v1/*
request to it unchanged:

- POST /v1/checkout/sessions, GET /v1/checkout/sessions/{id}: sessions shaped like Stripe's,
  with a `url` on this server (GET /checkout/{id}, a page a browser can land on); the params
  each call sent are kept in `checkout_params`.
- POST /v1/billing_portal/sessions: a portal session, its params kept in `portal_params`.
- POST /v1/prices, GET /v1/prices/{id}: prices kept here; a recurring one is also made a
  localstripe Plan of the same id, so subscriptions to it are real localstripe subscriptions.
- /v1/subscriptions: `items[n][price]` is sent to localstripe as `items[n][plan]`; an update's
  `proration_behavior` (localstripe's update knows only `prorate`) is kept in
  `subscription_updates` and sent as `prorate`; every subscription answered gains, per item,
  the `price` and the `current_period_start`/`current_period_end` of API version
  2025-03-31.basil.

`complete_checkout()` plays the customer paying: it makes the customer (if the session had
none), a card, and the real localstripe subscription, and marks the session complete. Tests
that use this server say `stand_in` in their names. Webhook payloads are built by `event()` and
signed by `sign()` exactly as Stripe signs them; the app verifies them with the real library.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from aiohttp import ClientSession, web

from tests.background_server import BackgroundServer

ROOT = Path(__file__).resolve().parent.parent
LOCALSTRIPE = ROOT / ".venv" / "bin" / "localstripe"
API_VERSION = "2025-03-31.basil"
# localstripe accepts any sk_test_ key; the tests' secrets are recognisable in any output.
SECRET_KEY = "sk_test_standin_" + "k" * 24
WEBHOOK_SECRET = "whsec_standin_" + "w" * 24


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def localstripe():
    """A real localstripe on a free port, from scratch; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [str(LOCALSTRIPE), "--port", str(port), "--from-scratch"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"localstripe exited: {proc.stderr.read().decode()[-500:]}")
            try:
                request = urllib.request.Request(
                    base + "/v1/customers", headers={"Authorization": f"Bearer {SECRET_KEY}"}
                )
                with urllib.request.urlopen(request, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("localstripe did not start within 30 s") from None
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def unflatten(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (`a[b][0][c]=v`) as nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        head, _, rest = key.partition("[")
        path = [head] + ([p.rstrip("]") for p in rest.split("[")] if rest else [])
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value

    def lists(node):
        if isinstance(node, dict):
            if node and all(k.isdigit() for k in node):
                return [lists(node[k]) for k in sorted(node, key=int)]
            return {k: lists(v) for k, v in node.items()}
        return node

    return lists(root)


def sign(payload: str | bytes, secret: str = WEBHOOK_SECRET, at: int | None = None) -> str:
    """The Stripe-Signature header Stripe sends with `payload`."""
    body = payload.decode() if isinstance(payload, bytes) else payload
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def event(kind: str, obj: dict, created: int | None = None) -> dict:
    """A webhook event of API version 2025-03-31.basil around `obj`."""
    return {
        "id": "evt_" + secrets.token_hex(12),
        "object": "event",
        "api_version": API_VERSION,
        "created": created or int(time.time()),
        "type": kind,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "data": {"object": obj},
    }


class StandInStripe(BackgroundServer):
    def __init__(self, localstripe_url: str) -> None:
        super().__init__()
        self.upstream = localstripe_url
        self.checkout_params: list[dict] = []
        self.portal_params: list[dict] = []
        self.subscription_updates: list[dict] = []
        self.sessions: dict[str, dict] = {}
        self.prices: dict[str, dict] = {}

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/checkout/sessions", self._create_session)
        app.router.add_get("/v1/checkout/sessions/{id}", self._get_session)
        app.router.add_post("/v1/billing_portal/sessions", self._create_portal)
        app.router.add_post("/v1/prices", self._create_price)
        app.router.add_get("/v1/prices/{id}", self._get_price)
        app.router.add_get("/checkout/{id}", self._page)
        app.router.add_get("/portal/{id}", self._page)
        app.router.add_route("*", "/v1/{tail:.*}", self._forward)
        return app

    # --- what localstripe lacks ----------------------------------------------------------

    async def _create_session(self, request: web.Request) -> web.Response:
        params = unflatten(parse_qsl(await request.text(), keep_blank_values=True))
        self.checkout_params.append(params)
        sid = "cs_test_" + secrets.token_hex(12)
        now = int(time.time())
        session = {
            "id": sid,
            "object": "checkout.session",
            "mode": params.get("mode"),
            "status": "open",
            "payment_status": "unpaid",
            "url": f"{self.base}/checkout/{sid}",
            "client_reference_id": params.get("client_reference_id"),
            "customer": params.get("customer"),
            "customer_email": params.get("customer_email"),
            "metadata": params.get("metadata") or {},
            "success_url": params.get("success_url"),
            "cancel_url": params.get("cancel_url"),
            "subscription": None,
            "payment_intent": None,
            "livemode": False,
            "created": now,
            "expires_at": now + 86400,
        }
        self.sessions[sid] = session | {"_params": params}
        return web.json_response(session)

    async def _get_session(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return _error(404, "No such checkout.session", "resource_missing")
        return web.json_response({k: v for k, v in session.items() if not k.startswith("_")})

    async def _create_portal(self, request: web.Request) -> web.Response:
        params = unflatten(parse_qsl(await request.text(), keep_blank_values=True))
        self.portal_params.append(params)
        pid = "bps_" + secrets.token_hex(12)
        return web.json_response(
            {
                "id": pid,
                "object": "billing_portal.session",
                "customer": params.get("customer"),
                "return_url": params.get("return_url"),
                "url": f"{self.base}/portal/{pid}",
                "livemode": False,
                "created": int(time.time()),
            }
        )

    async def _create_price(self, request: web.Request) -> web.Response:
        params = unflatten(parse_qsl(await request.text(), keep_blank_values=True))
        pid = params.get("id") or "price_" + secrets.token_hex(8)
        recurring = params.get("recurring")
        price = {
            "id": pid,
            "object": "price",
            "active": True,
            "currency": params["currency"],
            "unit_amount": int(params["unit_amount"]),
            "recurring": {
                "interval": recurring["interval"],
                "interval_count": int(recurring.get("interval_count", 1)),
            }
            if recurring
            else None,
            "type": "recurring" if recurring else "one_time",
            "product": None,
            "livemode": False,
            "metadata": {},
        }
        if recurring:
            plan = {
                "id": pid,
                "amount": price["unit_amount"],
                "currency": price["currency"],
                "interval": recurring["interval"],
                "product[name]": (params.get("product_data") or {}).get("name", pid),
            }
            async with ClientSession() as http:
                async with http.post(
                    f"{self.upstream}/v1/plans",
                    data=plan,
                    headers={"Authorization": request.headers.get("Authorization", "")},
                ) as r:
                    if r.status != 200:
                        return web.Response(status=r.status, body=await r.read())
                    price["product"] = (await r.json())["product"]
        self.prices[pid] = price
        return web.json_response(price)

    async def _get_price(self, request: web.Request) -> web.Response:
        price = self.prices.get(request.match_info["id"])
        if price is None:
            return _error(404, "No such price", "resource_missing")
        return web.json_response(price)

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(
            text=f"<!doctype html><title>Stand-in Stripe</title><h1>Stand-in Stripe</h1>"
            f"<p id='session'>{request.match_info['id']}</p>",
            content_type="text/html",
        )

    # --- localstripe, with Prices on subscriptions --------------------------------------

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        path = request.path
        if path.startswith("/v1/subscriptions") and request.method == "POST":
            body = self._to_plans(path, body)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("authorization", "content-type", "idempotency-key")
        }
        async with ClientSession() as http:
            async with http.request(
                request.method,
                self.upstream + path,
                params=request.query,
                data=body or None,
                headers=headers,
            ) as r:
                status, raw = r.status, await r.read()
        try:
            answer = json.loads(raw)
        except ValueError:
            return web.Response(status=status, body=raw)
        return web.json_response(self.with_prices(answer), status=status)

    def _to_plans(self, path: str, body: bytes) -> bytes:
        pairs = parse_qsl(body.decode(), keep_blank_values=True)
        update = path.count("/") > 2
        out = []
        for key, value in pairs:
            if key.startswith("items[") and key.endswith("[price]"):
                key = key[: -len("[price]")] + "[plan]"
            if update and key == "proration_behavior":
                self.subscription_updates.append({"path": path, key: value})
                if value in ("create_prorations", "always_invoice"):
                    out.append(("prorate", "true"))
                continue
            if update and key == "payment_behavior":
                # localstripe's update doesn't know it; the stand-in records it
                self.subscription_updates.append({"path": path, key: value})
                continue
            out.append((key, value))
        if update and not any(k == "proration_behavior" for k, _ in pairs):
            self.subscription_updates.append({"path": path})
        return urlencode(out).encode()

    def with_prices(self, answer: Any) -> Any:
        """Subscriptions as API version basil shows them: per item, its price and period."""
        if isinstance(answer, dict):
            if answer.get("object") == "list":
                answer["data"] = [self.with_prices(o) for o in answer.get("data", [])]
            elif answer.get("object") == "subscription":
                for item in (answer.get("items") or {}).get("data", []):
                    plan = item.get("plan") or {}
                    item["price"] = self.prices.get(plan.get("id")) or {
                        "id": plan.get("id"),
                        "object": "price",
                        "unit_amount": plan.get("amount"),
                        "currency": plan.get("currency"),
                        "recurring": {"interval": plan.get("interval"), "interval_count": 1},
                        "type": "recurring",
                    }
                    item["current_period_start"] = answer.get("current_period_start")
                    item["current_period_end"] = answer.get("current_period_end")
        return answer

    # --- the customer, paying ------------------------------------------------------------

    async def complete_checkout(self, session_id: str) -> tuple[dict, dict]:
        """Pay for a subscription session as its customer would: (the session, now complete,
        and the real localstripe subscription, basil-shaped)."""
        session = self.sessions[session_id]
        params = session["_params"]
        if session["mode"] != "subscription":
            raise NotImplementedError("the stand-in completes subscription sessions only")
        auth = {"Authorization": f"Bearer {SECRET_KEY}"}
        async with httpx.AsyncClient(base_url=self.base, headers=auth) as http:

            async def post(path: str, data: dict) -> dict:
                r = await http.post(path, data=data)
                r.raise_for_status()
                return r.json()

            customer = session["customer"]
            if not customer:
                made = {"email": session["customer_email"]} if session["customer_email"] else {}
                customer = (await post("/v1/customers", made))["id"]
            card = await post(
                "/v1/payment_methods",
                {
                    "type": "card",
                    "card[number]": "4242424242424242",
                    "card[exp_month]": "12",
                    "card[exp_year]": "2035",
                    "card[cvc]": "123",
                },
            )
            await post(f"/v1/payment_methods/{card['id']}/attach", {"customer": customer})
            await post(
                f"/v1/customers/{customer}",
                {"invoice_settings[default_payment_method]": card["id"]},
            )
            meta = (params.get("subscription_data") or {}).get("metadata") or {}
            subscription = await post(
                "/v1/subscriptions",
                {
                    "customer": customer,
                    "items[0][price]": params["line_items"][0]["price"],
                    **{f"metadata[{k}]": v for k, v in meta.items()},
                },
            )
        session.update(
            status="complete",
            payment_status="paid",
            customer=customer,
            subscription=subscription["id"],
        )
        public = {k: v for k, v in session.items() if not k.startswith("_")}
        return public, subscription


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response(
        {"error": {"type": "invalid_request_error", "message": message, "code": code}},
        status=status,
    )
