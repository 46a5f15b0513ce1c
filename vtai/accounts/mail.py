"""Sending one email over SMTP (VTAI_SMTP_*), off the event loop.

smtplib blocks, so each send runs in a worker thread (asyncio.to_thread): a slow or dead mail
server holds a thread for at most TIMEOUT seconds, never the chats on the event loop.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

TIMEOUT = 20.0
# What the reset page says when mail is off (settings.email is false).
OFF = (
    "Password reset by email is off on this server: the operator sets VTAI_SMTP_HOST and "
    "VTAI_SMTP_FROM to turn it on."
)


class MailError(Exception):
    """The message was not accepted; str() is one line for the operator's log."""


def message(settings, to: str, subject: str, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = settings.smtp_from
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=settings.smtp_from.rpartition("@")[2] or None)
    msg.set_content(body)
    return msg


def _send(settings, msg: EmailMessage) -> None:
    try:
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=TIMEOUT) as smtp:
            if settings.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if settings.smtp_user:
                password = settings.smtp_password
                smtp.login(settings.smtp_user, password.get_secret_value() if password else "")
            smtp.send_message(msg)
    except (smtplib.SMTPException, OSError) as exc:
        # The class and the server's words, never the message (it holds a reset link).
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise MailError(
            f"mail to {settings.smtp_host}:{settings.smtp_port} failed "
            f"({type(exc).__name__}{': ' + detail[:200] if detail else ''}): check VTAI_SMTP_*"
        ) from None


async def send(settings, to: str, subject: str, body: str) -> None:
    """Send one plain-text email; MailError if the server did not take it."""
    if not settings.email:
        raise MailError(OFF)
    await asyncio.to_thread(_send, settings, message(settings, to, subject, body))
