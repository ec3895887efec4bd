"""x509 credentials for migration tests and benchmarks, made with the `openssl` command line
in the layout `pyvirtd --tls-creds DIR` reads (QEMU's tls-creds-x509): ca-cert.pem,
server-cert.pem, server-key.pem, client-cert.pem, client-key.pem.  The server certificate
names localhost and 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {args[0]}: {r.stderr.strip()[-300:]}")


def make_ca(d: Path) -> Path:
    """A CA in `d` (ca-cert.pem, ca-key.pem)."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=pyvirt test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)
    return d


def issue(ca: Path, d: Path, name: str, server: bool, days: int = 2) -> None:
    """`name`-cert.pem and `name`-key.pem in `d`, signed by the CA in `ca`, valid `days` from
    now (-1: expired yesterday)."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN=pyvirt test {name}", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\n"
                   + ("extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n" if server
                      else "extendedKeyUsage=clientAuth\n"))
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca / "ca-cert.pem"), "-CAkey", str(ca / "ca-key.pem"),
             "-CAcreateserial", "-out", f"{name}-cert.pem", "-extfile", ext.name, "-days", str(days), cwd=d)
    (d / f"{name}.csr").unlink()
    ext.unlink()


def make_creds(d: Path, ca: Path | None = None) -> Path:
    """The five files in `d`: a new CA's (or the one in `ca`'s) and a server and a client
    certificate it signed."""
    ca = ca or make_ca(d / "ca")
    d.mkdir(parents=True, exist_ok=True)
    if ca != d:
        shutil.copy(ca / "ca-cert.pem", d / "ca-cert.pem")
    issue(ca, d, "server", server=True)
    issue(ca, d, "client", server=False)
    return d
