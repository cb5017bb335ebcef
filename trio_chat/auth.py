"""Identity and abuse limits: tokens, admin keys, origins, rate and address limits.

Owns the decisions, not the I/O: whether a request's token (HS256 JWT) is
valid and whom it names, whether a management request carries the admin key,
whether a browser's ``Origin`` may open a WebSocket, whether a connection or
an identity (all connections of one author or address) is over its message
rate, and whether an address has too many connections. It
runs no tasks and does no I/O; time is an argument (``now``: the wall clock for
tokens, a monotonic one for rates), so everything here is tested without
sockets or sleeps.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard

import attrs
import jwt

from .config import MIN_SECRET
from .protocol import INT64_MAX, INT64_MIN

ALGORITHM = "HS256"

_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]{0,18})\Z")
_HOST = r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?"
_ORIGIN = re.compile(rf"(?P<scheme>[a-z][a-z0-9+.-]*)://{_HOST}\Z", re.IGNORECASE | re.ASCII)
_HOST_HEADER = re.compile(rf"{_HOST}\Z", re.IGNORECASE | re.ASCII)
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
# Refills are float arithmetic: 0.05 s at 20/s must give a whole token, not 0.9999999,
# and 0.2 s at 10/s a full bucket of 2, not 1.9999999.
_EPSILON = 1e-9
# Codes for a request that presented nothing, so the 401 names no error (RFC 6750, 3.1).
_NOTHING_PRESENTED = frozenset({"token_missing", "admin_key_required"})


class AuthError(Exception):
    """A request refused for who it is: ``status`` 401 or 403, a snake_case ``code``, a
    one-sentence ``detail``; the HTTP layer answers with them before any upgrade."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """Response headers to send with the error: a 401 must say how to authenticate."""
        if self.status != 401:
            return ()
        if self.code in _NOTHING_PRESENTED:
            return (("www-authenticate", "Bearer"),)
        return (("www-authenticate", 'Bearer error="invalid_token"'),)


@attrs.frozen
class Claims:
    """What a verified token grants: who the bearer is and which private rooms they may join."""

    author_id: int
    rooms: frozenset[int] = frozenset()
    # Seconds since the epoch (the token's ``exp``), or None for a token that never expires.
    expires: float | None = None


def make_token(author_id: int, secret: str, *, rooms: Iterable[int] = (),
               ttl: float | None = 3600, now: float | None = None) -> str:
    """A signed token for ``author_id``, valid for ``ttl`` seconds (None: no expiry)."""
    _check_secret(secret)
    if not _is_int64(author_id):
        raise ValueError(f"author_id must be a 64-bit integer, got {author_id!r}")
    granted = sorted(set(rooms))
    if not all(_is_int64(room) for room in granted):
        raise ValueError(f"rooms must be 64-bit integers, got {granted!r}")
    issued = time.time() if now is None else now
    payload: dict[str, Any] = {"sub": str(author_id), "iat": int(issued)}
    if ttl is not None:
        payload["exp"] = int(issued + ttl)
    if granted:
        payload["rooms"] = granted
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def verify_token(token: str, secret: str, *, now: float | None = None,
                 leeway: float = 0) -> Claims:
    """The claims of ``token`` if it is an HS256 JWT signed with ``secret`` and valid at
    ``now``; :class:`AuthError` (401) otherwise.

    ``exp`` and ``nbf`` are optional and honoured, each with ``leeway`` seconds of
    clock skew; ``iat`` is not checked. A token with an ``aud`` is refused: none of
    them is meant for this server.
    """
    _check_secret(secret)
    if not token:
        raise AuthError(401, "token_missing", "This endpoint needs a token.")
    try:
        # Only HS256: trusting the header's alg would accept "none", or a public key
        # used as an HMAC secret. Times are checked below, against the caller's clock.
        payload = jwt.decode(token, secret, algorithms=[ALGORITHM],
                             options={"verify_exp": False, "verify_nbf": False,
                                      "verify_iat": False, "verify_sub": False})
    except jwt.InvalidSignatureError:
        raise AuthError(401, "bad_signature", "The token's signature does not match.") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError(401, "token_invalid",
                        f"The token is not signed with {ALGORITHM}.") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(401, "token_invalid", f"The token is not valid ({exc}).") from None
    moment = time.time() if now is None else now
    expires = _numeric_date(payload, "exp")
    if expires is not None and moment >= expires + leeway:
        raise AuthError(401, "token_expired", "The token has expired.")
    not_before = _numeric_date(payload, "nbf")
    if not_before is not None and moment + leeway < not_before:
        raise AuthError(401, "token_not_yet_valid", "The token is not valid yet.")
    return Claims(author_id=_subject(payload), rooms=_rooms(payload), expires=expires)


def token_from_request(query: Mapping[str, list[str]],
                       headers: Mapping[str, str]) -> str | None:
    """The token in ``?token=`` or ``Authorization: Bearer``, or None if there is none.

    ``headers`` has lower-case names. Two different tokens in one request are refused
    rather than choosing one, so a proxy's header cannot quietly override the client's.
    """
    from_query = {value for value in query.get("token", ()) if value}
    if len(from_query) > 1:
        raise AuthError(401, "token_invalid", "The request has more than one token.")
    from_header = _bearer(headers)
    if from_header == "":
        raise AuthError(401, "token_invalid", "The Authorization header has no bearer token.")
    if from_header is not None:
        from_query.add(from_header)
    if len(from_query) > 1:
        raise AuthError(401, "token_invalid",
                        "The token in the query and in the Authorization header differ.")
    return from_query.pop() if from_query else None


def authenticate(query: Mapping[str, list[str]], headers: Mapping[str, str], secret: str,
                 *, now: float | None = None, leeway: float = 0) -> Claims:
    """The claims of the request's token; :class:`AuthError` (401) if it has none or a bad one."""
    return verify_token(token_from_request(query, headers) or "", secret, now=now,
                        leeway=leeway)


def check_admin(headers: Mapping[str, str], admin_key: str | None,
                user_secret: str | None) -> None:
    """Pass a management request carrying ``admin_key``, or raise :class:`AuthError`.

    The key comes as ``X-Admin-Key`` (which wins) or ``Authorization: Bearer``. With no
    credentials: 401 ``admin_key_required``; with a valid user token (signed with
    ``user_secret``): 403 ``forbidden``; with anything else: 401 ``admin_key_invalid``.

    An empty or None ``admin_key`` means no key is configured and this checks nothing:
    the caller decides whether management is then open (auth off) or closed.
    """
    if not admin_key:
        return
    presented = headers.get("x-admin-key") or _bearer(headers)
    if not presented:
        raise AuthError(401, "admin_key_required", "This endpoint needs the admin key.")
    # compare_digest takes str only when ASCII; headers arrive as latin-1 text.
    if hmac.compare_digest(presented.encode("utf-8", "surrogatepass"),
                           admin_key.encode("utf-8", "surrogatepass")):
        return
    if user_secret:
        try:
            verify_token(presented, user_secret)
        except AuthError:
            pass
        else:
            raise AuthError(403, "forbidden", "A user token cannot use this endpoint.")
    raise AuthError(401, "admin_key_invalid", "The admin key is wrong.")


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...], *,
                   trust_host_names: bool = True) -> bool:
    """Whether a WebSocket from a page at ``origin`` may connect (cross-site hijacking).

    No ``Origin``: not a browser, allowed. ``"*"`` in ``allowed``: any origin. Empty
    ``allowed``: only the server's own host, as the ``Host`` header names it. Otherwise
    exactly the listed origins (``https://app.example.com``), after normalising case and
    default ports. A ``null`` or malformed origin is refused unless ``"*"`` is listed.

    Without ``trust_host_names`` (tokens on), an empty ``allowed`` trusts the ``Host``
    header only when it is an IP address or ``localhost``: a DNS-rebinding page, served
    from the attacker's name that now resolves to this server, sends that name as both
    its ``Origin`` and its ``Host``, so an equal pair of names proves nothing.
    """
    if origin is None or "*" in allowed:
        return True
    parsed = _parse_origin(origin)
    if parsed is None:
        return False
    if allowed:
        return any(parsed == _parse_origin(entry.removesuffix("/")) for entry in allowed)
    if host is None:
        return False
    match = _HOST_HEADER.match(host)
    if match is None:
        return False
    scheme, origin_host, origin_port = parsed
    if not trust_host_names and not _unrebindable(match["host"].lower()):
        return False
    host_port = int(match["port"]) if match["port"] else _DEFAULT_PORTS.get(scheme)
    return (match["host"].lower(), host_port) == (origin_host, origin_port)


def _unrebindable(host: str) -> bool:
    """Whether a page whose origin names ``host`` can only come from that host: an IP
    address, or ``localhost``, which browsers never look up in DNS."""
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def check_origin(origin: str | None, host: str | None, allowed: tuple[str, ...], *,
                 trust_host_names: bool = True) -> None:
    """:func:`origin_allowed`, raising :class:`AuthError` (403 ``origin_not_allowed``)."""
    if not origin_allowed(origin, host, allowed, trust_host_names=trust_host_names):
        raise AuthError(403, "origin_not_allowed",
                        "Pages from this origin may not open a WebSocket here.")


@attrs.define
class TokenBucket:
    """A connection's message rate: ``rate`` messages a second, in bursts of ``burst``.

    It starts full. :meth:`take` spends a token per message. ``strikes`` counts the
    messages refused since the bucket was last full again; the caller closes the
    connection (1008) when it reaches its flood limit. Counting since the bucket
    refilled, rather than refusals in a row, also catches a client that floods at
    twice the rate, whose refusals alternate with accepted messages; an honest client
    that once overran its burst clears its strikes by slowing down for ``burst/rate``
    seconds.
    """

    rate: float = attrs.field(validator=attrs.validators.gt(0))
    burst: int = attrs.field(validator=attrs.validators.ge(1))
    _tokens: float = attrs.field(init=False)
    _stamp: float | None = attrs.field(init=False, default=None)
    _strikes: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._tokens = float(self.burst)

    @property
    def strikes(self) -> int:
        return self._strikes

    def take(self, now: float) -> bool:
        """Spend a token at monotonic time ``now``: True if there was one to spend."""
        if self._stamp is not None:
            elapsed = max(0.0, now - self._stamp)
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._stamp = now
        if self._tokens >= self.burst - _EPSILON:
            self._strikes = 0
        if self._tokens >= 1 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1)
            return True
        self._strikes += 1
        return False


@attrs.define
class IdentityRates:
    """One :class:`TokenBucket` per identity, shared by all of its connections.

    An identity is held while it has connections (:meth:`acquire` and
    :meth:`release` count them), so the table is as large as the set of
    connected identities; a bucket forgotten with its last connection starts
    full again, which a client gains nothing from since its per-connection
    bucket starts full too.
    """

    rate: float = attrs.field(validator=attrs.validators.gt(0))
    burst: int = attrs.field(validator=attrs.validators.ge(1))
    _buckets: dict[str, tuple[TokenBucket, int]] = attrs.field(init=False, factory=dict)

    def acquire(self, identity: str) -> TokenBucket:
        """The bucket of ``identity``, counting one more connection of it."""
        bucket, count = self._buckets.get(identity) or (TokenBucket(self.rate, self.burst), 0)
        self._buckets[identity] = (bucket, count + 1)
        return bucket

    def release(self, identity: str) -> None:
        """Uncount a connection that :meth:`acquire` counted."""
        bucket, count = self._buckets[identity]
        if count == 1:
            del self._buckets[identity]
        else:
            self._buckets[identity] = (bucket, count - 1)

    def __len__(self) -> int:
        return len(self._buckets)


@attrs.define
class IpLimiter:
    """Concurrent connections per client address, at most ``limit`` each.

    Only addresses with connections are remembered, so the table is as large as the
    set of connected clients, never the set of clients ever seen.
    """

    limit: int = attrs.field(validator=attrs.validators.ge(1))
    _counts: dict[str, int] = attrs.field(init=False, factory=dict)

    def acquire(self, ip: str) -> bool:
        """Count a new connection from ``ip``; False (and nothing counted) if it is at the limit."""
        count = self._counts.get(ip, 0)
        if count >= self.limit:
            return False
        self._counts[ip] = count + 1
        return True

    def release(self, ip: str) -> None:
        """Uncount a connection that :meth:`acquire` counted."""
        count = self._counts.get(ip, 0)
        if count <= 0:
            raise ValueError(f"no connection from {ip!r} to release")
        if count == 1:
            del self._counts[ip]
        else:
            self._counts[ip] = count - 1

    def count(self, ip: str) -> int:
        return self._counts.get(ip, 0)

    def __len__(self) -> int:
        return len(self._counts)


def _check_secret(secret: str) -> None:
    # A short HMAC secret can be brute-forced from one token; config refuses it too.
    if len(secret.encode()) < MIN_SECRET:
        raise ValueError(f"the token secret must be at least {MIN_SECRET} bytes")


def _is_int64(value: object) -> TypeGuard[int]:
    return type(value) is int and INT64_MIN <= value <= INT64_MAX


def _numeric_date(payload: dict[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):
        raise AuthError(401, "token_invalid", f"The token's {name} claim is not a number.")
    return float(value)


def _subject(payload: dict[str, Any]) -> int:
    sub = payload.get("sub")
    if isinstance(sub, str) and _DECIMAL.match(sub):
        sub = int(sub)
    if not _is_int64(sub):
        raise AuthError(401, "bad_subject",
                        "The token's subject (sub) is not a 64-bit integer author id.")
    return sub


def _rooms(payload: dict[str, Any]) -> frozenset[int]:
    rooms = payload.get("rooms", [])
    if not isinstance(rooms, list) or not all(_is_int64(room) for room in rooms):
        raise AuthError(401, "token_invalid",
                        "The token's rooms claim is not a list of 64-bit integer room ids.")
    return frozenset(rooms)


def _bearer(headers: Mapping[str, str]) -> str | None:
    # None: no bearer credentials at all; "": the Bearer scheme with nothing after it.
    scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip()


def _parse_origin(text: str) -> tuple[str, str, int | None] | None:
    match = _ORIGIN.match(text)
    if match is None:
        return None
    scheme = match["scheme"].lower()
    port = int(match["port"]) if match["port"] else _DEFAULT_PORTS.get(scheme)
    if port is not None and not 0 < port < 65536:
        return None
    return scheme, match["host"].lower(), port
