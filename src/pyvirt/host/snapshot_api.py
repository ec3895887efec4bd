"""pyvirtd's snapshot endpoints (added to the app by api.make_app):

    POST   /vms/{name}/snapshots        {name}            snapshot a running or paused VM
    GET    /snapshots                                     all snapshots
    GET    /snapshots/{name}                              one
    DELETE /snapshots/{name}                              (409 while VMs made from it exist)
    POST   /snapshots/{name}/restore    {name?}           a new VM, running from the snapshot
    POST   /snapshots/{name}/clone      {count, prefix?}  COUNT new VMs, each its own identity
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Body, FastAPI, Path
from pydantic import BaseModel, ConfigDict, Field

from pyvirt.host.models import NAME_RE
from pyvirt.host.snapshots import MAX_CLONES

if TYPE_CHECKING:
    from pyvirt.host.manager import Manager

SnapPath = Path(..., description="the snapshot's name")


class SnapshotCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE, description="unique; letters, digits, '.', '_', '-' (1-63)")


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, pattern=NAME_RE, description="the new VM's name (default SNAPSHOT-random)")


class CloneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(ge=1, le=MAX_CLONES, description="how many VMs")
    prefix: str | None = Field(None, pattern=NAME_RE, description="VMs are PREFIX-1.. (default: the snapshot's name)")


def add_snapshot_routes(app: FastAPI, manager: Manager, errors: dict[int | str, dict[str, Any]]) -> None:
    @app.post("/vms/{name}/snapshots", status_code=201, responses=errors,
              summary="snapshot a running or paused VM (between CPU slices; it goes on)")
    def take(name: str = Path(..., description="the VM's name (or id)"),
             req: SnapshotCreate = Body(...)) -> dict[str, Any]:
        return manager.take_snapshot(name, req.name)

    @app.get("/snapshots", summary="all snapshots")
    def list_snapshots() -> list[dict[str, Any]]:
        return manager.list_snapshots()

    @app.get("/snapshots/{name}", responses=errors, summary="a snapshot")
    def get_snapshot(name: str = SnapPath) -> dict[str, Any]:
        return manager.get_snapshot(name)

    @app.delete("/snapshots/{name}", status_code=204, responses=errors,
                summary="delete a snapshot no VM was made from (or whose VMs are deleted)")
    def delete_snapshot(name: str = SnapPath) -> None:
        manager.delete_snapshot(name)

    @app.post("/snapshots/{name}/restore", status_code=201, responses=errors,
              summary="a new VM that resumes exactly where the snapshot was taken")
    def restore(name: str = SnapPath, req: RestoreRequest = Body(RestoreRequest())) -> dict[str, Any]:
        return manager.restore_snapshot(name, req.name)

    @app.post("/snapshots/{name}/clone", status_code=201, responses=errors,
              summary="COUNT new VMs from the snapshot, each with its own disks, MACs, sockets and host name")
    def clone(name: str = SnapPath, req: CloneRequest = Body(...)) -> list[dict[str, Any]]:
        return manager.clone_snapshot(name, req.count, req.prefix)
