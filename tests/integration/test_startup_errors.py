"""Start-up failures and CLI edges an operator meets first (issue 20), through real ``vna`` processes.

Every failed start: exit 2, one ``vna: configuration error:`` line naming the
setting, its value and what to do, no traceback, and no half-made data dir.
"""

from __future__ import annotations

import os
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

import vna
from tests.conftest import ROOT, VNA, VnaServer, free_port, self_signed

Factory = Callable[..., VnaServer]
TOKEN = "t" * 24
GRPC_TOKEN = f'[[grpc.token]]\nname = "w"\ntoken = "{TOKEN}"\nrole = "write"\n'


def vna_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNA_")}
    return subprocess.run([*VNA, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def serve(tmp_path: Path, toml: str, data: Path, port: int | None = None) -> subprocess.CompletedProcess[str]:
    """``vna serve`` that is expected to fail at start (it would serve forever otherwise: the timeout fails it)."""
    config = tmp_path / "failing.toml"
    config.write_text(toml)
    return vna_cli("serve", "--config", str(config), "--data-dir", str(data), "--host", "127.0.0.1",
                   "--dicom-port", str(port or free_port()))


def config_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The one error line of a failed start (exit 2), holding every needle."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("vna: ")]
    assert len(errors) == 1, r.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@contextmanager
def _taken_port() -> Iterator[int]:
    """A loopback port another socket listens on inside the block."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


def test_dicom_port_of_a_running_vna(make_server: Factory, tmp_path: Path) -> None:
    first = make_server()
    data = tmp_path / "second"
    line = config_error(serve(tmp_path, "", data, first.port), "dicom.port", str(first.port), "in use")
    assert "--dicom-port" in line  # the value came from the flag, and the fix is another port
    assert not data.exists()


def test_grpc_port_in_use(make_server: Factory, tmp_path: Path) -> None:
    grpc_port = free_port()
    make_server(f"[grpc]\nenabled = true\nport = {grpc_port}\n{GRPC_TOKEN}")
    data = tmp_path / "second"
    config_error(serve(tmp_path, f"[grpc]\nenabled = true\nport = {grpc_port}\n{GRPC_TOKEN}", data),
                 "grpc.port", str(grpc_port), "in use")
    assert not data.exists()


def test_health_port_in_use(tmp_path: Path) -> None:
    with _taken_port() as port:
        data = tmp_path / "data"
        config_error(serve(tmp_path, f"[health]\nport = {port}\n", data), "health.port", str(port), "in use")
    assert not data.exists()


@pytest.mark.parametrize("section, setting", [("dicom", "tls_cert"), ("dicom", "tls_key"),
                                              ("grpc", "tls_cert"), ("grpc", "tls_key")])
def test_a_missing_tls_file_is_named_with_its_setting(tmp_path: Path, section: str, setting: str) -> None:
    cert, key = self_signed(tmp_path, "server")
    files = {"tls_cert": cert, "tls_key": key}
    missing = tmp_path / "nowhere" / f"{setting}.pem"
    files[setting] = missing
    tls = f'tls_cert = "{files["tls_cert"]}"\ntls_key = "{files["tls_key"]}"\n'
    toml = (f"[dicom]\ntls_port = {free_port()}\n{tls}" if section == "dicom"
            else f"[grpc]\nenabled = true\nport = {free_port()}\n{tls}{GRPC_TOKEN}")
    data = tmp_path / "data"
    config_error(serve(tmp_path, toml, data), f"{section}.{setting}", str(missing))
    assert not data.exists()


def test_data_dir_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    data = tmp_path / "afile" / "data"
    config_error(serve(tmp_path, "", data), "archive.data_dir", str(data), str(tmp_path / "afile"), "not a directory")


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a read-only tmpfs holding ``existing/`` (read-only even for root)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.fail("cannot mount a tmpfs (the storage fault tests need root)")
    try:
        (mnt / "existing").mkdir()
        assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)]).returncode == 0
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.parametrize("name", ["existing", "new"])
def test_a_read_only_data_dir(tmp_path: Path, read_only_dir: Path, name: str) -> None:
    data = read_only_dir / name
    config_error(serve(tmp_path, "", data), "archive.data_dir", str(data), "not writable")


def test_index_stats_of_a_directory_without_archive(tmp_path: Path) -> None:
    r = vna_cli("index", "stats", "--data-dir", "typo-dir", cwd=tmp_path)
    line = config_error(r, "no archive", "typo-dir")
    assert "--data-dir" in line
    assert not (tmp_path / "typo-dir").exists()
    assert r.stdout == ""


def test_index_stats_of_an_archive(tmp_path: Path) -> None:
    assert vna_cli("index", "migrate", "--data-dir", "data", cwd=tmp_path).returncode == 0
    r = vna_cli("index", "stats", "--data-dir", "data", cwd=tmp_path)
    assert r.returncode == 0 and "instances  0" in r.stdout, r.stderr


def test_version() -> None:
    r = vna_cli("--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"vna {vna.__version__}")


def test_log_level_has_choices_and_help() -> None:
    r = vna_cli("config", "show", "--log-level", "LOUD")
    assert r.returncode == 2 and "invalid choice" in r.stderr and "DEBUG" in r.stderr
    assert vna_cli("config", "show", "--log-level", "debug", "--data-dir", "/nonexistent").returncode == 0
    assert "log level" in vna_cli("config", "show", "--help").stdout


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """``vna config show | head -1``: the reader is gone before vna writes; no BrokenPipeError on stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNA_")}
    proc = subprocess.Popen([*VNA, "config", "show", "--data-dir", str(tmp_path / "d")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert b"BrokenPipe" not in err and b"Traceback" not in err, err.decode()


def test_prometheus_port_in_use(tmp_path: Path) -> None:
    with _taken_port() as port:
        data = tmp_path / "data"
        toml = f'[telemetry]\nenabled = true\nprometheus_host = "127.0.0.1"\nprometheus_port = {port}\n'
        config_error(serve(tmp_path, toml, data), "telemetry.prometheus_port", str(port), "in use")
    assert not data.exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_certificate_that_is_not_pem(tmp_path: Path, workers: int) -> None:
    """Found only when the listener loads it (in a worker process when there are several): still exit 2."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    data = tmp_path / "data"
    toml = f'[dicom]\nworkers = {workers}\ntls_port = {free_port()}\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    r = serve(tmp_path, toml, data)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "configuration error: dicom TLS" in r.stderr
    assert not data.exists()
