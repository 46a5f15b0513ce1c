"""What an email and a new password must be; each refusal is one line for the person typing."""

from __future__ import annotations

import re

# A user's own typing mistakes, not RFC 5321: one @, something on each side, a dot in the domain.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_EMAIL = 254
# Local accounts log in with their email as the username, which the profiles table bounds.
MAX_USERNAME = 64
MIN_PASSWORD = 8
# argon2 hashes any length, but a megabyte "password" is only work for the server.
MAX_PASSWORD = 1024


class InputError(ValueError):
    """Bad input; str() is one line naming the field."""


def normalise_email(value: str | None) -> str:
    """The email as stored and compared: trimmed and lower-cased."""
    return (value or "").strip().lower()


def email(value: str | None, *, as_username: bool = False) -> str:
    address = normalise_email(value)
    if not address:
        raise InputError("Email: enter your email address.")
    if len(address) > MAX_EMAIL or not _EMAIL.match(address):
        raise InputError(f"Email: {address[:80]!r} is not an email address.")
    if as_username and len(address) > MAX_USERNAME:
        raise InputError(
            f"Email: at most {MAX_USERNAME} characters here, since it is also your username."
        )
    return address


def new_password(value: str | None, confirm: str | None = None) -> str:
    password = value or ""
    if len(password) < MIN_PASSWORD or not password.strip():
        raise InputError(f"New password: at least {MIN_PASSWORD} characters.")
    if len(password) > MAX_PASSWORD:
        raise InputError(f"New password: at most {MAX_PASSWORD} characters.")
    if confirm is not None and confirm != password:
        raise InputError("New password: the two entries differ.")
    return password
