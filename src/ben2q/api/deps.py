"""Dependencies of the routes: the process's services and the caller's API key.

``authenticated`` runs on every ``/v1`` request: it finds the key of the bearer token
(one Redis read, no cache, so a revoked key is refused at once everywhere), takes one unit
of the key's request limit, and leaves the decision in ``request.state.rate`` for the
``RateLimit`` headers that ``app`` adds to every answer.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..keys import ApiKey, RateDecision, RateLimit
from .problems import Problem
from .state import Services

bearer = HTTPBearer(auto_error=False, description="An API key from `ben2q keys create`.")


async def services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]


def rate_headers(decisions: list[RateDecision]) -> dict[str, str]:
    """``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers)."""
    if not decisions:
        return {}
    return {
        "RateLimit-Policy": ", ".join(d.policy_item() for d in decisions),
        "RateLimit": ", ".join(d.item() for d in decisions),
    }


def limited(decision: RateDecision, decisions: list[RateDecision]) -> Problem:
    what = "requests" if decision.limit.name == "requests" else "images submitted"
    return Problem(
        429,
        "rate_limited",
        f"over this key's limit of {decision.limit.quota} {what} per minute; "
        f"retry in {decision.reset} s",
        headers={**rate_headers(decisions), "Retry-After": str(decision.reset)},
    )


async def authenticated(
    request: Request,
    svc: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    challenge = {"WWW-Authenticate": 'Bearer realm="ben2q"'}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Problem(
            401, "unauthorized", "send 'Authorization: Bearer <API key>'", headers=challenge
        )
    found = await svc.keys.authenticate_request(
        credentials.credentials, svc.settings.api_rate_requests
    )
    if found is None:
        raise Problem(401, "unauthorized", "unknown or revoked API key", headers=challenge)
    key, decision = found
    request.state.key = key
    request.state.rate = [decision]
    if not decision.allowed:
        raise limited(decision, request.state.rate)
    return key


KeyDep = Annotated[ApiKey, Depends(authenticated)]


async def take_images(request: Request, svc: Services, key: ApiKey, count: int) -> None:
    """Take ``count`` images from the key's image limit (429 when over it)."""
    limit = RateLimit("images", key.rate_images or svc.settings.api_rate_images)
    decision = await svc.keys.take(key.id, limit, count)
    decisions = [*getattr(request.state, "rate", []), decision]
    request.state.rate = decisions
    if not decision.allowed:
        raise limited(decision, decisions)
