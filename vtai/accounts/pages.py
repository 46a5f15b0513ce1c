"""The small server-rendered pages: one form each, a one-line message above it.

No script runs on them but /reset/confirm.js (served by this package, so the app's
Content-Security-Policy, script-src 'self', holds); every value is HTML-escaped.
"""

from __future__ import annotations

from html import escape

from fastapi.responses import HTMLResponse

NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:26rem;margin:4rem auto;padding:0 1rem;color:#222}
h1{font-size:1.4rem}label{display:block;margin:.8rem 0 .2rem}
input{width:100%;padding:.5rem;box-sizing:border-box;font-size:1rem}
button{margin-top:1rem;padding:.5rem 1rem;font-size:1rem}
.msg{padding:.6rem;border-radius:4px;background:#eef5ee}.msg.bad{background:#fbeaea}
nav{margin-top:1.5rem;font-size:.9rem}nav a{margin-right:1rem}
"""


def page(
    title: str,
    *,
    message: str | None = None,
    bad: bool = False,
    form: str = "",
    links: tuple[tuple[str, str], ...] = (("/login", "Sign in"),),
    status: int = 200,
    script: str | None = None,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    note = (
        f'<p class="msg{" bad" if bad else ""}" role="status">{escape(message)}</p>'
        if message
        else ""
    )
    nav = " ".join(f'<a href="{escape(href)}">{escape(text)}</a>' for href, text in links)
    tag = f'<script src="{escape(script)}" defer></script>' if script else ""
    html = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} - VT.ai</title><style>{_STYLE}</style>{tag}</head>"
        f"<body><h1>{escape(title)}</h1>{note}{form}<nav>{nav}</nav></body></html>"
    )
    return HTMLResponse(html, status_code=status, headers={**NO_STORE, **(headers or {})})


def field(name: str, label: str, kind: str = "text", value: str = "", auto: str = "") -> str:
    extra = f' autocomplete="{auto}"' if auto else ""
    keep = f' value="{escape(value)}"' if value and kind != "password" else ""
    return (
        f'<label for="{name}">{escape(label)}</label>'
        f'<input id="{name}" name="{name}" type="{kind}"{keep}{extra} required>'
    )


def hidden(name: str, value: str) -> str:
    return f'<input type="hidden" id="{name}" name="{name}" value="{escape(value)}">'


def form(action: str, button: str, *fields: str) -> str:
    button_html = f'<button type="submit">{escape(button)}</button>'
    return f'<form method="post" action="{escape(action)}">{"".join(fields)}{button_html}</form>'
