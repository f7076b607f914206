"""FastAPI dependencies shared by the front door's routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from prefill_service.service import PrefillService


def get_service(request: Request) -> PrefillService:
    return request.app.state.service


ServiceDep = Annotated[PrefillService, Depends(get_service)]
