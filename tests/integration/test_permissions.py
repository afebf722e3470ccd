"""Patient data at rest (issue 17): file modes of a real archive, secret-file warnings, bind addresses.

Every test runs real ``vna serve`` processes (or CLI verbs) on fresh data
directories created world-readable by the test, as an operator's shell would.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import ROOT, VNA, VnaServer, free_port, self_signed
from tests.integration import scu

Factory = Callable[..., VnaServer]

TOKEN = "w" * 24


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _archive_paths(srv: VnaServer, outside: Path) -> tuple[list[Path], list[Path]]:
    """(directories, files) an archive holding one instance must protect."""
    d = srv.data_dir
    dirs = [d, d / "hot" / "r1", outside, d / "cold", d / "spool", d / "spool" / "incoming", d / "audit",
            d / "audit" / "journal"]
    files = [d / "index.sqlite", d / "audit" / "audit.log"]
    files += [p for p in (d / "index.sqlite-wal", d / "index.sqlite-shm") if p.exists()]
    blobs = [p for root in (d / "hot" / "r1", outside) for p in root.rglob("*")
             if p.is_file() and ".tmp" not in p.parts]
    assert len(blobs) == 2, blobs  # one instance, two replicas
    return dirs, files + blobs


def _serve_and_store(make_server: Factory, tmp_path: Path, corpus: list[Path], extra: str = "") -> tuple[
        VnaServer, Path]:
    outside = tmp_path / "replica-outside"
    outside.mkdir(mode=0o755)
    os.chmod(outside, 0o755)
    srv = make_server(f'{extra}[hot]\nreplicas = ["hot/r1", "{outside}"]\n', start=False)
    os.chmod(srv.data_dir, 0o755)  # as `mkdir` with the usual umask 022 makes it
    srv.start()
    assert all(r.Status == 0 for r in scu.store(srv.port, corpus[:1]))
    return srv, outside


def test_a_fresh_archive_is_owner_only(make_server: Factory, tmp_path: Path, corpus: list[Path]) -> None:
    srv, outside = _serve_and_store(make_server, tmp_path, corpus)
    dirs, files = _archive_paths(srv, outside)
    assert {str(p): oct(_mode(p)) for p in dirs} == {str(p): oct(0o700) for p in dirs}
    assert {str(p): oct(_mode(p)) for p in files} == {str(p): oct(0o600) for p in files}


def test_group_permissions_are_group_readable_never_other_readable(
        make_server: Factory, tmp_path: Path, corpus: list[Path]) -> None:
    srv, outside = _serve_and_store(make_server, tmp_path, corpus, '[archive]\npermissions = "group"\n')
    dirs, files = _archive_paths(srv, outside)
    assert {str(p): oct(_mode(p)) for p in dirs} == {str(p): oct(0o750) for p in dirs}
    assert {str(p): oct(_mode(p)) for p in files} == {str(p): oct(0o640) for p in files}


def test_existing_wider_index_file_is_tightened_at_start(make_server: Factory) -> None:
    srv = make_server(start=False)
    r = srv.cli("index", "migrate")
    assert r.returncode == 0, r.stderr
    index = srv.data_dir / "index.sqlite"
    os.chmod(index, 0o644)
    os.chmod(srv.data_dir, 0o755)
    srv.start()
    assert (_mode(srv.data_dir), _mode(index)) == (0o700, 0o600)
    assert f"{srv.data_dir}" in srv.log.read_text() and "0o755 -> 0o700" in srv.log.read_text()


def test_world_readable_config_with_secrets_is_warned_about(make_server: Factory, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "vna")
    os.chmod(key, 0o644)
    srv = make_server(f'[grpc]\nenabled = true\nhost = "127.0.0.1"\nport = {free_port()}\n'
                      f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
                      f'[[grpc.token]]\nname = "w"\ntoken = "{TOKEN}"\nrole = "write"\n', start=False)
    os.chmod(srv.config, 0o644)
    srv.start()
    lines = srv.log.read_text().splitlines()
    config_warnings = [ln for ln in lines if "WARNING" in ln and f"chmod 600 {srv.config}" in ln]
    assert len(config_warnings) == 1, lines
    assert "grpc.token" in config_warnings[0] and TOKEN not in config_warnings[0]
    assert any("WARNING" in ln and str(key) in ln and "world-readable" in ln for ln in lines), lines


def test_owner_only_config_is_not_warned_about(make_server: Factory) -> None:
    srv = make_server(f'[grpc]\nenabled = true\nhost = "127.0.0.1"\nport = {free_port()}\n'
                      f'[[grpc.token]]\nname = "w"\ntoken = "{TOKEN}"\nrole = "write"\n', start=False)
    os.chmod(srv.config, 0o600)
    srv.start()
    assert "chmod 600" not in srv.log.read_text()


def _address(hexaddr: str) -> str:
    """An address of /proc/net/tcp{,6} (32-bit words in host byte order) as text; IPv4-mapped ones as IPv4."""
    raw = b"".join(int(hexaddr[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hexaddr), 8))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _listening(port: int) -> set[str]:
    """The local addresses of the sockets listening on TCP ``port`` (read from /proc/net/tcp and tcp6)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                addr, hexport = fields[1].rsplit(":", 1)
                if fields[3] == "0A" and int(hexport, 16) == port:
                    found.add(_address(addr))
    return found


def test_grpc_and_health_follow_dicom_host(make_server: Factory) -> None:
    grpc_port, health_port = free_port(), free_port()
    srv = make_server(f'[grpc]\nenabled = true\nport = {grpc_port}\n'
                      f'[[grpc.token]]\nname = "w"\ntoken = "{TOKEN}"\nrole = "write"\n'
                      f'[health]\nport = {health_port}\n')  # started with --host 127.0.0.1
    assert _listening(srv.port) == {"127.0.0.1"}
    assert _listening(grpc_port) == {"127.0.0.1"}
    assert _listening(health_port) == {"127.0.0.1"}
    with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/health", timeout=10) as r:
        assert r.status == 200


def test_explicit_health_host_is_kept(make_server: Factory) -> None:
    health_port = free_port()
    make_server(f'[health]\nhost = "0.0.0.0"\nport = {health_port}\n')
    assert _listening(health_port) == {"0.0.0.0"}


def test_only_own_directories_and_regular_files_are_tightened(tmp_path: Path) -> None:
    """A device as the audit path and a data dir owned by another user keep their modes (a WARNING says so)."""
    device = tmp_path / "full"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # a /dev/full of the test's own
    os.chmod(device, 0o666)
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)
    os.chown(data, 65534, 65534)
    config = tmp_path / "vna.toml"
    config.write_text(f'[audit]\npath = "{device}"\n')
    r = subprocess.run([*VNA, "config", "show", "--config", str(config), "--data-dir", str(data)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (_mode(device), _mode(data)) == (0o666, 0o755)
    assert f"{device} is 0o666" in r.stderr and f"{data} is 0o755" in r.stderr


@pytest.mark.parametrize("toml, setting", [
    ('[index.cassandra]\npassword = "s3cr3t"\n', "index.cassandra.password"),
    ('[cold]\nbackend = "s3"\n[cold.s3]\nbucket = "b"\nsecret_key = "s3cr3t"\n', "cold.s3.secret_key"),
    ('[[hot.s3]]\nbucket = "b"\nsecret_key = "s3cr3t"\n', "hot.s3.secret_key"),
    ('[archive]\nsite_id = "A"\n[[federation.site]]\nid = "B"\ngrpc_endpoint = "b:1"\ntoken = "0123456789abcdef"\n',
     "federation.site.token"),
])
@pytest.mark.parametrize("permissions, mode, warned", [
    ("owner", 0o640, True), ("owner", 0o600, False), ("group", 0o640, False), ("group", 0o644, True)])
def test_config_secrets_readable_by_others_are_warned_about(
        tmp_path: Path, toml: str, setting: str, permissions: str, mode: int, warned: bool) -> None:
    config = tmp_path / "vna.toml"
    config.write_text(f'{toml}[archive]\npermissions = "{permissions}"\n' if "[archive]" not in toml
                      else toml.replace("[archive]\n", f'[archive]\npermissions = "{permissions}"\n'))
    os.chmod(config, mode)
    r = subprocess.run([*VNA, "config", "show", "--config", str(config), "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "WARNING" in ln and str(config) in ln]
    assert len(lines) == (1 if warned else 0), r.stderr
    if warned:
        fix = "chmod 600" if permissions == "owner" else "chmod 640"
        assert setting in lines[0] and f"{fix} {config}" in lines[0] and "s3cr3t" not in lines[0]
