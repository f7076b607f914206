"""Admin API under /admin: upload, list, activate, roll back and delete adapter versions, and split a
task's traffic between versions (canary / A-B).

Every route needs `Authorization: Bearer <admin token>` (401 without, 403 with a wrong one; compared
in constant time). The front door's RequestGuard checks it before any body is read (an unauthenticated
upload is refused unread); the route dependency checks again. Without a configured token the routes
are not mounted at all (404), never open.
Uploads are validated completely (format, variant, shapes, fingerprint, finite values) before they
are stored, and storing never activates: a bad upload cannot disturb the version being served.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Path, Request, UploadFile
from pydantic import BaseModel, Field, StrictInt
from starlette.concurrency import run_in_threadpool

from adapters_store.base import (
    InvalidVersionError,
    StoreConflictError,
    StoreError,
    StoreUnavailableError,
    UnknownTaskError,
    UnknownVersionError,
    VersionedAdapterStore,
    VersionInfo,
)
from prad.adapters import AdapterError
from prad.adapters.config import PRAD_VARIANTS, validate_task_id
from prad.adapters.io import parse_adapter
from prad.loading import LoadedModel
from prefill_service.adapter_cache import AdapterCache
from prefill_service.api_models import error_responses
from serving.metrics import Metrics

DEFAULT_MAX_ADAPTER_BYTES = 256 << 20
MAX_SPLIT_VERSIONS = 16
ADMIN_ERRORS = (400, 401, 403, 404, 409, 503)
BODY_ERRORS = (408, 413, 422)  # routes that take a body: too slow, too big, invalid
# The store's id rules (prad/adapters/config.py TASK_ID_RE, adapters_store/base.py VERSION_RE) as
# documented patterns; FastAPI refuses what does not match (422), the store checks again ('base').
VERSION_PATTERN = "^[0-9a-f]{16}$"
TaskId = Annotated[str, Path(pattern="^[a-z0-9][a-z0-9_.-]{0,63}$", description="task id (not 'base')")]
VersionId = Annotated[str, Path(pattern=VERSION_PATTERN, description="content version: 16 lowercase hex")]


class ActivateBody(BaseModel):
    version: str = Field(pattern=VERSION_PATTERN)


class SplitBody(BaseModel):
    weights: dict[str, StrictInt] = Field(max_length=MAX_SPLIT_VERSIONS,
                                          description="adapter version -> percent of the task's traffic: at least "
                                                      "two versions of the task, integers summing to 100")


class AdminService:
    """What the admin routes do, apart from HTTP."""

    def __init__(self, store: VersionedAdapterStore, loaded: LoadedModel, max_adapter_bytes: int,
                 cache: AdapterCache | None = None, metrics: Metrics | None = None) -> None:
        self.store = store
        self.loaded = loaded
        self.max_adapter_bytes = max_adapter_bytes
        self.cache = cache
        self.metrics = metrics

    def describe(self, task: str) -> dict[str, Any]:
        """One task: its versions, active version and traffic split in the store, and on this node the
        routing it applies now (it follows the store within a poll interval), the requests each version
        served (how they ended) and the versions that could not be loaded here."""
        versions = self.store.versions(task)  # UnknownTaskError for an unknown task
        return {"task": task, "active_version": self.store.active_version(task), "split": self.store.split(task),
                "versions": [_version_row(v) for v in versions], "routing_here": self._routing_here(task),
                "served_here": self.metrics.version_counts(task) if self.metrics else {},
                "unloadable_here": self.cache.broken_versions(task) if self.cache else {}}

    def _routing_here(self, task: str) -> dict[str, Any] | None:
        """The active version and split this node routes by (its in-memory view), None if it has none."""
        if self.cache is None:
            return None
        try:
            routing = self.cache.routing(task)
        except UnknownTaskError:
            return None
        return {"active_version": routing.active, "split": dict(routing.split) or None}

    def upload(self, task: str, config_bytes: bytes, weight_bytes: bytes) -> str:
        validate_task_id(task)
        adapter = parse_adapter(config_bytes, weight_bytes, self.loaded.config, self.loaded.fingerprint,
                                source=f"upload for task {task!r}")
        if adapter.config.variant not in PRAD_VARIANTS:
            raise AdapterError(f"variant {adapter.config.variant!r} cannot be served by an adapter-free decode; "
                               f"upload one of {list(PRAD_VARIANTS)}")
        return self.store.put(task, config_bytes, weight_bytes)

    def listing(self) -> list[dict[str, Any]]:
        rows = []
        for task in self.store.known_tasks():
            rows.append({"task": task, "active_version": self.store.active_version(task),
                         "split": self.store.split(task),
                         "versions": [_version_row(v) for v in self.store.versions(task)]})
        return rows


def _version_row(v: VersionInfo) -> dict[str, Any]:
    return {"version": v.version, "created_s": v.created_s, "num_bytes": v.num_bytes, "is_active": v.is_active}


def _status_for(e: Exception) -> int:
    if isinstance(e, UnknownTaskError | UnknownVersionError):
        return 404
    if isinstance(e, StoreConflictError):
        return 409
    if isinstance(e, StoreUnavailableError):
        return 503
    if isinstance(e, AdapterError | InvalidVersionError | ValueError):
        return 400
    return 500


async def _call(fn, *args: Any) -> Any:
    try:
        return await run_in_threadpool(fn, *args)
    except (AdapterError, StoreError, KeyError, ValueError) as e:
        raise HTTPException(_status_for(e), str(e).strip("'\"")) from e


def admin_token_problem(authorization: str | None, token: str) -> tuple[int, str] | None:
    """(401, why) without credentials, (403, why) with wrong ones, None when the token matches."""
    if not authorization:
        return 401, "admin token required: Authorization: Bearer <token>"
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        return 403, "wrong admin token"
    return None


class AdminRouter(APIRouter):
    """The /admin routes, with the token they require (the app's guard checks it before the body)."""

    def __init__(self, token: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.token = token


def build_admin_router(admin: AdminService, token: str) -> AdminRouter:
    def require_token(request: Request) -> None:
        problem = admin_token_problem(request.headers.get("authorization"), token)
        if problem is not None:
            status, message = problem
            raise HTTPException(status, message, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    router = AdminRouter(token, prefix="/admin", dependencies=[Depends(require_token)],
                         responses=error_responses(*ADMIN_ERRORS))
    with_body = error_responses(*BODY_ERRORS)

    @router.get("/adapters")
    async def list_adapters() -> dict[str, Any]:
        return {"tasks": await _call(admin.listing)}

    @router.post("/adapters/{task}/versions", status_code=201, responses=with_body)
    async def upload(task: TaskId, config: Annotated[UploadFile, File()], weights: Annotated[UploadFile, File()],
                     activate: Annotated[bool, Form()] = False) -> dict[str, Any]:
        config_bytes = await _read_bounded(config, 1 << 20, "config")
        weight_bytes = await _read_bounded(weights, admin.max_adapter_bytes, "weights")
        version = await _call(admin.upload, task, config_bytes, weight_bytes)
        if activate:
            await _call(admin.store.activate, task, version)
        return {"task": task, "version": version, "activated": activate}

    @router.post("/adapters/{task}/activate", responses=with_body)
    async def activate(task: TaskId, body: ActivateBody) -> dict[str, Any]:
        await _call(admin.store.activate, task, body.version)
        return {"task": task, "version": body.version}

    @router.get("/adapters/{task}")
    async def describe(task: TaskId) -> dict[str, Any]:
        return await _call(admin.describe, task)

    @router.put("/adapters/{task}/split", responses=with_body)
    async def set_split(task: TaskId, body: SplitBody) -> dict[str, Any]:
        """Split the task's traffic between versions (a canary: e.g. {"v7": 90, "v8": 10}); requests with
        the same routing key keep their version while the weights stand. Activating a version ends it."""
        await _call(admin.store.set_split, task, body.weights)
        return {"task": task, "split": body.weights}

    @router.delete("/adapters/{task}/split")
    async def clear_split(task: TaskId) -> dict[str, Any]:
        """End the split: all traffic to the active version."""
        await _call(admin.store.clear_split, task)
        return {"task": task, "split": None}

    @router.post("/adapters/{task}/rollback")
    async def rollback(task: TaskId) -> dict[str, Any]:
        return {"task": task, "version": await _call(admin.store.rollback, task)}

    @router.delete("/adapters/{task}/versions/{version}")
    async def delete_version(task: TaskId, version: VersionId) -> dict[str, Any]:
        await _call(admin.store.delete_version, task, version)
        return {"task": task, "deleted": version}

    @router.delete("/adapters/{task}")
    async def delete_task(task: TaskId) -> dict[str, Any]:
        await _call(admin.store.delete_task, task)
        return {"task": task, "deleted": True}

    return router


async def _read_bounded(upload: UploadFile, limit: int, name: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"{name} file over the {limit}-byte limit")
    return data
