"""Ratings and stored messages, attacked through the real server (`chainlit run vtai/main.py`).

Users log in with `POST /login` and chat over Chainlit's socket.io protocol
(tests/chainlit_client.py); ratings go through Chainlit's own `PUT /feedback` and
`DELETE /feedback` with the session cookie, as the browser sends them, and the database is
checked afterwards. The provider is tests/fake_provider.py (FAKE: real ones can't be reached
from here).
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import pytest

from tests.browser import running_app
from tests.chainlit_client import chat, login
from tests.conftest import add_user, create_database, drop_database
from tests.fake_provider import FakeProvider

pytestmark = pytest.mark.browser

PASSWORD = "correct horse battery"
LIMIT = 20_000  # VTAI_MAX_MESSAGE_CHARS for this server
RAW_DATABASE_WORDS = ("violates", "foreign key", "asyncpg", "constraint", "Traceback", "SQL")


@pytest.fixture(scope="module")
def provider():
    p = FakeProvider().start()
    yield p
    p.stop()


class App:
    def __init__(self, base: str, db_url: str):
        self.base = base
        self.db_url = db_url

    async def query(self, sql: str, *args) -> list:
        conn = await asyncpg.connect(self.db_url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def user(self):
        conn = await asyncpg.connect(self.db_url)
        try:
            return await add_user(conn)
        finally:
            await conn.close()

    async def http(self, user) -> httpx.AsyncClient:
        token = await login(self.base, user.username, PASSWORD)
        return httpx.AsyncClient(base_url=self.base, cookies={"access_token": token})

    async def answered_chat(self, user) -> tuple[str, str]:
        """The user chats once; returns (thread id, the stored answer's step id)."""
        async with await chat(self.base, user.username, PASSWORD) as client:
            reply = await client.send("Hello there")
            answer, thread_id = reply.answer, client.thread_id
        assert answer is not None and thread_id
        await self.wait(
            'select 1 from "Step" where id = $1 and type = $2', answer["id"], "assistant_message"
        )
        return thread_id, answer["id"]

    async def wait(self, sql: str, *args, timeout: float = 30.0) -> list:
        async with asyncio.timeout(timeout):
            while True:
                rows = await self.query(sql, *args)
                if rows:
                    return rows
                await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def app(pg_server, template_db, tmp_path_factory, provider):
    url = await create_database(pg_server, template_db)
    api_base = provider.url("script")
    env = {
        "VTAI_MODEL": "openai/fake",
        "OPENAI_API_BASE": api_base,
        "OPENAI_BASE_URL": api_base,
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "VTAI_MAX_TOKENS": "40",
        "VTAI_MAX_MESSAGE_CHARS": str(LIMIT),
    }
    async with running_app(url, tmp_path_factory.mktemp("feedback"), **env) as base:
        yield App(base, url)
    await drop_database(pg_server, url)


def rate(step_id: str, value: int = 1, comment: str | None = None, feedback_id=None) -> dict:
    feedback = {"forId": step_id, "value": value, "comment": comment}
    if feedback_id:
        feedback["id"] = feedback_id
    return {"feedback": feedback, "sessionId": str(uuid.uuid4())}


def assert_one_line(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and len(detail) < 120
    assert not any(word.lower() in detail.lower() for word in RAW_DATABASE_WORDS), detail


async def test_feedback_on_another_users_answer_is_refused(app):
    alice, mallory = await app.user(), await app.user()
    _, step_id = await app.answered_chat(alice)
    async with await app.http(alice) as http:
        r = await http.put("/feedback", json=rate(step_id, 1, "spot on"))
        assert r.status_code == 200, r.text
        feedback_id = r.json()["feedbackId"]
    before = [tuple(r) for r in await app.query('select * from "Feedback"')]
    assert [(row[4], row[5], row[6]) for row in before] == [("user_feedback", 1.0, "spot on")]

    async with await app.http(mallory) as http:
        attempts = [
            # A new rating on Alice's answer.
            http.put("/feedback", json=rate(step_id, 0, "wrong")),
            # Alice's rating, overwritten by its id.
            http.put("/feedback", json=rate(step_id, 0, "wrong", feedback_id=feedback_id)),
            # Alice's rating, deleted by its id.
            http.request("DELETE", "/feedback", json={"feedbackId": feedback_id}),
        ]
        for response in [await a for a in attempts]:
            assert_one_line(response, 404)
        # Mallory's own answer can't be used to move Alice's rating either.
        _, own_step = await app.answered_chat(mallory)
        r = await http.put("/feedback", json=rate(own_step, 0, feedback_id=feedback_id))
        assert_one_line(r, 404)
    async with httpx.AsyncClient(base_url=app.base) as anonymous:
        assert_one_line(await anonymous.put("/feedback", json=rate(step_id, 0)), 401)
        r = await anonymous.request("DELETE", "/feedback", json={"feedbackId": feedback_id})
        assert_one_line(r, 401)

    assert [tuple(r) for r in await app.query('select * from "Feedback"')] == before

    # The owner still rates, re-rates and deletes her own.
    async with await app.http(alice) as http:
        r = await http.put("/feedback", json=rate(step_id, 0, "on second thoughts", feedback_id))
        assert r.status_code == 200 and r.json()["feedbackId"] == feedback_id
        r = await http.request("DELETE", "/feedback", json={"feedbackId": feedback_id})
        assert r.status_code == 200, r.text
    assert await app.query('select * from "Feedback"') == []


async def test_feedback_on_missing_step_is_one_line_not_500(app):
    user = await app.user()
    _, step_id = await app.answered_chat(user)
    async with await app.http(user) as http:
        assert_one_line(await http.put("/feedback", json=rate(str(uuid.uuid4()))), 404)
        r = await http.request("DELETE", "/feedback", json={"feedbackId": str(uuid.uuid4())})
        assert_one_line(r, 404)
        r = await http.put(
            "/feedback", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert_one_line(r, 400)
        assert_one_line(await http.put("/feedback", json={"feedback": {}}), 400)
        # A comment is a message: over the limit it is refused, not stored.
        r = await http.put("/feedback", json=rate(step_id, 1, "c" * (LIMIT + 1)))
        assert_one_line(r, 413)
    assert await app.query('select * from "Feedback"') == []


async def test_oversize_user_message_not_stored_in_full(app):
    user = await app.user()
    async with await chat(app.base, user.username, PASSWORD) as client:
        await client.send("a first message that fits")
        for _ in range(3):
            await client.send("x" * 900_000)
        thread_id = client.thread_id
    rows = await app.wait(
        "select count(*) as n, max(length(output)) as longest, sum(length(output)) as total"
        ' from "Step" where "threadId" = $1 and type = $2 having count(*) >= 4',
        thread_id,
        "user_message",
    )
    assert rows[0]["longest"] <= LIMIT and rows[0]["total"] < 2_000
    # Nothing else in the database holds it either: the whole history is a few kilobytes.
    (size,) = await app.query(
        "select coalesce(sum(length(coalesce(output, '')) + length(coalesce(input, ''))"
        ' + length(metadata::text)), 0) as n from "Step"'
    )
    assert size["n"] < 50_000
