"""Issue #19's "Done when", in headless Chromium against the real app: a free user at the cap
clicks *Upgrade*, reaches Checkout, Stripe's signed events arrive, and the same open chat
answers on the new tier with the new limit under the answer. Stripe's hosted Checkout can't be
reached from here: the checkout page is the STAND-IN's (tests/stand_in_stripe.py), in front of
a real localstripe that holds the customer and the subscription. The events are signed the way
Stripe signs them and verified by the app with the real `stripe` library.

The same run checks that no Stripe secret reaches the browser (pages, scripts, API answers,
socket messages), the app's log, or request_logs.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.browser import ASSISTANT, browser_page, login, running_app, screenshot, send
from tests.conftest import add_user
from tests.stand_in_stripe import (
    SECRET_KEY,
    WEBHOOK_SECRET,
    StandInStripe,
    event,
    localstripe,
    sign,
)

pytestmark = pytest.mark.browser

PRICES = {"price_premium": "premium", "price_topup": {"topup_tokens": 50_000}}
PREMIUM = "Premium — 500,000 tokens/month — $20.00/month"
SECRETS = (SECRET_KEY, WEBHOOK_SECRET)


@pytest.fixture(scope="module")
def stand_in():
    with localstripe() as upstream:
        server = StandInStripe(upstream).start()
        try:
            with httpx.Client(
                base_url=server.base, headers={"Authorization": f"Bearer {SECRET_KEY}"}
            ) as http:
                for data in (
                    {"id": "price_premium", "unit_amount": 2000, "recurring[interval]": "month"},
                    {"id": "price_topup", "unit_amount": 500},
                ):
                    http.post("/v1/prices", data=data | {"currency": "usd"}).raise_for_status()
            yield server
        finally:
            server.stop()


async def deliver(base: str, evt: dict) -> None:
    body = json.dumps(evt)
    async with httpx.AsyncClient() as http:
        r = await http.post(
            base + "/billing/webhook",
            content=body,
            headers={"Stripe-Signature": sign(body), "Content-Type": "application/json"},
        )
    assert r.status_code != 404, "POST /billing/webhook is missing (vtai/billing/webhook.py)"
    assert r.status_code == 200, f"{evt['type']}: {r.status_code} {r.text}"


async def test_stand_in_upgrade_from_the_refusal_and_the_same_chat_goes_on_premium(
    db_url, conn, tmp_path, stand_in
):
    user = await add_user(conn, "payer")
    # Earlier this month the user spent the whole free quota.
    await conn.execute(
        "select vtai_record(jsonb_build_object('litellm_call_id', 'earlier', 'end_user',"
        " $1::text, 'status', 'success', 'model', 'local/smollm2-135m', 'prompt_tokens', 300))",
        str(user.id),
    )
    env = {
        "VTAI_LIMIT_FREE": "300",
        "VTAI_MAX_TOKENS": "24",
        "STRIPE_SECRET_KEY": SECRET_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "VTAI_STRIPE_PRICES": json.dumps(PRICES),
        "VTAI_STRIPE_API_BASE": stand_in.base,
    }
    frames: list[str] = []
    responses = []
    async with running_app(db_url, tmp_path, **env) as base, browser_page() as page:
        page.on("websocket", lambda ws: ws.on("framereceived", lambda p: frames.append(str(p))))
        page.context.on("response", lambda r: responses.append(r))
        await login(page, base, "payer")

        refusal = await send(page, "What is a tide?")
        assert "You have used your token quota" in refusal, refusal
        assert "upgrade: each plan below shows its price and limits" in refusal, refusal
        assert "ask the administrator" not in refusal
        upgrade = page.get_by_role("button", name=PREMIUM)
        await upgrade.wait_for(timeout=30_000)
        await page.get_by_role("button", name="Top-up — 50,000 tokens — $5.00").wait_for()
        await screenshot(page, "billing_refusal_upgrade")

        before = await page.locator(ASSISTANT).count()
        await upgrade.click()
        link = page.get_by_role("link", name="Open Stripe Checkout")
        await link.wait_for(timeout=30_000)
        assert await page.locator(ASSISTANT).count() > before
        async with page.context.expect_page() as opened:
            await link.click()
        checkout = await opened.value
        await checkout.wait_for_load_state("domcontentloaded")
        assert checkout.url.startswith(stand_in.base + "/checkout/cs_test_"), checkout.url
        session_id = checkout.url.rsplit("/", 1)[1]
        sent = stand_in.checkout_params[-1]
        assert sent["client_reference_id"] == str(user.id)
        assert sent["metadata"]["vtai_user"] == str(user.id)
        assert sent["success_url"] == f"{base}/billing/return?session_id={{CHECKOUT_SESSION_ID}}"

        # The customer pays; Stripe sends its events, signed.
        session, subscription = await stand_in.complete_checkout(session_id)
        await deliver(base, event("checkout.session.completed", session))
        await deliver(base, event("customer.subscription.created", subscription))

        # Stripe's way back: the return page sees the webhook's work.
        await checkout.goto(
            sent["success_url"].replace("{CHECKOUT_SESSION_ID}", session_id),
            wait_until="domcontentloaded",
        )
        await checkout.wait_for_selector("body[data-state=confirmed]", timeout=30_000)
        confirmed = await checkout.inner_text("main")
        assert "Payment confirmed" in confirmed and "premium (500,000 tokens per month)" in (
            confirmed
        ), confirmed
        # /account offers what is left to buy and the portal.
        await checkout.goto(base + "/account", wait_until="domcontentloaded")
        await checkout.wait_for_selector("body[data-billing=true]", timeout=30_000)
        assert await checkout.get_by_role("button", name="Manage billing").is_visible()
        assert await checkout.locator("button.upgrade").all_inner_texts() == [
            "Upgrade: Top-up — 50,000 tokens — $5.00"
        ]

        # The same open chat, no reload: the next message is answered on the new tier.
        answer = await send(page, "Say hello.")
        await screenshot(page, "billing_premium_answer")
        # /usage offers what is left to buy, and the portal now that there is a customer.
        usage = await send(page, "/usage")
        await page.get_by_role("button", name="Top-up — 50,000 tokens — $5.00").last.wait_for()
        await page.get_by_role("button", name="Manage billing").click()
        portal = page.get_by_role("link", name="Open the billing portal")
        await portal.wait_for(timeout=30_000)
        assert (await portal.get_attribute("href")).startswith(stand_in.base + "/portal/bps_")
        assert stand_in.portal_params[-1]["customer"] == session["customer"]
        pages = [await page.content(), await checkout.content()]
        bodies = []
        for r in responses:
            if r.url.startswith(base):
                try:
                    bodies.append((await r.body()).decode(errors="replace"))
                except Exception:
                    pass  # a redirect or a stream has no body to read
    assert "premium tier" in answer and "/ 500,000 tokens used" in answer, answer
    assert "premium tier" in usage and "upgrade: each plan below" in usage, usage
    assert await conn.fetchval("select tier from profiles where id = $1", user.id) == "premium"
    assert len(stand_in.checkout_params) == 1

    seen = "\n".join([*pages, *bodies, *frames, (tmp_path / "app.log").read_text()])
    logged = await conn.fetch("select row_to_json(r)::text as row from request_logs r")
    seen += "\n".join(r["row"] for r in logged)
    assert bodies and frames and logged
    for secret in SECRETS:
        assert secret not in seen, "a Stripe secret left the server"
