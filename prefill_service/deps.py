"""FastAPI dependencies shared by the front door's routers."""

from __future__ import annotations

import hmac
from typing import Annotated, NamedTuple

from fastapi import Depends, HTTPException, Request

from adapters_store.routing import MAX_ROUTING_KEY_CHARS
from prefill_service.service import PrefillService

ROUTING_KEY_HEADER = "x-prad-routing-key"  # keeps a client on one adapter version of a traffic split
ADMIN_TOKEN_HEADER = "x-prad-admin-token"  # the admin token on a serving request: may pin a version


def get_service(request: Request) -> PrefillService:
    return request.app.state.service


class RouteHints(NamedTuple):
    routing_key: str | None  # X-PrAd-Routing-Key, when given
    may_pin: bool  # the request carries the admin token: it may name its adapter version


def route_hints(request: Request) -> RouteHints:
    key = request.headers.get(ROUTING_KEY_HEADER) or None
    if key is not None and len(key) > MAX_ROUTING_KEY_CHARS:
        raise HTTPException(400, f"{ROUTING_KEY_HEADER} is over {MAX_ROUTING_KEY_CHARS} characters")
    token: str | None = getattr(request.app.state, "admin_token", None)
    given = request.headers.get(ADMIN_TOKEN_HEADER)
    may_pin = bool(token and given and hmac.compare_digest(given.encode(), token.encode()))
    return RouteHints(key, may_pin)


ServiceDep = Annotated[PrefillService, Depends(get_service)]
RouteHintsDep = Annotated[RouteHints, Depends(route_hints)]
