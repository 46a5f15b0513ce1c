"""Sign-up, password change and reset by email with VT.ai's own accounts, through the real
running app (`chainlit run`), a real Postgres, and a real SMTP server (aiosmtpd) for the mail."""

from __future__ import annotations

import asyncio
import re
import uuid
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from tests.accounts.smtp import Inbox
from tests.browser import PASSWORD, running_app
from tests.conftest import add_user, create_database, drop_database
from vtai.accounts import password, reset, signup
from vtai.db import accounts

NEW = "a brand new passphrase"


@pytest.fixture(scope="module")
def inbox():
    box = Inbox().start()
    yield box
    box.stop()


@pytest.fixture(scope="module")
async def app(pg_server, template_db, tmp_path_factory, inbox):
    url = await create_database(pg_server, template_db)
    env = {
        "VTAI_SIGNUP": "on",
        "VTAI_SMTP_HOST": "127.0.0.1",
        "VTAI_SMTP_PORT": str(inbox.port),
        "VTAI_SMTP_FROM": "VT.ai <noreply@vtai.example>",
        "VTAI_SMTP_STARTTLS": "off",
        # The test client stands behind a trusted proxy, so each test picks its address and
        # the throttle's address budget is its own.
        "VTAI_TRUSTED_PROXIES": "127.0.0.1/32",
    }
    try:
        async with running_app(url, tmp_path_factory.mktemp("accounts-app"), **env) as base:
            yield base, url
    finally:
        await drop_database(pg_server, url)


@pytest.fixture
async def db(app):
    c = await asyncpg.connect(app[1])
    yield c
    await c.close()


@pytest.fixture
async def http(app):
    """A client from an address of its own (X-Forwarded-For through the trusted proxy)."""
    addr = f"198.19.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"
    async with httpx.AsyncClient(
        base_url=app[0], timeout=30, headers={"X-Forwarded-For": addr}
    ) as client:
        yield client


def new_email() -> str:
    return f"Person.{uuid.uuid4().hex[:8]}@Example.COM"


def message(r: httpx.Response) -> str:
    """The one-line message of a page."""
    found = re.search(r'<p class="msg[^"]*" role="status">([^<]*)</p>', r.text)
    assert found, r.text[:500]
    return found.group(1).replace("&#x27;", "'")


async def login_status(base: str, username: str, password: str) -> int:
    async with httpx.AsyncClient(base_url=base) as client:
        r = await client.post("/login", data={"username": username, "password": password})
        return r.status_code


async def logged_in(base: str, username: str, password: str = PASSWORD) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=base, timeout=30)
    r = await client.post("/login", data={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return client


# --- sign-up -------------------------------------------------------------------------------


async def test_signup_makes_a_free_user_who_logs_in_with_the_email(app, http, db):
    base, _ = app
    form = await http.get("/signup")
    assert (
        form.status_code == 200 and 'name="email"' in form.text and 'name="password"' in form.text
    )
    email = new_email()
    r = await http.post("/signup", data={"email": f"  {email} ", "password": PASSWORD})
    assert r.status_code == 201 and message(r) == signup.CREATED
    row = await db.fetchrow(
        "select p.username, p.email, p.tier, p.is_admin, c.password_hash from profiles p"
        " join vtai_private.credentials c on c.profile_id = p.id where p.email = $1",
        email.lower(),
    )
    assert (row["username"], row["tier"], row["is_admin"]) == (email.lower(), "free", False)
    assert row["password_hash"].startswith("$argon2")
    assert await login_status(base, email.lower(), PASSWORD) == 200
    assert await login_status(base, email.lower(), "not the password") == 401


async def test_signup_refuses_a_taken_email_in_any_case_with_one_line(app, http, db):
    email = new_email()
    assert (
        await http.post("/signup", data={"email": email, "password": PASSWORD})
    ).status_code == 201
    again = await http.post("/signup", data={"email": email.upper(), "password": "other password"})
    assert again.status_code == 400 and message(again) == signup.TAKEN
    # What was typed is still in the form.
    assert f'value="{email.lower()}"' in again.text
    assert (
        await db.fetchval("select count(*) from profiles where lower(email) = $1", email.lower())
        == 1
    )
    # An operator's user named like the email holds it too.
    held = (await add_user(db, name=new_email().lower())).username
    r = await http.post("/signup", data={"email": held, "password": PASSWORD})
    assert r.status_code == 400 and message(r) == signup.TAKEN


@pytest.mark.parametrize(
    ("email", "pw", "words"),
    [
        ("", PASSWORD, "Email: enter your email address."),
        ("not-an-email", PASSWORD, "Email: 'not-an-email' is not an email address."),
        ("a" * 60 + "@example.com", PASSWORD, "Email: at most 64 characters"),
        ("short@example.com", "short", "New password: at least 8 characters."),
    ],
)
async def test_signup_bad_input_is_one_line_and_keeps_the_email(app, http, db, email, pw, words):
    r = await http.post("/signup", data={"email": email, "password": pw})
    assert r.status_code == 400 and message(r).startswith(words), message(r)
    assert "\n" not in message(r)
    if email:
        assert f'value="{email.lower()}"' in r.text
    assert await db.fetchval("select count(*) from profiles where email = $1", email) == 0


async def test_signup_is_throttled_per_address_and_per_email(app, db):
    base, _ = app
    addr = f"198.18.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"
    async with httpx.AsyncClient(base_url=base, headers={"X-Forwarded-For": addr}) as client:
        # An address gets the login throttle's 10 free attempts; every sign-up counts.
        for _ in range(10):
            r = await client.post("/signup", data={"email": new_email(), "password": PASSWORD})
            assert r.status_code == 201, message(r)
        late = new_email()
        r = await client.post("/signup", data={"email": late, "password": PASSWORD})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert message(r).startswith("Too many attempts from here: try again in")
    assert f'value="{late.lower()}"' in r.text
    assert await db.fetchval("select count(*) from profiles where email = $1", late.lower()) == 0
    # In the login throttle's own table, under a name of its own and the address.
    name_key = await db.fetchval(
        "select (public.vtai_login_keys($1, null))[1]", f"signup:{late.lower()}"
    )
    assert (
        await db.fetchval(
            "select count(*) from vtai_private.login_throttle where key in ($1, $2)",
            name_key,
            f"addr:{addr}",
        )
        == 2
    )

    # One email from many addresses: 3 free attempts, as a login name.
    email = new_email()
    statuses = []
    for i in range(4):
        headers = {"X-Forwarded-For": f"198.17.{i}.{uuid.uuid4().int % 250 + 1}"}
        async with httpx.AsyncClient(base_url=base, headers=headers) as client:
            r = await client.post("/signup", data={"email": email, "password": PASSWORD})
            statuses.append(r.status_code)
    assert statuses == [201, 400, 400, 429]


# --- password change ---------------------------------------------------------------------


async def test_password_change_needs_the_current_password_and_ends_every_login(app, db):
    base, _ = app
    user = await add_user(db)
    client = await logged_in(base, user.username)
    other = await logged_in(base, user.username)
    try:
        page = await client.get("/account/password")
        assert page.status_code == 200 and 'name="current"' in page.text

        wrong = await client.post(
            "/account/password", data={"current": "wrong", "new": NEW, "again": NEW}
        )
        assert wrong.status_code == 400 and message(wrong) == password.WRONG
        differ = await client.post(
            "/account/password", data={"current": PASSWORD, "new": NEW, "again": NEW + "x"}
        )
        assert (
            differ.status_code == 400 and message(differ) == "New password: the two entries differ."
        )
        assert await login_status(base, user.username, PASSWORD) == 200

        done = await client.post(
            "/account/password", data={"current": PASSWORD, "new": NEW, "again": NEW}
        )
        assert done.status_code == 200 and message(done) == password.DONE
        assert "access_token=" in done.headers.get("set-cookie", "")  # cleared
        assert await login_status(base, user.username, PASSWORD) == 401
        assert await login_status(base, user.username, NEW) == 200
        # The other browser's login has ended too: the page sends it to sign in.
        r = await other.get("/account/password")
        assert r.status_code == 303 and r.headers["location"] == "/login"
    finally:
        await client.aclose()
        await other.aclose()


async def test_password_change_refuses_strangers_and_other_origins(app, db):
    base, _ = app
    async with httpx.AsyncClient(base_url=base) as stranger:
        r = await stranger.get("/account/password")
        assert r.status_code == 303 and r.headers["location"] == "/login"
        r = await stranger.post(
            "/account/password", data={"current": "x", "new": NEW, "again": NEW}
        )
        assert r.status_code == 401
    user = await add_user(db)
    client = await logged_in(base, user.username)
    try:
        r = await client.post(
            "/account/password",
            data={"current": PASSWORD, "new": NEW, "again": NEW},
            headers={"Origin": "http://evil.example"},
        )
        assert r.status_code == 403
    finally:
        await client.aclose()
    assert await login_status(base, user.username, PASSWORD) == 200


# --- reset by email ----------------------------------------------------------------------


async def signed_up(http, email: str) -> None:
    r = await http.post("/signup", data={"email": email, "password": PASSWORD})
    assert r.status_code == 201, message(r)


async def test_reset_mails_a_link_that_sets_the_password_once(app, http, db, inbox):
    base, _ = app
    email = new_email()
    await signed_up(http, email)
    client = await logged_in(base, email.lower())
    try:
        assert (await http.get("/reset")).status_code == 200
        r = await http.post("/reset", data={"email": email.upper()})
        assert r.status_code == 200 and message(r) == reset.SENT

        msg = await inbox.to(email.lower())
        assert msg["Subject"] == reset.SUBJECT and "noreply@vtai.example" in msg["From"]
        link = Inbox.link(msg)
        assert link.startswith(base + "/reset/confirm?token=")
        token = link.split("token=", 1)[1]
        # Stored only as its sha256, with an hour to live.
        row = await db.fetchrow(
            "select * from password_resets where user_id = (select id"
            " from profiles where email = $1)",
            email.lower(),
        )
        assert row["token_hash"] != token and len(row["token_hash"]) == 64
        assert 3500 < (row["expires_at"] - row["created_at"]).total_seconds() <= 3600

        form = await http.get(urlsplit(link).path + "?" + urlsplit(link).query)
        assert form.status_code == 200 and 'name="again"' in form.text
        assert form.headers["referrer-policy"] == "no-referrer"
        short = await http.post(
            "/reset/confirm", data={"token": token, "password": "x", "again": "x"}
        )
        assert short.status_code == 400 and message(short).startswith("New password:")
        done = await http.post(
            "/reset/confirm", data={"token": token, "password": NEW, "again": NEW}
        )
        assert done.status_code == 200 and message(done) == reset.DONE
        assert await login_status(base, email.lower(), NEW) == 200
        assert await login_status(base, email.lower(), PASSWORD) == 401
        # The login made with the old password has ended.
        assert (await client.get("/account/password")).status_code == 303

        again = await http.post(
            "/reset/confirm",
            data={"token": token, "password": "another one!", "again": "another one!"},
        )
        assert again.status_code == 400 and message(again) == reset.DEAD
        assert (await http.get("/reset/confirm", params={"token": token})).status_code == 400
        assert await login_status(base, email.lower(), NEW) == 200
    finally:
        await client.aclose()


async def test_an_expired_link_is_refused(app, http, db, inbox):
    email = new_email()
    await signed_up(http, email)
    await http.post("/reset", data={"email": email})
    token = Inbox.link(await inbox.to(email.lower())).split("token=", 1)[1]
    await db.execute(
        "update password_resets set expires_at = now() - interval '1 second'"
        " where user_id = (select id from profiles where email = $1)",
        email.lower(),
    )
    r = await http.post("/reset/confirm", data={"token": token, "password": NEW, "again": NEW})
    assert r.status_code == 400 and message(r) == reset.DEAD
    assert await login_status(app[0], email.lower(), PASSWORD) == 200


async def test_unknown_and_disabled_emails_get_the_same_answer_and_no_mail(app, http, db, inbox):
    unknown = new_email().lower()
    disabled = new_email()
    await signed_up(http, disabled)
    await accounts.set_disabled(db, disabled.lower(), True)
    known = new_email()
    await signed_up(http, known)

    answers = [await http.post("/reset", data={"email": e}) for e in (unknown, disabled, known)]
    assert {r.status_code for r in answers} == {200}
    assert len({r.text for r in answers}) == 1
    # The known one's mail arrives; nothing went out before it for the other two, which
    # were asked first.
    await inbox.to(known.lower())
    assert not inbox.received_for(unknown) and not inbox.received_for(disabled.lower())
    assert (
        await db.fetchval(
            "select count(*) from password_resets r join profiles p on p.id = r.user_id"
            " where p.email = $1",
            disabled.lower(),
        )
        == 0
    )


async def test_a_link_stops_working_when_the_user_is_disabled(app, http, db, inbox):
    email = new_email()
    await signed_up(http, email)
    await http.post("/reset", data={"email": email})
    token = Inbox.link(await inbox.to(email.lower())).split("token=", 1)[1]
    await accounts.set_disabled(db, email.lower(), True)
    r = await http.post("/reset/confirm", data={"token": token, "password": NEW, "again": NEW})
    assert r.status_code == 400 and message(r) == reset.DEAD
    await accounts.set_disabled(db, email.lower(), False)
    assert await login_status(app[0], email.lower(), PASSWORD) == 200


async def test_reset_requests_are_throttled_per_email(app, db, inbox):
    email = new_email()
    statuses = []
    for i in range(4):
        headers = {"X-Forwarded-For": f"198.16.{i}.{uuid.uuid4().int % 250 + 1}"}
        async with httpx.AsyncClient(base_url=app[0], headers=headers) as client:
            r = await client.post("/reset", data={"email": email})
            statuses.append(r.status_code)
    assert statuses == [200, 200, 200, 429]
    assert message(r).startswith("Too many attempts from here")


async def test_bad_reset_input_is_one_line(app, http):
    r = await http.post("/reset", data={"email": "nobody"})
    assert r.status_code == 400 and message(r) == "Email: 'nobody' is not an email address."
    assert 'value="nobody"' in r.text
    r = await http.post("/reset/confirm", data={"token": "made-up", "password": NEW, "again": NEW})
    assert r.status_code == 400 and message(r) == reset.DEAD


async def test_concurrent_reset_requests_each_get_their_mail(app, http, db, inbox):
    emails = [new_email() for _ in range(3)]
    for email in emails:
        await signed_up(http, email)
    answers = await asyncio.gather(*(http.post("/reset", data={"email": e}) for e in emails))
    assert {r.status_code for r in answers} == {200}
    for email in emails:
        assert (await inbox.to(email.lower()))["To"] == email.lower()
