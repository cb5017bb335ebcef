"""HTTP on the chat port: the connection loop, routing, the REST API and the
WebSocket upgrade.

Owns everything a TCP connection does before it is a chat connection. The task
that calls :func:`serve_http` (one per TCP connection) runs it all, then becomes
the connection's reader. Handlers get :class:`Services`, what the server built
for them, never the server itself.

Who owns what:

- :mod:`.serve`: the connection loop (h11), keep-alive and time limits, and the
  one-request failure boundary;
- :mod:`.router`: the routing table and dispatch (404, 405);
- :mod:`.access`: route access levels, the admin key, tokens and private rooms;
- :mod:`.upgrade`: checking a WebSocket upgrade and writing the 101;
- :mod:`.rooms`, :mod:`.messages`, :mod:`.media`, :mod:`.operations`: the
  handlers and routes of each resource (``operations``: the demo page, health,
  metrics, the OpenAPI document and static files);
- :mod:`.console`: the operator console's page and its live feed (server-sent
  events);
- :mod:`.multipart`: the uploaded file of a request;
- :mod:`.base`: requests, responses, ``HttpError`` and parameter parsing;
- :mod:`.services`: :class:`Services`, :class:`NodeInfo`, :class:`Readiness` and
  :class:`Shutdown`.
"""

from __future__ import annotations

from .base import Request, Response, Route
from .operations import STATIC_FILES, load_demo_page
from .router import ROUTES
from .serve import serve_http
from .services import NodeInfo, Readiness, Services, Shutdown

__all__ = ["ROUTES", "STATIC_FILES", "NodeInfo", "Readiness", "Request", "Response", "Route",
           "Services", "Shutdown", "load_demo_page", "serve_http"]
