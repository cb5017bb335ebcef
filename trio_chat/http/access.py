"""Who may use what: a route's access level checked against the request's admin
key or token, and a private room's check against a token's claims (also used
before a WebSocket upgrade). A refusal is a 401 or 403 with a JSON body,
counted in ``auth_failures``.

Runs no task.
"""

from __future__ import annotations

import hmac
import re

from ..auth import AuthError, Claims, authenticate, check_admin
from .base import HttpError, Request, error, room_id_of
from .services import Services


def auth_error(services: Services, exc: AuthError) -> HttpError:
    services.metrics.auth_failures += 1
    return HttpError(error(exc.status, exc.code, exc.detail, exc.headers))


async def authorize(services: Services, request: Request, access: str,
                    match: re.Match[str]) -> None:
    """Raise :class:`HttpError` (401/403) unless the request may use a route of ``access``."""
    auth = services.config.auth
    tokens = auth.mode == "token"
    if access == "metrics":
        _check_metrics(services, request)
        return
    if access == "public" or not (auth.admin_key or tokens):
        return  # development: no key and no identities, open as the seed was
    if access == "admin":
        if not auth.admin_key:
            raise auth_error(services, AuthError(401, "admin_key_required",
                                                 "management needs auth.adminKey, and none "
                                                 "is configured"))
        try:
            check_admin(request.headers, auth.admin_key, auth.secret if tokens else None)
        except AuthError as exc:
            raise auth_error(services, exc) from None
        return
    if not tokens:
        return
    if auth.admin_key:
        try:
            check_admin(request.headers, auth.admin_key, auth.secret)
            return
        except AuthError:
            pass  # not the admin: a user token, then
    try:
        claims = authenticate(request.query, request.headers, auth.secret)
    except AuthError as exc:
        raise auth_error(services, exc) from None
    await check_room_access(services, room_id_of(match), claims)


async def check_room_access(services: Services, room_id: int, claims: Claims) -> None:
    """A private room needs the room in the token's claims."""
    if room_id in claims.rooms:
        return
    room = await services.repository.room(room_id)
    if room is not None and room.private:
        services.metrics.auth_failures += 1
        raise HttpError(error(403, "room_forbidden", f"room {room_id} is private and the "
                              "token does not grant it"))


def _check_metrics(services: Services, request: Request) -> None:
    """``/metrics`` with ``auth.metricsKey`` set needs it, or the admin key, as a bearer
    token (what Prometheus sends with ``authorization: {credentials: ...}``)."""
    auth = services.config.auth
    if not auth.metrics_key:
        return
    scheme, _, presented = request.headers.get("authorization", "").strip().partition(" ")
    presented = presented.strip() if scheme.lower() == "bearer" else ""
    if not presented:
        raise auth_error(services, AuthError(401, "metrics_key_required",
                                             "/metrics needs auth.metricsKey as a bearer token"))
    for key in (auth.metrics_key, auth.admin_key):
        if key and hmac.compare_digest(presented.encode("utf-8", "surrogatepass"),
                                       key.encode("utf-8", "surrogatepass")):
            return
    raise auth_error(services, AuthError(401, "metrics_key_invalid", "the metrics key is wrong"))
