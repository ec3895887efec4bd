"""pyvirtd's REST API (FastAPI).  `make_app(manager)` builds the application; the daemon
serves it on a Unix socket.  Every error answers with {"detail": "one clear sentence"}."""

from __future__ import annotations

from typing import Any

from fastapi import Body, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from pyvirt.errors import PyvirtError
from pyvirt.host.agent_api import add_agent_routes
from pyvirt.host.errors import HostError
from pyvirt.host.manager import Manager
from pyvirt.host.migration_api import add_migration_routes
from pyvirt.host.models import NAME_RULE, SNAPSHOT_NAME_RULE, ExportRequest, ImportRequest, VmCreate
from pyvirt.host.snapshot_api import add_snapshot_routes
from pyvirt.spec import limit_message
from pyvirt.version import __version__

MAX_STOP_TIMEOUT = 600.0


class ErrorBody(BaseModel):
    detail: str


class LogChunk(BaseModel):
    text: str            # the console output from `start` (decoded as UTF-8, bad bytes replaced)
    start: int           # its byte offset in the console log
    offset: int          # where the next read continues (the log's size when read)


ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such VM"},
    409: {"model": ErrorBody, "description": "not possible in the VM's state"},
    422: {"model": ErrorBody, "description": "invalid request"},
}
NamePath = Path(..., description="the VM's name (or id)")


def _validation_message(exc: RequestValidationError, path: str = "") -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        msg = limit_message(dict(err), size=where in ("memory", "memory_limit"))
        if err.get("type") == "string_pattern_mismatch" and where == "name":
            msg = SNAPSHOT_NAME_RULE if path.endswith("/snapshots") else NAME_RULE
        value = err.get("input")
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and where != "request":
            where = f"{where} {format(value, 'g') if isinstance(value, float) else value}"
        parts.append(f"{where}: {msg}")
    return "invalid request: " + "; ".join(parts)


def make_app(manager: Manager) -> FastAPI:
    app = FastAPI(title="pyvirtd", version=__version__,
                  description="The pyvirt hypervisor service: VMs as one runner process each.")

    @app.exception_handler(HostError)
    async def _host_error(_request: Request, exc: HostError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(PyvirtError)
    async def _pyvirt_error(_request: Request, exc: PyvirtError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc, _request.url.path)}, status_code=422)

    @app.get("/info", summary="the daemon: version, state directory, cgroup support, VM counts")
    def info() -> dict[str, Any]:
        return manager.info()

    @app.get("/vms", summary="all VMs")
    def list_vms() -> list[dict[str, Any]]:
        return manager.list()

    @app.post("/vms", status_code=201, responses=ERRORS, summary="define a VM (it starts stopped)")
    def create_vm(req: VmCreate = Body(...)) -> dict[str, Any]:
        return manager.create(req)

    @app.get("/vms/{name}", responses=ERRORS, summary="a VM's definition and state")
    def inspect_vm(name: str = NamePath) -> dict[str, Any]:
        return manager.inspect(name)

    @app.delete("/vms/{name}", status_code=204, responses=ERRORS,
                summary="delete a stopped VM (force: kill it first if running)")
    def delete_vm(name: str = NamePath, force: bool = Query(False)) -> None:
        manager.delete(name, force=force)

    @app.post("/vms/{name}/start", responses=ERRORS, summary="start a stopped or crashed VM")
    def start_vm(name: str = NamePath) -> dict[str, Any]:
        return manager.start(name)

    @app.post("/vms/{name}/stop", responses=ERRORS,
              summary="ask the guest to power off; force it off after `timeout` seconds")
    def stop_vm(name: str = NamePath,
                timeout: float = Query(10.0, ge=0, le=MAX_STOP_TIMEOUT)) -> dict[str, Any]:
        return manager.stop(name, timeout)

    @app.post("/vms/{name}/kill", responses=ERRORS, summary="end a running VM now")
    def kill_vm(name: str = NamePath) -> dict[str, Any]:
        return manager.kill(name)

    @app.post("/vms/{name}/pause", responses=ERRORS, summary="stop the VM's harts and clock")
    def pause_vm(name: str = NamePath) -> dict[str, Any]:
        return manager.pause(name)

    @app.post("/vms/{name}/resume", responses=ERRORS, summary="let a paused VM go on")
    def resume_vm(name: str = NamePath) -> dict[str, Any]:
        return manager.resume(name)

    @app.get("/vms/{name}/logs", response_model=LogChunk, responses=ERRORS,
             summary="the console log: its last `tail` bytes, or from byte `offset` on")
    def logs(name: str = NamePath, tail: int = Query(64 * 1024, ge=0, le=1 << 20),
             offset: int | None = Query(None, ge=0)) -> LogChunk:
        start, data, end = manager.logs(name, tail=tail, offset=offset)
        return LogChunk(text=data.decode(errors="replace"), start=start, offset=end)

    @app.post("/vms/{name}/export", responses=ERRORS,
              summary="write a stopped VM (or one of its snapshots) to a new archive file")
    def export_vm(req: ExportRequest, name: str = NamePath) -> dict[str, Any]:
        return manager.export(name, req.path, req.snapshot)

    @app.post("/vms/import", status_code=201, responses=ERRORS,
              summary="define a VM from an export archive (checked whole first)")
    def import_vm(req: ImportRequest) -> dict[str, Any]:
        return manager.import_(req.path, req.name, nets=req.nets, memory_limit=req.memory_limit,
                               cpu_quota=req.cpu_quota)

    add_snapshot_routes(app, manager, ERRORS)
    add_migration_routes(app, manager, ERRORS)
    add_agent_routes(app, manager, ERRORS)
    return app
