"""Sign-up and reset requests behind the login throttle (vtai_login_attempt, vtai.web.sessions).

The same database function and table as logins, under names of their own ("signup:<email>",
"reset:<email>"), so a burst of requests never slows the owner's logins by name; the client
address is the login throttle's own key, shared with logins on purpose: one address gets the
same budget of unproven attempts whatever form it hammers.

Unlike a login, nothing here ever calls vtai_login_succeeded(): a sign-up or a reset request
proves nothing about who sent it, so every one counts. And a request that would have to wait
for its slot is refused at once with the wait (a form is not a password check that must queue
to stop parallel guessing; a refused request never sends a mail or makes an account).
"""

from __future__ import annotations

import logging
import math

from vtai.web import sessions

log = logging.getLogger(__name__)

SIGNUP = "signup"
RESET = "reset"
# vtai_login_attempt() refuses outright (-1) once a slot is more than 10 s away.
_REFUSED_WAIT = 10


class Throttled(Exception):
    """Too many requests; str() is one line, `retry_after` whole seconds."""

    def __init__(self, retry_after: int, message: str | None = None):
        self.retry_after = retry_after
        super().__init__(
            message or f"Too many attempts from here: try again in {retry_after} seconds."
        )


async def admit(services, kind: str, email: str) -> None:
    """Count one `kind` request for `email` from this request's client; Throttled if over."""
    gate = sessions.store_of(services)
    try:
        wait = await gate.attempt(f"{kind}:{email}", sessions.client_address())
    except Exception as exc:
        # As logins: no throttle, no attempt.
        log.error(
            "%s refused: the login throttle can't be asked (%s)",
            kind,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        raise Throttled(60, "This can't be done right now: try again in a minute.") from None
    if wait < 0:
        raise Throttled(_REFUSED_WAIT)
    if wait > 0:
        raise Throttled(max(1, math.ceil(wait)))
