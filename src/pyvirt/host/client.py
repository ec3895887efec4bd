"""A Python client for pyvirtd, over its Unix socket (what the `pyvirt` CLI uses).

    from pyvirt import Client
    c = Client()                       # the state directory's daemon ($PYVIRT_STATE_DIR, ...)
    c.create("web", memory="64M", command="sleep 1000"); c.start("web")
    c.create("svc", VmRequest(memory="64M", ports=["8080:80"]))   # (from pyvirt import VmRequest)
    c.wait("job")                      # until a VM has powered off (or stopped, or crashed)
    c.list(); c.inspect("web"); c.stop("web", timeout=5); c.delete("web")

Errors raise `ApiError` (a PyvirtError: the daemon's one-line `detail` and the
HTTP status) or `DaemonNotRunning`.
"""

from __future__ import annotations

import builtins
import os
import time
from pathlib import Path
from typing import Any

import httpx

from pyvirt.errors import ConfigError, PyvirtError
from pyvirt.host.agent_client import AgentCalls
from pyvirt.host.paths import api_socket
from pyvirt.host.paths import state_dir as find_state_dir
from pyvirt.request import VmRequest


class ApiError(PyvirtError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class DaemonNotRunning(ConfigError):
    pass


class Client(AgentCalls):
    """pyvirtd's API; the guest agent's calls (exec, run, copy_from, copy_to, guest_ports, tcp)
    come from host/agent_client.py."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, timeout: float = 60.0) -> None:
        self.state_dir = find_state_dir(state_dir, create=False)
        self.socket = api_socket(self.state_dir)
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                                  base_url="http://pyvirtd", timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, timeout: float | None = None, **kw: Any) -> Any:
        if timeout is not None:
            kw["timeout"] = timeout
        try:
            r = self._http.request(method, path, **kw)
        except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(f"pyvirtd is not running (no answer on {self.socket}); "
                                   "start it with `pyvirt daemon`") from None
        except httpx.TimeoutException:
            raise ApiError(504, f"pyvirtd did not answer {method} {path} in time") from None
        except httpx.HTTPError as e:
            raise ApiError(502, f"talking to pyvirtd: {e}") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, str(detail))
        return r.json() if r.status_code != 204 and r.content else None

    def info(self) -> dict[str, Any]:
        return self._call("GET", "/info")

    def list(self) -> list[dict[str, Any]]:
        return self._call("GET", "/vms")

    def create(self, name: str, request: VmRequest | None = None, **fields: Any) -> dict[str, Any]:
        """Define VM `name` from `request` (pyvirt.request.VmRequest, what `pyvirt create`
        sends) and/or its fields as keywords (memory="64M", command=..., ports=["8080:80"])."""
        given = request.model_dump(exclude_defaults=True) if request is not None else {}
        body = {"name": name, **given, **{k: v for k, v in fields.items() if v is not None}}
        return self._call("POST", "/vms", json=body)

    def inspect(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/vms/{name}")

    def start(self, name: str) -> dict[str, Any]:
        return self._call("POST", f"/vms/{name}/start")

    def stop(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        return self._call("POST", f"/vms/{name}/stop", params={"timeout": timeout}, timeout=timeout + 30)

    def wait(self, name: str, timeout: float | None = None, interval: float = 0.2) -> dict[str, Any]:
        """Wait until the VM is no longer running or paused (it powered off, was stopped or
        crashed): its inspect() then.  TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            vm = self.inspect(name)
            if vm["state"] not in ("running", "paused"):
                return vm
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"VM {name} is still {vm['state']} after {timeout:g} s")
            time.sleep(interval)

    def kill(self, name: str) -> dict[str, Any]:
        return self._call("POST", f"/vms/{name}/kill")

    def pause(self, name: str) -> dict[str, Any]:
        return self._call("POST", f"/vms/{name}/pause")

    def resume(self, name: str) -> dict[str, Any]:
        return self._call("POST", f"/vms/{name}/resume")

    def delete(self, name: str, force: bool = False) -> None:
        self._call("DELETE", f"/vms/{name}", params={"force": str(force).lower()})

    def logs(self, name: str, tail: int = 64 * 1024, offset: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"tail": tail}
        if offset is not None:
            params["offset"] = offset
        return self._call("GET", f"/vms/{name}/logs", params=params)

    def incoming(self, name: str, tcp: str | None = None, allow: builtins.list[str] | None = None) -> dict[str, Any]:
        """Open an endpoint for VM `name` to arrive on: {address, token} to give `migrate` (and
        tls: whether it takes TLS only -- TCP on a daemon with --tls-creds)."""
        return self._call("POST", "/migrations/incoming", json={"name": name, "tcp": tcp, "allow": allow or []})

    def migrate(self, name: str, to: str, token: str, downtime: float = 0.3, timeout: float = 600.0,
                on_timeout: str = "cancel", copy_storage: bool = False,
                tls_hostname: str | None = None) -> dict[str, Any]:
        """Live-migrate the running VM `name` to the endpoint `to`; its record (state migrated).
        `copy_storage`: copy its disks there too (else the destination must share them).
        `tls_hostname`: over TCP with the daemon's --tls-creds, the name the destination's
        certificate must carry (default: the address's host)."""
        body = {"to": to, "token": token, "downtime": downtime, "timeout": timeout, "on_timeout": on_timeout,
                "copy_storage": copy_storage, "tls_hostname": tls_hostname}
        return self._call("POST", f"/vms/{name}/migrate", json=body, timeout=timeout + 300)

    def export(self, name: str, path: str | os.PathLike[str], snapshot: str | None = None) -> dict[str, Any]:
        body = {"path": str(Path(path).expanduser().absolute()), "snapshot": snapshot}
        return self._call("POST", f"/vms/{name}/export", json=body, timeout=3600)

    def import_(self, path: str | os.PathLike[str], name: str | None = None,
                nets: builtins.list[str] | None = None,
                memory_limit: int | str | None = None, cpu_quota: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"path": str(Path(path).expanduser().absolute()), "name": name,
                                "nets": nets or [], "memory_limit": memory_limit, "cpu_quota": cpu_quota}
        return self._call("POST", "/vms/import", json=body, timeout=3600)

    def console_socket(self, name: str) -> Path:
        return Path(self.inspect(name)["paths"]["console_socket"])

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot(self, vm: str, name: str) -> dict[str, Any]:
        return self._call("POST", f"/vms/{vm}/snapshots", json={"name": name}, timeout=660)

    def snapshots(self) -> builtins.list[dict[str, Any]]:
        return self._call("GET", "/snapshots")

    def snapshot_info(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/snapshots/{name}")

    def delete_snapshot(self, name: str) -> None:
        self._call("DELETE", f"/snapshots/{name}")

    def restore(self, snapshot: str, name: str | None = None) -> dict[str, Any]:
        return self._call("POST", f"/snapshots/{snapshot}/restore", json={"name": name}, timeout=120)

    def clone(self, snapshot: str, count: int, prefix: str | None = None) -> builtins.list[dict[str, Any]]:
        return self._call("POST", f"/snapshots/{snapshot}/clone", json={"count": count, "prefix": prefix},
                          timeout=60 + 30 * count)
