"""Who may use the server: the Host and Origin checks that keep other websites out, the headers that keep
the page from being framed, sniffed or extended, and the API key. bytelm/serve/app.py installs SiteGuard
outermost.

    app.add_middleware(SiteGuard, hosts=HostCheck("127.0.0.1", ["mybox.lan"]), origins=["http://localhost:3000"])
    app.add_middleware(ApiKeyCheck, key="secret")     # /v1/ routes and /metrics need `Authorization: Bearer`

Why: any web page a user visits can send requests to http://127.0.0.1:8000. A POST whose body is text/plain
or a form needs no CORS preflight, so it runs before the browser asks anything (app.py's routes refuse every
body but application/json with 415); a request from another page carries that page's Origin, refused here
with 403 unless --allow-origin names it; and a page whose own name an attacker rebinds to 127.0.0.1 (DNS
rebinding) is same-origin to itself, so its requests carry its name in Host, refused here with 421.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from base64 import b64encode
from urllib.parse import urlsplit

from bytelm.serve.api import error_response

WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def host_name(header: str) -> str:
    """The name in a Host header, lowercased, without its port or a trailing dot: "[::1]:8000" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        name = header[1:header.find("]")] if "]" in header else header
    else:
        name, _, port = header.rpartition(":")
        if not name or not port.isdigit():
            name = header
    return name.rstrip(".")


def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostCheck:
    """The names a request's Host header may carry: loopback (localhost, 127.0.0.0/8, ::1), the address the
    server listens on, any address literal when it listens on every interface (a rebound name is never an
    address), and the names of --allow-host ("*" = any)."""

    def __init__(self, listen: str, extra=()):
        self.listen = host_name(listen)
        self.extra = {host_name(h) for h in extra if h}

    def allows(self, name: str) -> bool:
        if name == "localhost" or "*" in self.extra or name in self.extra or name == self.listen:
            return True
        ip = _ip(name)
        return ip is not None and (ip.is_loopback or self.listen in WILDCARD_HOSTS)


class SiteGuard:
    """Refuses a request whose Host is not the server's (421) or whose Origin is another site's (403); adds
    nosniff, X-Frame-Options: DENY, no-referrer and (unless the route set one) a Content-Security-Policy
    that allows nothing to every answer."""

    def __init__(self, app, hosts: HostCheck, origins=()):
        self.app, self.hosts, self.origins = app, hosts, set(origins)

    def _refusal(self, headers: dict):
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.hosts.allows(host_name(host)):
            return error_response(421, f"Host {host!r} is not a name of this server: only loopback names and "
                                  "addresses are answered (--allow-host adds names)")
        origin = headers.get(b"origin")
        if origin is None:
            return None
        origin = origin.decode("latin-1")
        if origin in self.origins or "*" in self.origins:
            return None
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower():
            return None  # the server's own page
        return error_response(403, f"requests from the page at {origin!r} are refused: only this server's own "
                              "page may use it (--allow-origin adds origins)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _SAFETY_HEADERS if k not in names]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        refusal = self._refusal(dict(scope["headers"]))
        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)
        return await self.app(scope, receive, send_with_headers)


class ApiKeyCheck:
    """With a key set, every /v1/ route and /metrics need `Authorization: Bearer KEY` (compared in constant
    time)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and (scope["path"].startswith("/v1/")
                                                     or scope["path"] == "/metrics"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                response = error_response(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                                          headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


_SAFETY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                   (b"referrer-policy", b"no-referrer"),
                   (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")]


def page_policy(html: str) -> str:
    """The page's Content-Security-Policy: its one inline script and one stylesheet by their hashes, requests
    to its own origin only, nothing loaded from anywhere, no framing, no forms, no <base>."""
    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
