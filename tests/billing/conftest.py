"""Billing fixtures: a real local Stripe server (localstripe), Stripe's webhook signing, the
app's billing routes served over real HTTP, and event payloads in the 2025-03-31.basil shapes.

localstripe speaks an older API version: its subscriptions keep current_period_* on the
subscription and name the item's Price `plan`. `basil_subscription()` moves those onto the item
as basil does, so the webhook reads the shape Stripe sends today. localstripe has no Checkout
sessions: `stand_in_checkout_session()` builds one (a STAND-IN, named so wherever it is used).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from tests.conftest import make_settings
from vtai.billing import client as billing_client
from vtai.billing import webhook
from vtai.services import Services

ROOT = Path(__file__).resolve().parents[2]
LOCALSTRIPE = ROOT / ".venv" / "bin" / "localstripe"
SECRET_KEY = "sk_test_vtai_billing_tests"
WEBHOOK_SECRET = "whsec_vtai_billing_tests_0123456789"
API_VERSION = billing_client.API_VERSION


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def localstripe():
    """The base URL of a localstripe server of this session's own, on a free port.

    `--from-scratch`: localstripe keeps its objects in /tmp/localstripe.pickle, shared by every
    localstripe on the machine; this one starts empty instead of from another run's objects.
    """
    port = free_port()
    proc = subprocess.Popen(
        [str(LOCALSTRIPE), "--port", str(port), "--from-scratch"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"localstripe exited with {proc.returncode} on port {port}")
            try:
                httpx.get(f"{base}/v1/customers", auth=(SECRET_KEY, ""), timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"localstripe did not answer on port {port}") from None
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def stripe_api(localstripe):
    """An httpx client on localstripe, authenticated with the test secret key."""
    async with httpx.AsyncClient(base_url=localstripe, auth=(SECRET_KEY, "")) as client:
        yield LocalStripe(client)


class LocalStripe:
    """The few localstripe calls the tests make; every id made unique to the test."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client

    async def post(self, path: str, **data) -> dict:
        response = await self.client.post(path, data=data)
        body = response.json()
        if response.status_code >= 400:
            raise RuntimeError(f"localstripe {path}: {body}")
        return body

    async def get(self, path: str) -> dict:
        response = await self.client.get(path)
        response.raise_for_status()
        return response.json()

    async def card(self) -> str:
        card = await self.post(
            "/v1/payment_methods",
            type="card",
            **{
                "card[number]": "4242424242424242",
                "card[exp_month]": "12",
                "card[exp_year]": "2030",
                "card[cvc]": "123",
            },
        )
        return card["id"]

    async def customer(self, user_id) -> dict:
        """A customer with a card that pays, as Checkout leaves one."""
        card = await self.card()
        return await self.post(
            "/v1/customers",
            payment_method=card,
            **{
                "metadata[vtai_user_id]": str(user_id),
                "invoice_settings[default_payment_method]": card,
            },
        )

    async def price(self, tier: str, amount: int = 1000) -> str:
        """A monthly Price (localstripe: a Plan) with a fresh id."""
        price_id = f"price_{tier}_{uuid.uuid4().hex[:8]}"
        await self.post(
            "/v1/plans",
            id=price_id,
            amount=amount,
            currency="usd",
            interval="month",
            **{"product[name]": tier},
        )
        return price_id

    async def subscription(self, customer: str, price: str, user_id) -> dict:
        return await self.post(
            "/v1/subscriptions",
            customer=customer,
            **{"items[0][plan]": price, "metadata[vtai_user_id]": str(user_id)},
        )

    async def paid_payment_intent(self, amount: int) -> dict:
        intent = await self.post(
            "/v1/payment_intents", amount=amount, currency="usd", payment_method=await self.card()
        )
        return await self.post(f"/v1/payment_intents/{intent['id']}/confirm")

    async def refund(self, payment_intent: str, amount: int) -> dict:
        """The charge after refunding `amount` more of it."""
        await self.post("/v1/refunds", payment_intent=payment_intent, amount=amount)
        intent = await self.get(f"/v1/payment_intents/{payment_intent}")
        charge = intent["latest_charge"]
        return await self.get(f"/v1/charges/{charge['id'] if isinstance(charge, dict) else charge}")


def basil_subscription(sub: dict, **changes) -> dict:
    """A localstripe subscription in the 2025-03-31.basil shape: each item carries its Price as
    `price` and its current_period_start/end; the subscription no longer does."""
    out = copy.deepcopy(sub)
    start = out.pop("current_period_start", None)
    end = out.pop("current_period_end", None)
    out.pop("plan", None)
    for item in out["items"]["data"]:
        plan = item.pop("plan", None) or {}
        item["price"] = {
            "id": plan.get("id"),
            "object": "price",
            "currency": plan.get("currency"),
            "unit_amount": plan.get("amount"),
            "recurring": {"interval": plan.get("interval"), "interval_count": 1},
            "product": plan.get("product"),
        }
        item.setdefault("current_period_start", start)
        item.setdefault("current_period_end", end)
    period = changes.pop("period", None)
    if period is not None:
        for item in out["items"]["data"]:
            item["current_period_start"], item["current_period_end"] = period
    out.update(changes)
    return out


def stand_in_checkout_session(
    *, user_id, customer: str | None, mode: str, payment_intent=None, price=None, subscription=None
) -> dict:
    """A STAND-IN for a Checkout Session (localstripe has none), in the basil shape."""
    session = {
        "id": f"cs_test_{uuid.uuid4().hex}",
        "object": "checkout.session",
        "mode": mode,
        "status": "complete",
        "payment_status": "paid",
        "client_reference_id": str(user_id),
        "customer": customer,
        "payment_intent": payment_intent,
        "subscription": subscription,
        "metadata": {"vtai_user_id": str(user_id)},
        "livemode": False,
    }
    if price is not None:
        session["metadata"]["vtai_price"] = price
    return session


def invoice(subscription: str, customer: str, status: str) -> dict:
    """An invoice in the basil shape: its subscription under parent.subscription_details."""
    return {
        "id": f"in_{uuid.uuid4().hex[:14]}",
        "object": "invoice",
        "customer": customer,
        "status": status,
        "parent": {
            "type": "subscription_details",
            "subscription_details": {"subscription": subscription, "metadata": {}},
        },
    }


def event(kind: str, obj: dict, created: int | None = None) -> dict:
    """An event as Stripe delivers it to an endpoint pinned to API_VERSION."""
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "api_version": API_VERSION,
        "created": int(time.time()) if created is None else created,
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": kind,
    }


def sign(body: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """Stripe-Signature as Stripe computes it: HMAC-SHA256 over `{t}.{body}`."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


@dataclass
class WebhookApp:
    """The billing webhook served by uvicorn on a real socket, over a real database."""

    url: str
    services: object
    http: httpx.AsyncClient

    async def send(self, evt: dict, *, secret: str = WEBHOOK_SECRET, timestamp=None, header=...):
        body = json.dumps(evt).encode()
        headers = {"content-type": "application/json"}
        if header is ...:
            header = sign(body, secret, timestamp)
        if header is not None:
            headers["stripe-signature"] = header
        return await self.http.post(self.url, content=body, headers=headers)

    async def ok(self, evt: dict) -> dict:
        response = await self.send(evt)
        assert response.status_code == 200, response.text
        return response.json()


async def serve(app: FastAPI):
    """(server, task, base URL): uvicorn on a socket bound before it starts, so a request can
    be sent at once (the kernel queues it until the server accepts)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    return server, task, sock, f"http://127.0.0.1:{port}"


def billing_settings(db_url, data_dir, **overrides):
    values = dict(
        stripe_secret_key=SECRET_KEY,
        stripe_webhook_secret=WEBHOOK_SECRET,
        stripe_prices={},
        billing_grace_days=7,
    )
    values.update(overrides)
    return make_settings(db_url, data_dir, **values)


@pytest.fixture
def prices():
    """VTAI_STRIPE_PRICES of the test (webhook_app reads it live)."""
    return {}


@pytest.fixture
async def webhook_app(db_url, tmp_path, prices, monkeypatch):
    services = await Services.start(billing_settings(db_url, tmp_path), replay=False)
    # The test's own dict, unvalidated and shared: a Price a fixture or the test adds after the
    # app started is mapped too.
    services.settings = services.settings.model_copy(update={"stripe_prices": prices})
    monkeypatch.setattr(webhook, "_services", lambda: services)
    app = FastAPI()
    webhook.register(app)
    server, task, sock, base = await serve(app)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            yield WebhookApp(base + webhook.PATH, services, http)
    finally:
        server.should_exit = True
        await task
        sock.close()
        await services.stop()
