"""The console's HTTP surface: its JSON routes under ``/admin/console/`` and its page.

    GET  /console/                         the page (HTML + JS + CSS, no data, no token)
    GET  /console/static/{file}            its files; ``vendor/plotly.min.js`` is the copy
                                           the pinned ``plotly`` wheel ships (no CDN)
    GET  /admin/console/policies           :func:`deploy.console.views.policies`
    GET  /admin/console/audit[?actor&limit] the newest audit entries
    GET  /admin/console/canary[?version]   :func:`deploy.console.views.canary`
    GET  /admin/console/training[?round]   :func:`deploy.console.views.training`
    POST /admin/console/rounds             {"reason"}: ask the training loop for a round now
    GET  /admin/console/traffic[?minutes]  :func:`deploy.console.views.traffic`
    GET  /admin/console/live               :func:`deploy.console.scrape.scrape` of the
                                           configured /metrics URLs

The JSON routes live under ``/admin`` so the admin API's guard
(:class:`deploy.ops.admin_api.AdminAuth`) protects them with the same bearer token before
anything else runs. The page itself holds no data: its login form keeps the token in the
tab's ``sessionStorage`` and sends it as an ``Authorization`` header, never in a URL.
Commands (promote, canary, reject, roll back, hold, resume) are the admin API's own routes.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field

from deploy.console import scrape, views
from deploy.ops.admin_api import Conn, Operator
from schemas.errors import error_body
from trainer.rounds import records as round_records
from trainer.rounds import requests as round_requests

STATIC = Path(__file__).with_name("static")
PAGE_FILES = {"console.js", "console.css"}

api = APIRouter(prefix="/admin/console")
page = APIRouter()


def plotly_js() -> Path:
    """The ``plotly.min.js`` inside the installed ``plotly`` package (pinned in
    pyproject.toml): served as is, so the console works on machines with no internet."""
    return Path(str(importlib.resources.files("plotly") / "package_data" / "plotly.min.js"))


# --- the page ------------------------------------------------------------------------------


@page.get("/console", include_in_schema=False)
def console_root() -> RedirectResponse:
    return RedirectResponse("/console/")


@page.get("/console/", include_in_schema=False)
def console_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@page.get("/console/static/{name}", include_in_schema=False, response_model=None)
def console_file(name: str) -> FileResponse | JSONResponse:
    if name not in PAGE_FILES:
        return JSONResponse(error_body(f"no console file {name!r}", code="not_found"), 404)
    return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})


@page.get("/console/static/vendor/plotly.min.js", include_in_schema=False)
def console_plotly() -> FileResponse:
    return FileResponse(
        plotly_js(),
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=86400"},
    )


# --- JSON ----------------------------------------------------------------------------------


@api.get("/policies")
def policies(conn: Conn) -> dict[str, Any]:
    return views.policies(conn)


@api.get("/audit")
def audit(
    conn: Conn,
    actor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> dict[str, Any]:
    return {"entries": views.audit(conn, actor=actor, limit=limit)}


@api.get("/canary")
def canary(conn: Conn, version: str | None = None) -> dict[str, Any]:
    return views.canary(conn, version)


@api.get("/training", response_model=None)
def training(
    conn: Conn, round: Annotated[int | None, Query(ge=1, alias="round")] = None
) -> dict[str, Any] | JSONResponse:
    try:
        return views.training(conn, round)
    except round_records.UnknownRound:
        return JSONResponse(
            error_body(f"no training round {round}", param="round", code="round_not_found"), 404
        )


class RoundBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000, description="Why a round now.")


@api.post("/rounds", status_code=202, response_model=None)
def request_round(conn: Conn, actor: Operator, body: RoundBody) -> dict[str, Any] | JSONResponse:
    """Ask the training loop for a round at its next poll (202); 409 ``request_open`` when a
    request waits already."""
    try:
        request = round_requests.request_round(conn, actor=actor, reason=body.reason)
    except round_requests.RequestAlreadyOpen as exc:
        return JSONResponse(error_body(str(exc), code="request_open"), status_code=409)
    return {"request": {"id": request.id, "requested_by": request.requested_by}}


@api.get("/traffic")
def traffic(conn: Conn, minutes: Annotated[int, Query(ge=1, le=1440)] = 60) -> dict[str, Any]:
    return views.traffic(conn, minutes=minutes)


@api.get("/live")
def live(request: Request) -> dict[str, Any]:
    urls = request.app.state.console_metrics_urls
    return {"targets": scrape.scrape(urls)}
