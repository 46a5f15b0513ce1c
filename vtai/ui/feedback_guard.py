"""Ratings are the rater's own: Chainlit's `PUT /feedback` and `DELETE /feedback`, guarded.

Chainlit's routes hand any signed-in user's request to the data layer without saying who
the user is, and turn any error into a 500 carrying the database's message. This ASGI
middleware runs first on those two routes: it reads the session (the `access_token` cookie,
or a bearer token, decoded with Chainlit's decode_jwt as vtai.admin.routes does), asks the data
layer whether the rating's answer is in one of that user's chats, and answers a refusal in
one line (401 not signed in, 400 unreadable request, 404 no such answer in your chats,
413 too long). Only then does Chainlit's route run, with the user set in
vtai.ui.history.acting_user, which the data layer checks again; without it the data layer
refuses every feedback write.

Install once from vtai/main.py: `feedback_guard.install(chainlit.server.app)`.
"""

from __future__ import annotations

import json
import logging

from vtai.web.replies import refuse

log = logging.getLogger(__name__)

ROUTE = "/feedback"
METHODS = frozenset({"PUT", "DELETE"})
# A rating is an id, a 0/1 and a comment of at most VTAI_MAX_MESSAGE_CHARS characters.
BODY_SLACK = 16_384


def install(app) -> None:
    """Called once from vtai/main.py with Chainlit's FastAPI app, before it starts."""
    app.add_middleware(FeedbackGuard)


def _actor_from_scope(scope):
    """The signed-in user of the request, as a vtai.ui.history.Actor, or None."""
    from chainlit.auth import get_token_from_cookies
    from chainlit.auth.jwt import decode_jwt
    from starlette.requests import HTTPConnection

    from vtai.ui.history import Actor

    request = HTTPConnection(scope)
    token = get_token_from_cookies(request.cookies)
    if not token:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
    if not token:
        return None
    try:
        user = decode_jwt(token)
    except Exception:
        return None
    user_id = (user.metadata or {}).get("id")
    return Actor(identifier=user.identifier, user_id=str(user_id) if user_id else None)


def _route(scope) -> bool:
    if scope["type"] != "http" or scope.get("method") not in METHODS:
        return False
    from chainlit.config import config

    path = scope.get("path", "").rstrip("/")
    return path in {ROUTE, f"{config.run.root_path}{ROUTE}"}


async def _reply(send, status: int, detail: str) -> None:
    await refuse(send, status, detail, ((b"cache-control", b"no-store"),))


class FeedbackGuard:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if not _route(scope):
            return await self.app(scope, receive, send)
        from chainlit.data import get_data_layer

        from vtai.ui.history import FeedbackRefused, VtaiDataLayer, acting_user

        layer = get_data_layer()
        if not isinstance(layer, VtaiDataLayer):
            # History is off: Chainlit answers that persistence is not enabled.
            return await self.app(scope, receive, send)
        actor = _actor_from_scope(scope)
        if actor is None:
            return await _reply(send, 401, "Sign in to rate answers.")

        limit = 4 * layer.max_message_chars + BODY_SLACK
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _reply(send, 413, "That rating is too long.")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)

        try:
            payload = json.loads(body)
            if scope["method"] == "PUT":
                feedback = payload["feedback"]
                step_id, feedback_id = feedback["forId"], feedback.get("id")
                comment = feedback.get("comment")
                if isinstance(comment, str) and len(comment) > layer.max_message_chars:
                    return await _reply(
                        send,
                        413,
                        f"A comment is at most {layer.max_message_chars:,} characters.",
                    )
            else:
                step_id, feedback_id = None, payload["feedbackId"]
            if not isinstance(step_id, str | None) or not isinstance(feedback_id, str | None):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return await _reply(send, 400, "That is not a rating request.")

        try:
            await layer.check_feedback(actor, step_id=step_id, feedback_id=feedback_id)
        except FeedbackRefused as refused:
            return await _reply(send, refused.status, str(refused))
        except Exception as exc:
            log.warning("feedback check failed (%s)", type(exc).__name__)
            return await _reply(send, 503, "Ratings are unavailable: try again shortly.")

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        token = acting_user.set(actor)
        try:
            await self.app(scope, replay, send)
        finally:
            acting_user.reset(token)
