"""How much a public app lets each client send: a per-client byte budget per hour and a free-disk floor.

`UploadLimit` is an ASGI middleware; `Ledger` is its bookkeeping (a sliding hour per client), testable without a server.
Every request body counts, not only /upload: gradio parses multipart bodies of up to 1,000 files into files on disk on
several routes (upload, component server, recordings), and its max_file_size caps each file, not a request. The one
exception is a small event call (JSON of at most SMALL_EVENT bytes, holding no data URL): a visitor who spent
the budget on photos can still press buttons, and such calls fill no disk by the hour (the free-disk floor still
applies to them). A small call that sends a file inline (a string `data:...`, escaped or not, `;base64` or not) is
charged like an upload (its JSON read as gradio reads it, UTF-16 too: ~0.15 ms for 60 kB on a 2-core CPU).
An event call that names an input file by web address (a file object whose "path" is http(s)://) is refused:
gradio would download that file into its cache, however large, for a request of a few bytes. Event calls over
MAX_JSON are refused unread (the page sends a few kB; files go as uploads).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

MB = 1024 * 1024
SMALL_EVENT = 64 * 1024  # an event call (a button press: JSON naming files already uploaded, texts) is a few kB


def client_of(headers: dict[str, str], peer: str | None) -> str:
    """Who sent a request: the rightmost public address of X-Forwarded-For (the one the first proxy saw; addresses a
    client writes itself stand to its left), else the TCP peer; an IPv6 client by its /64, which one host owns."""
    forwarded = [a.strip() for a in headers.get("x-forwarded-for", "").split(",")]
    for text in reversed(forwarded):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.is_global:
            return _network(address)
    try:
        return _network(ipaddress.ip_address(peer or ""))
    except ValueError:
        return peer or "unknown"


def _network(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


@dataclass
class Ledger:
    """Bytes each client sent within the last `window_s` seconds, against a budget of `budget` bytes."""

    budget: int
    window_s: float = 3600.0
    clock: Callable[[], float] = time.monotonic
    _sent: dict[str, deque] = field(default_factory=dict, init=False)  # client -> deque of (time, bytes), oldest first
    _swept: float = field(default=float("-inf"), init=False)

    def used(self, client: str) -> int:
        """Bytes `client` sent within the window."""
        return sum(n for _, n in self._recent(client, self.clock()))

    def charge(self, client: str, size: int) -> float | None:
        """Record `size` bytes from `client` and return None, or, when that would pass the budget, record nothing and
        return the seconds until enough of the window's bytes expire (inf: `size` alone is over the budget)."""
        now = self.clock()
        if size > self.budget:
            return float("inf")
        sent = self._recent(client, now)
        over = sum(n for _, n in sent) + size - self.budget
        if over <= 0:
            sent.append((now, size))
            return None
        for at, n in sent:  # the oldest entries expire first
            over -= n
            if over <= 0:
                return at + self.window_s - now
        raise AssertionError("unreachable: size <= budget, so expiring every entry frees enough")

    def _recent(self, client: str, now: float) -> deque:
        """`client`'s entries within the window; every other client's old ones go at most once a minute (so memory
        follows the clients of the last hour)."""
        if now - self._swept >= 60:
            self._swept = now
            for other in list(self._sent):
                self._expire(self._sent[other], now)
                if not self._sent[other]:
                    del self._sent[other]
        sent = self._sent.setdefault(client, deque())
        self._expire(sent, now)
        return sent

    def _expire(self, sent: deque, now: float) -> None:
        while sent and sent[0][0] <= now - self.window_s:
            sent.popleft()


class UploadLimit:
    """ASGI middleware: refuse a request body over its client's hourly budget (429, 413 when one body alone is over
    it), one of unknown length (411), or one that would leave less than `min_free_mb` free where uploads go (507);
    the message as plain text to an upload (multipart), as {"detail": ...} to any other (JSON) request."""

    def __init__(self, app, mb_per_hour: float, min_free_mb: float, folder: str | Path, clock=time.monotonic):
        self.app = app
        self.ledger = Ledger(int(mb_per_hour * MB), clock=clock) if mb_per_hour > 0 else None
        self.mb_per_hour, self.min_free = mb_per_hour, int(min_free_mb * MB)
        self.folder = Path(folder)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for key, value in scope.get("headers", []):  # a header sent twice reads as one list (as HTTP defines it)
            key, value = key.decode("latin-1").lower(), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        peer = (scope.get("client") or (None,))[0]
        if not _json_call(headers):
            refusal = self.refusal(headers, peer)
        elif int(headers["content-length"]) > SMALL_EVENT:  # charged by its length first, as any large body: read
            refusal = self.refusal(headers, peer)             # only once it is let through
            if refusal is None:
                body, receive = await _buffered(receive)
                refusal = _web_file_refusal(_read_json(body))
        else:  # a small call: read, to pass uncharged only if it sends no file inline, and to fetch nothing
            body, receive = await _buffered(receive)
            data = _read_json(body)
            refusal = _web_file_refusal(data) or self.refusal(headers, peer, _inline_data(body, data))
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message, extra = refusal
        if headers.get("content-type", "").startswith("multipart/"):  # gradio's page shows "HTTP 429: <body text>"
            body, kind = message.encode(), b"text/plain; charset=utf-8"
        else:  # an event call (JSON): the page reads the body as JSON and shows its "detail"
            body, kind = json.dumps({"detail": message}).encode(), b"application/json"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})

    def refusal(self, headers: dict[str, str], peer: str | None,
                carries_data: bool = False) -> tuple[int, str, list] | None:
        """(status, message, extra headers) refusing this request, or None to let it through (and charge it);
        `carries_data`: the body holds a data URL (a file sent inline, which gradio may write to its cache)."""
        if "transfer-encoding" in headers:  # a chunked body's size is known only once it has been read
            return 411, "This public app accepts request bodies only with a Content-Length header.", []
        try:
            size = int(headers.get("content-length") or 0)
        except ValueError:  # also two Content-Length headers
            return 400, "Content-Length is not one number.", []
        if size <= 0:
            return None
        if self.min_free > 0 and _free_bytes(self.folder) - size < self.min_free:
            return (507, "The server's disk is nearly full, so this public app takes no uploads for now (uploads are "
                         "deleted an hour after they arrive): try again later.", [])
        multipart = headers.get("content-type", "").startswith("multipart/")
        if not multipart and size > MAX_JSON:  # (read whole, to be looked into: bounded)
            return (413, f"This request ({size / MB:.1f} MB) is larger than this public app reads as an event call "
                         f"({MAX_JSON // MB} MB): send files as uploads.", [])
        small_event = size <= SMALL_EVENT and not multipart and not carries_data
        if self.ledger is None or small_event:
            return None
        wait = self.ledger.charge(client_of(headers, peer), size)
        if wait is None:
            return None
        budget = f"{self.mb_per_hour:g} MB per client per hour"
        if wait == float("inf"):
            return 413, f"This upload ({size / MB:.1f} MB) is larger than this public app accepts: {budget}.", []
        minutes = max(1, round(wait / 60))
        return (429, f"Upload limit reached: this public app accepts {budget}. Try again in about {minutes} min.",
                [(b"retry-after", str(int(wait) + 1).encode())])


# a JSON string that is a data URL: gradio decodes one into a file in its cache, however small the call, from the text
# after its last comma whether or not it says `;base64` (`data:image/png,...` too)
_INLINE_DATA = b'"data:'


MAX_JSON = 16 * MB  # the largest event call (JSON) a public app reads; its page sends a few kB, files go as uploads


def _json_call(headers: dict[str, str]) -> bool:
    """Whether the request is an event call (not multipart) of a stated length this app reads whole."""
    size = headers.get("content-length", "")
    return ("transfer-encoding" not in headers and size.isdigit() and 0 < int(size) <= MAX_JSON
            and not headers.get("content-type", "").startswith("multipart/"))


_NOT_JSON = object()


def _read_json(body: bytes):
    """The body as gradio reads it (json.loads: escapes undone, UTF-16 and -32 too), or _NOT_JSON (nor nested too
    deep for it: gradio refuses such a body as well)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _web_file_refusal(data) -> tuple[int, str, list] | None:
    """The refusal of an event call (its JSON) that names a file by web address (`_names_web_file`), or None."""
    if _names_web_file(data):
        return (400, "This public app takes files as uploads, not as web addresses for the server to fetch: upload "
                     "the file instead.", [])
    return None


def _names_web_file(data) -> bool:
    """Whether an event call's JSON hands gradio a file by web address (a file object whose "path" is http(s)://...):
    gradio downloads such a file into its cache before the event runs, however large, for a request of a few bytes."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            path = item.get("path")
            if isinstance(path, str) and path.strip().lower().startswith(("http://", "https://")):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _inline_data(body: bytes, data) -> bool:
    """Whether a JSON body (`data`: as `_read_json` read it) holds a data URL (a file sent inline), also one JSON
    escapes (`\\u0064ata:`) or UTF-16."""
    if _INLINE_DATA in body:
        return True
    if data is _NOT_JSON:
        return False
    try:  # written back plain: the escapes undone
        return _INLINE_DATA.decode() in json.dumps(data, ensure_ascii=False)
    except (ValueError, RecursionError):
        return False


async def _buffered(receive) -> tuple[bytes, Callable]:
    """The whole request body, and a receive that hands it to the app as one message, then defers to `receive`."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client left: the app sees that at once
            async def gone():
                return message
            return b"", gone
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body, given = b"".join(chunks), False

    async def replay():
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}
    return body, replay


def _free_bytes(folder: Path) -> int:
    """Free bytes on the disk holding `folder` (or its nearest existing parent: gradio creates it on first upload)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free
