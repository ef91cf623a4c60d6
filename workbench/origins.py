"""Who may talk to an app served on this machine's loopback address: its own pages, under its own names.

Any web page open in the same browser can send requests to http://127.0.0.1:7860, and by DNS rebinding (its own
name made to resolve to 127.0.0.1) read the answers as well: gradio answers any Host and tells a page of that name it
may read, so the page could fetch the runs folder's files (training images, manifests) and call every event.
`LoopbackOnly` is an ASGI middleware that refuses a request whose Host is not a loopback name (a rebound name) and
one whose Origin, which browsers send with cross-site requests, is not a loopback page.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(name: str) -> bool:
    """Whether a host name (no port) means this machine: localhost, *.localhost, or a loopback address."""
    name = name.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_of(value: str) -> str:
    """The host name of a Host header ("127.0.0.1:7860", "[::1]:7860") or of an Origin ("http://localhost:7860")."""
    try:
        return urlsplit(value if "://" in value else f"//{value}").hostname or ""
    except ValueError:  # e.g. a bracket left open
        return ""


def refusal(headers: dict[str, str], allowed: frozenset[str] = frozenset()) -> str | None:
    """Why a request with these (lower-case) headers is refused, or None to let it through; `allowed`: host names
    the user vouched for (`--allow-host`: a port-forwarding proxy's, e.g. a notebook's or a cloud IDE's)."""

    def ours(name: str) -> bool:
        return is_loopback(name) or name.lower().rstrip(".") in allowed

    host = headers.get("host", "")
    if not ours(host_of(host)):
        return (f"This app serves this machine only (it listens on a loopback address): open it as "
                f"http://127.0.0.1 or http://localhost, not as {host or 'an unnamed host'} (a proxy you trust that "
                f"forwards it under that name: start the app with --allow-host {host_of(host) or 'NAME'}).")
    origin = headers.get("origin")
    if origin is not None and not ours(host_of(origin)):  # also "null": a sandboxed frame or a file
        return f"Requests from pages of other sites ({origin}) are refused: this app takes its own pages' only."
    return None


class LoopbackOnly:
    """ASGI middleware: 403 for a request another site's page sent (`refusal`), every other one passed on."""

    def __init__(self, app, allowed_hosts=()):
        self.app = app
        self.allowed = frozenset(h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for key, value in scope.get("headers", []):
            key = key.decode("latin-1").lower()
            headers.setdefault(key, value.decode("latin-1"))  # the first Host, as the server's routing reads it
        why = refusal(headers, self.allowed)
        if why is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = why.encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
