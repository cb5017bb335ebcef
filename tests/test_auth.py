"""Tokens, admin keys, origins and limits, without sockets or clocks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest

from trio_chat.auth import (
    AuthError,
    Claims,
    IpLimiter,
    TokenBucket,
    authenticate,
    check_admin,
    check_origin,
    make_token,
    origin_allowed,
    token_from_request,
    verify_token,
)

SECRET = "s" * 64  # long enough for HS512 too, so PyJWT never warns about the key
ADMIN = "admin-key-0123456789"
NOW = 1_700_000_000.0


def b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: Any, secret: str = SECRET) -> str:
    """A token with exactly this header, signed with HMAC-SHA256 whatever it claims."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def signed(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def refused(token: str, *, now: float = NOW, leeway: float = 0) -> AuthError:
    with pytest.raises(AuthError) as info:
        verify_token(token, SECRET, now=now, leeway=leeway)
    assert info.value.status == 401
    return info.value


# Tokens


def test_round_trip() -> None:
    token = make_token(11, SECRET, rooms=[5, 3, 5], ttl=60, now=NOW)
    assert verify_token(token, SECRET, now=NOW) == Claims(
        author_id=11, rooms=frozenset({3, 5}), expires=NOW + 60)


def test_subject_as_string_or_integer() -> None:
    assert verify_token(signed({"sub": "42"}), SECRET, now=NOW).author_id == 42
    assert verify_token(signed({"sub": 42}), SECRET, now=NOW).author_id == 42
    assert verify_token(signed({"sub": "-7"}), SECRET, now=NOW).author_id == -7
    assert verify_token(signed({"sub": str(2**63 - 1)}), SECRET, now=NOW).author_id == 2**63 - 1
    assert verify_token(signed({"sub": -(2**63)}), SECRET, now=NOW).author_id == -(2**63)


def test_no_expiry_and_no_rooms() -> None:
    claims = verify_token(make_token(1, SECRET, ttl=None, now=NOW), SECRET, now=NOW + 1e9)
    assert claims == Claims(author_id=1, rooms=frozenset(), expires=None)
    assert verify_token(signed({"sub": "1", "rooms": []}), SECRET, now=NOW).rooms == frozenset()


def test_expired() -> None:
    token = make_token(1, SECRET, ttl=60, now=NOW)
    assert verify_token(token, SECRET, now=NOW + 59.9).author_id == 1
    assert refused(token, now=NOW + 60).code == "token_expired"
    assert verify_token(token, SECRET, now=NOW + 60, leeway=5).author_id == 1
    assert refused(token, now=NOW + 65, leeway=5).code == "token_expired"


def test_expired_by_the_wall_clock() -> None:
    token = make_token(1, SECRET, ttl=60, now=NOW - 3600)
    with pytest.raises(AuthError) as info:
        verify_token(token, SECRET)
    assert info.value.code == "token_expired"


def test_not_yet_valid() -> None:
    token = signed({"sub": "1", "nbf": NOW + 30})
    assert refused(token).code == "token_not_yet_valid"
    assert verify_token(token, SECRET, now=NOW + 30).author_id == 1
    assert verify_token(token, SECRET, now=NOW, leeway=30).author_id == 1


@pytest.mark.parametrize("claims", [
    {"sub": "1", "exp": "soon"},
    {"sub": "1", "exp": True},
    {"sub": "1", "nbf": [NOW]},
    {"sub": "1", "aud": "another-service"},
])
def test_bad_registered_claims(claims: dict[str, Any]) -> None:
    assert refused(signed(claims)).code == "token_invalid"


def test_wrong_secret() -> None:
    error = refused(make_token(1, "t" * 64, now=NOW))
    assert error.code == "bad_signature"
    assert error.headers == (("www-authenticate", 'Bearer error="invalid_token"'),)


def test_tampered_payload() -> None:
    header, _, signature = make_token(1, SECRET, now=NOW).split(".")
    token = f"{header}.{b64({'sub': '2'})}.{signature}"
    assert refused(token).code == "bad_signature"


def test_tampered_header_keeping_hs256() -> None:
    _, payload, signature = make_token(1, SECRET, now=NOW).split(".")
    token = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': 'x'})}.{payload}.{signature}"
    assert refused(token).code == "bad_signature"


@pytest.mark.parametrize("alg", ["none", "None", "RS256", "HS512", "ES256"])
def test_only_hs256(alg: str) -> None:
    # The signature is a valid HS256 MAC: only the header's claim differs.
    assert refused(forge({"alg": alg, "typ": "JWT"}, {"sub": "1"})).code == "token_invalid"


def test_alg_none_unsigned() -> None:
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': '1'})}."
    assert refused(token).code == "token_invalid"


def test_hs512_signed_with_the_right_secret() -> None:
    token = jwt.encode({"sub": "1"}, SECRET, algorithm="HS512")
    assert refused(token).code == "token_invalid"


def test_rs256_swapped_into_a_valid_token() -> None:
    _, payload, signature = make_token(1, SECRET, now=NOW).split(".")
    token = f"{b64({'alg': 'RS256', 'typ': 'JWT'})}.{payload}.{signature}"
    assert refused(token).code == "token_invalid"


def test_missing() -> None:
    error = refused("")
    assert error.code == "token_missing"
    assert error.headers == (("www-authenticate", "Bearer"),)


@pytest.mark.parametrize("token", [
    "abc",
    "a.b",
    "a.b.c.d",
    "!!!.@@@.###",
    "a.b.c",
    f"{b64(b'not json')}.{b64({'sub': '1'})}.c2ln",
    forge({"alg": "HS256", "typ": "JWT"}, b"not json"),
    forge({"alg": "HS256", "typ": "JWT"}, [1, 2]),
    forge({"alg": "HS256", "typ": "JWT"}, "1"),
    "é.é.é",
])
def test_malformed(token: str) -> None:
    assert refused(token).code == "token_invalid"


@pytest.mark.parametrize("sub", [
    None, "", "abc", "1.5", " 1", "+1", "01", "1e3", "\u0661", str(2**63), 2**63, -(2**63) - 1,
    True, 1.0, [1], {"id": 1},
])
def test_bad_subject(sub: Any) -> None:
    payload = {} if sub is None else {"sub": sub}
    assert refused(signed(payload)).code == "bad_subject"


@pytest.mark.parametrize("rooms", ["1", 1, {"1": 1}, [1, "2"], [True], [1.0], [2**63], None])
def test_bad_rooms_claim(rooms: Any) -> None:
    assert refused(signed({"sub": "1", "rooms": rooms})).code == "token_invalid"


def test_short_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        make_token(1, "short")
    with pytest.raises(ValueError, match="32 bytes"):
        verify_token(make_token(1, SECRET), "short")


@pytest.mark.parametrize(("author_id", "rooms"), [
    (2**63, ()), ("1", ()), (True, ()), (1, [2**63]), (1, ["1"]),
])
def test_make_token_checks_ids(author_id: Any, rooms: Any) -> None:
    with pytest.raises(ValueError, match="64-bit"):
        make_token(author_id, SECRET, rooms=rooms)


# Where the token comes from


def test_token_from_query_or_header() -> None:
    assert token_from_request({}, {}) is None
    assert token_from_request({"token": ["q"]}, {}) == "q"
    assert token_from_request({"token": ["q", "q"]}, {}) == "q"
    assert token_from_request({}, {"authorization": "Bearer h"}) == "h"
    assert token_from_request({"token": ["t"]}, {"authorization": "Bearer t"}) == "t"


@pytest.mark.parametrize("value", ["bearer x", "BEARER x", "BeArEr x", "  Bearer   x  "])
def test_bearer_scheme_is_case_insensitive(value: str) -> None:
    assert token_from_request({}, {"authorization": value}) == "x"


def test_other_schemes_carry_no_token() -> None:
    assert token_from_request({}, {"authorization": "Basic dXNlcjpwYXNz"}) is None
    assert token_from_request({"token": ["q"]}, {"authorization": "Basic eA=="}) == "q"


@pytest.mark.parametrize(("query", "headers"), [
    ({"token": ["q"]}, {"authorization": "Bearer h"}),
    ({"token": ["a", "b"]}, {}),
    ({}, {"authorization": "Bearer"}),
    ({}, {"authorization": "Bearer   "}),
])
def test_conflicting_or_empty_tokens(query: dict[str, list[str]],
                                     headers: dict[str, str]) -> None:
    with pytest.raises(AuthError) as info:
        token_from_request(query, headers)
    assert (info.value.status, info.value.code) == (401, "token_invalid")


def test_authenticate() -> None:
    token = make_token(9, SECRET, rooms=[1], now=NOW)
    claims = authenticate({"token": [token]}, {}, SECRET, now=NOW)
    assert (claims.author_id, claims.rooms) == (9, frozenset({1}))
    with pytest.raises(AuthError) as info:
        authenticate({}, {}, SECRET, now=NOW)
    assert info.value.code == "token_missing"
    with pytest.raises(AuthError) as info:
        authenticate({}, {"authorization": f"Bearer {token}"}, SECRET, now=NOW + 7200)
    assert info.value.code == "token_expired"


# Management


@pytest.mark.parametrize("headers", [{"x-admin-key": ADMIN}, {"authorization": f"Bearer {ADMIN}"},
                                     {"authorization": f"bearer {ADMIN}"},
                                     {"x-admin-key": ADMIN, "authorization": "Bearer other"}])
def test_admin_key_accepted(headers: dict[str, str]) -> None:
    check_admin(headers, ADMIN, SECRET)


@pytest.mark.parametrize("admin_key", [None, ""])
def test_admin_key_not_configured_checks_nothing(admin_key: str | None) -> None:
    check_admin({}, admin_key, SECRET)


def admin_refused(headers: dict[str, str], user_secret: str | None = SECRET) -> AuthError:
    with pytest.raises(AuthError) as info:
        check_admin(headers, ADMIN, user_secret)
    return info.value


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer"}, {"x-admin-key": ""},
                                     {"authorization": "Basic eA=="}])
def test_admin_key_missing(headers: dict[str, str]) -> None:
    error = admin_refused(headers)
    assert (error.status, error.code) == (401, "admin_key_required")
    assert error.headers == (("www-authenticate", "Bearer"),)


@pytest.mark.parametrize("headers", [{"x-admin-key": "wrong"},
                                     {"authorization": "Bearer wrong"},
                                     {"x-admin-key": ADMIN + "x"},
                                     {"x-admin-key": "ümlaut-kéy"},
                                     {"x-admin-key": "wrong", "authorization": f"Bearer {ADMIN}"}])
def test_admin_key_wrong(headers: dict[str, str]) -> None:
    error = admin_refused(headers)
    assert (error.status, error.code) == (401, "admin_key_invalid")


def test_user_token_is_forbidden() -> None:
    token = make_token(1, SECRET)
    for headers in ({"authorization": f"Bearer {token}"}, {"x-admin-key": token}):
        error = admin_refused(headers)
        assert (error.status, error.code, error.headers) == (403, "forbidden", ())


def test_bad_user_tokens_are_just_wrong_keys() -> None:
    expired = make_token(1, SECRET, ttl=60, now=NOW)
    assert admin_refused({"authorization": f"Bearer {expired}"}).code == "admin_key_invalid"
    foreign = make_token(1, "t" * 64)
    assert admin_refused({"authorization": f"Bearer {foreign}"}).code == "admin_key_invalid"
    token = make_token(1, SECRET)
    assert admin_refused({"authorization": f"Bearer {token}"}, None).code == "admin_key_invalid"


# Origins


@pytest.mark.parametrize(("origin", "host"), [
    (None, "chat.example.com"),
    (None, None),
    ("https://chat.example.com", "chat.example.com"),
    ("https://chat.example.com", "chat.example.com:443"),
    ("https://chat.example.com:443", "chat.example.com"),
    ("http://chat.example.com", "chat.example.com:80"),
    ("HTTP://Chat.Example.COM", "chat.example.com"),
    ("http://127.0.0.1:8080", "127.0.0.1:8080"),
    ("http://[::1]:8080", "[::1]:8080"),
    ("wss://chat.example.com", "chat.example.com:443"),
])
def test_same_host_allowed(origin: str | None, host: str | None) -> None:
    assert origin_allowed(origin, host, ())


@pytest.mark.parametrize(("origin", "host"), [
    ("https://evil.example.com", "chat.example.com"),
    ("https://chat.example.com.evil.com", "chat.example.com"),
    ("http://127.0.0.1:8081", "127.0.0.1:8080"),
    ("http://127.0.0.1", "127.0.0.1:8080"),
    ("https://chat.example.com", "chat.example.com:80"),
    ("http://chat.example.com", "chat.example.com:443"),
    ("https://chat.example.com", None),
    ("https://chat.example.com", "chat.example.com:bad"),
    ("https://chat.example.com", "user@chat.example.com"),
    ("null", "chat.example.com"),
    ("", "chat.example.com"),
    ("chat.example.com", "chat.example.com"),
    ("https://chat.example.com/", "chat.example.com"),
    ("https://chat.example.com/path", "chat.example.com"),
    ("https://user@chat.example.com", "chat.example.com"),
    ("https://chat.example.com:99999", "chat.example.com:99999"),
    ("https://chat.example.com:0", "chat.example.com:0"),
    ("https://chat.example.com:x", "chat.example.com"),
    ("https://chat.ex ample.com", "chat.ex ample.com"),
    ("https://chat.example.com\n", "chat.example.com"),
    ("https://\u212aelvin.example.com", "kelvin.example.com"),
    ("chrome-extension://abc", "chat.example.com"),
])
def test_same_host_refused(origin: str, host: str | None) -> None:
    assert not origin_allowed(origin, host, ())


ALLOWED = ("https://app.example.com", "http://localhost:3000", "https://other.example.com:8443/")


@pytest.mark.parametrize("origin", [
    "https://app.example.com",
    "https://APP.example.com:443",
    "http://localhost:3000",
    "https://other.example.com:8443",
])
def test_allow_list_accepts(origin: str) -> None:
    assert origin_allowed(origin, "chat.example.com", ALLOWED)


@pytest.mark.parametrize("origin", [
    "http://app.example.com",
    "https://app.example.com:8443",
    "http://localhost:3001",
    "https://localhost:3000",
    "https://chat.example.com",
    "null",
    "not an origin",
])
def test_allow_list_refuses(origin: str) -> None:
    # The server's own host is not implied once there is a list.
    assert not origin_allowed(origin, "chat.example.com", ALLOWED)


def test_allow_list_ignores_malformed_entries() -> None:
    assert not origin_allowed("https://app.example.com", None, ("app.example.com", "bad entry"))


@pytest.mark.parametrize("origin", [None, "null", "garbage", "https://anywhere.example"])
def test_wildcard(origin: str | None) -> None:
    assert origin_allowed(origin, "chat.example.com", ("*",))
    assert origin_allowed(origin, "chat.example.com", ("https://app.example.com", "*"))


def test_check_origin() -> None:
    check_origin("https://chat.example.com", "chat.example.com", ())
    with pytest.raises(AuthError) as info:
        check_origin("https://evil.example.com", "chat.example.com", ())
    assert (info.value.status, info.value.code, info.value.headers) == (
        403, "origin_not_allowed", ())


# Message rate


def test_bucket_starts_full_then_refuses() -> None:
    bucket = TokenBucket(rate=1, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.strikes == 1


def test_bucket_refills_at_the_rate() -> None:
    bucket = TokenBucket(rate=2, burst=2)
    assert bucket.take(10.0) and bucket.take(10.0)
    assert not bucket.take(10.25)
    assert bucket.take(10.5)
    assert not bucket.take(10.5)
    assert bucket.take(11.0)


def test_bucket_never_holds_more_than_the_burst() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    bucket.take(0.0)
    assert [bucket.take(1000.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_refill_is_exact_despite_floats() -> None:
    bucket = TokenBucket(rate=20, burst=1)
    now = 0.0
    for _ in range(1000):
        assert bucket.take(now)
        now += 0.05
    assert bucket.strikes == 0


def test_bucket_ignores_a_clock_going_back() -> None:
    bucket = TokenBucket(rate=1, burst=1)
    assert bucket.take(5.0)
    assert not bucket.take(4.0)
    assert bucket.take(5.0)


def test_strikes_survive_accepted_messages_while_flooding() -> None:
    # Twice the rate: every other message gets through, and the strikes keep adding up.
    bucket = TokenBucket(rate=10, burst=2)
    results = [bucket.take(i * 0.05) for i in range(20)]
    assert results[:3] == [True, True, True]
    assert True in results[3:] and False in results[3:]
    assert bucket.strikes == results.count(False) == 9


def test_strikes_clear_once_the_bucket_refills() -> None:
    bucket = TokenBucket(rate=10, burst=2)
    for _ in range(5):
        bucket.take(0.0)
    assert bucket.strikes == 3
    assert bucket.take(0.1)
    assert bucket.strikes == 3
    assert bucket.take(0.3)
    assert bucket.strikes == 0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_bucket_rejects_nonsense(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=rate, burst=burst)


# Connections per address


def test_ip_limiter() -> None:
    limiter = IpLimiter(limit=2)
    assert limiter.acquire("10.0.0.1") and limiter.acquire("10.0.0.1")
    assert not limiter.acquire("10.0.0.1")
    assert limiter.count("10.0.0.1") == 2
    assert limiter.acquire("10.0.0.2")
    limiter.release("10.0.0.1")
    assert limiter.acquire("10.0.0.1")
    assert len(limiter) == 2


def test_ip_limiter_forgets_idle_addresses() -> None:
    limiter = IpLimiter(limit=1)
    for i in range(100):
        ip = f"10.0.0.{i}"
        assert limiter.acquire(ip)
        limiter.release(ip)
    assert len(limiter) == 0
    assert limiter.count("10.0.0.1") == 0


def test_ip_limiter_release_without_acquire() -> None:
    limiter = IpLimiter(limit=1)
    with pytest.raises(ValueError, match=r"10\.0\.0\.9"):
        limiter.release("10.0.0.9")
    assert len(limiter) == 0


def test_ip_limiter_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        IpLimiter(limit=0)
