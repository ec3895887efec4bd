"""pyvirtd's migration endpoints (added to the app by api.make_app; host/migration.py):

    POST /migrations/incoming      {name, tcp?, allow?}   an endpoint for VM NAME to arrive on:
                                                          {address, token, tls} (one connection, once)
    GET  /migrations/incoming/{name}                      how it goes (waiting, receiving, failed)
    POST /vms/{name}/migrate       {to, token, downtime?, timeout?, on_timeout?, copy_storage?,
                                    tls_hostname?}
                                                          move the running VM there (returns when done)
"""

from __future__ import annotations

from typing import Any

from fastapi import Body, FastAPI, Path
from pydantic import BaseModel, ConfigDict, Field

from pyvirt.host import migration
from pyvirt.host.models import NAME_RE
from pyvirt.vmm.migration import DEFAULT_DOWNTIME, DEFAULT_TIMEOUT


class IncomingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE, description="the name the arriving VM gets here")
    tcp: str | None = Field(None, max_length=300, description="HOST:PORT to listen on (default: a Unix socket "
                                                              "in the state directory)")
    allow: list[str] = Field(default_factory=list, max_length=32,
                             description="host files the VM may use here: shared disks, boot files")


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(max_length=4096, description="unix:/PATH or tcp:HOST:PORT (the incoming endpoint's address)")
    token: str = Field(max_length=256, description="the incoming endpoint's one-time token")
    downtime: float = Field(DEFAULT_DOWNTIME, gt=0, le=60, description="the pause the guest may see, seconds")
    timeout: float = Field(DEFAULT_TIMEOUT, gt=0, le=86400, description="seconds before on_timeout applies")
    on_timeout: str = Field("cancel", pattern="^(cancel|force)$",
                            description="cancel (the VM stays here) or force (pause it and finish)")
    copy_storage: bool = Field(False, description="copy the disks into the destination's VM directory "
                                                  "(libvirt's --copy-storage-all); else they must be shared")
    tls_hostname: str | None = Field(None, max_length=253, pattern=r"^[A-Za-z0-9.:_-]+$",
                                     description="over TCP with TLS: the name the destination's certificate "
                                                 "must carry (default: the address's host)")


def add_migration_routes(app: FastAPI, manager: Any, errors: dict[int | str, dict[str, Any]]) -> None:
    @app.post("/migrations/incoming", status_code=201, responses=errors,
              summary="open an endpoint for one VM to arrive on; returns its address and one-time token")
    def incoming(req: IncomingRequest = Body(...)) -> dict[str, Any]:
        return migration.open_incoming(manager, req.name, req.tcp, req.allow)

    @app.get("/migrations/incoming/{name}", responses=errors, summary="an incoming migration's state")
    def incoming_status(name: str = Path(..., description="the arriving VM's name")) -> dict[str, Any]:
        return migration.incoming_status(manager, name)

    @app.post("/vms/{name}/migrate", responses=errors,
              summary="live-migrate a running VM to another pyvirtd (returns when it has moved)")
    def migrate(name: str = Path(..., description="the VM's name (or id)"),
                req: MigrateRequest = Body(...)) -> dict[str, Any]:
        return migration.migrate(manager, name, req.to, req.token, req.downtime, req.timeout, req.on_timeout,
                                 req.copy_storage, req.tls_hostname)
