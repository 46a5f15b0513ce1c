"""The SMTP send on its own, against a real SMTP server (aiosmtpd), and the input rules."""

from __future__ import annotations

import pytest

from tests.accounts.smtp import Inbox
from vtai.accounts import mail, rules
from vtai.settings import Settings


@pytest.fixture
def inbox():
    box = Inbox().start()
    yield box
    box.stop()


def smtp(inbox: Inbox, **overrides) -> Settings:
    values = dict(
        smtp_host="127.0.0.1",
        smtp_port=inbox.port,
        smtp_from="noreply@vtai.example",
        smtp_starttls=False,
    )
    return Settings(**(values | overrides))


async def test_a_message_arrives(inbox):
    await mail.send(smtp(inbox), "someone@example.com", "Hello", "a body\n")
    rcpts, msg = await inbox.next()
    assert rcpts == ["someone@example.com"]
    assert (msg["Subject"], msg["From"], msg.get_content().strip()) == (
        "Hello",
        "noreply@vtai.example",
        "a body",
    )
    assert msg["Message-ID"].endswith("@vtai.example>")


async def test_a_server_without_starttls_is_one_line_without_the_message(inbox):
    with pytest.raises(mail.MailError) as caught:
        await mail.send(smtp(inbox, smtp_starttls=True), "a@example.com", "S", "secret link")
    line = str(caught.value)
    assert "\n" not in line and "secret link" not in line
    assert line.startswith(f"mail to 127.0.0.1:{inbox.port} failed (SMTPNotSupportedError")
    assert line.endswith("check VTAI_SMTP_*")


async def test_mail_off_names_the_variables():
    with pytest.raises(mail.MailError, match="VTAI_SMTP_HOST and VTAI_SMTP_FROM"):
        await mail.send(Settings(), "a@example.com", "S", "B")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(" Alice@Example.COM\t", "alice@example.com"), ("b@c.io", "b@c.io")],
)
def test_emails_are_trimmed_and_lower_cased(value, expected):
    assert rules.email(value) == expected


@pytest.mark.parametrize("value", ["", "a", "a@b", "a b@c.io", "@c.io", "a@@c.io"])
def test_bad_emails_are_one_line_naming_the_field(value):
    with pytest.raises(rules.InputError) as caught:
        rules.email(value)
    assert str(caught.value).startswith("Email: ") and "\n" not in str(caught.value)
