"""The cluster launcher's pieces that need no running servers: plans, configs, the HAProxy template."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT
from vna.config import load_config


def test_example_frontend_configs_load() -> None:
    for name in ("frontend-shared.toml", "frontend-s3.toml"):
        cfg = load_config(ROOT / "ops" / "cluster" / name)
        assert cfg.index.backend == "cassandra" and cfg.health.port and cfg.grpc.enabled
        assert cfg.hot.count == 2 and cfg.hot.quorum == 2


@pytest.mark.parametrize("hot", ["shared", "s3"])
def test_rendered_configs_are_valid(cluster_launcher: ModuleType, tmp_path: Path, hot: str) -> None:
    c = cluster_launcher.plan(tmp_path, 3, cassandra=("127.0.0.1", 9042), s3_endpoint="http://127.0.0.1:1",
                              hot=hot)
    for fe in c.frontends:
        (tmp_path / f"{fe.name}.toml").write_text(cluster_launcher.frontend_config(c, fe))
        cfg = load_config(tmp_path / f"{fe.name}.toml")
        assert cfg.health.port == fe.health_port and cfg.dicom.port == fe.dicom_port
        assert cfg.hot.count == 2 and (len(cfg.hot.s3) == 2) == (hot == "s3")
    haproxy = tmp_path / "haproxy.cfg"
    haproxy.write_text(cluster_launcher.haproxy_config(c))
    check = subprocess.run([*cluster_launcher.haproxy_command(haproxy)[:1], "-c", "-f", str(haproxy)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    text = haproxy.read_text()
    assert len(re.findall(r"^    server fe\d 127.0.0.1:\d+ check port \d+$", text, re.M)) == 6


def test_bad_plans_are_refused(cluster_launcher: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(cluster_launcher.ClusterError, match="frontends"):
        cluster_launcher.plan(tmp_path, 0)
    with pytest.raises(cluster_launcher.ClusterError, match="hot"):
        cluster_launcher.plan(tmp_path, 2, hot="tape")
    r = subprocess.run([*cluster_launcher.vna_command()[:1], str(ROOT / "ops" / "cluster" / "cluster.py"),
                        "status", "--dir", str(tmp_path / "none")], capture_output=True, text=True)
    assert r.returncode == 1 and "no cluster recorded" in r.stderr
