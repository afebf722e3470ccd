"""The README as a new operator reads it (issue 20): the Quickstart retrieves a study it just stored,
every link stays inside the repository, and the schema versions it names are what `vna index migrate`
prints."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from tests.conftest import ROOT, VNA, VnaServer

README = (ROOT / "README.md").read_text()

Factory = Callable[..., VnaServer]


def _quickstart() -> list[str]:
    block = re.search(r"^## Quickstart\n.*?^```\n(.*?)^```", README, re.S | re.M)
    assert block is not None
    return block.group(1).replace("\\\n", " ").splitlines()


def test_the_quickstart_retrieves_a_study_it_just_stored(make_server: Factory, corpus: list[Path],
                                                         tmp_path: Path) -> None:
    srv = make_server()
    work = tmp_path / "work"
    (work / "study").mkdir(parents=True)
    for f in corpus[:3]:  # one study
        shutil.copy(f, work / "study" / f.name)
    lines = [ln.split("#")[0].replace("localhost 11112", f"127.0.0.1 {srv.port}") for ln in _quickstart()
             if ln.split()[0] in ("storescu", "getscu") or ln.startswith("STUDY=")]
    assert [ln.split()[0].split("=")[0] for ln in lines] == ["storescu", "STUDY", "getscu"], lines
    assert "1.2.3" not in "\n".join(lines)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=work, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"})
    assert r.returncode == 0, r.stderr
    fetched = [p for p in work.iterdir() if p.is_file()]
    assert len(fetched) == 3, (sorted(p.name for p in work.iterdir()), r.stderr)


def test_no_link_points_outside_the_repository() -> None:
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    assert targets
    for target in targets:
        assert "://" not in target, target
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), target


def test_the_schema_versions_named_are_what_index_migrate_prints(tmp_path: Path) -> None:
    from vna.index import cassandra, sqlite

    named = dict((b, int(v)) for v, b in re.findall(r"`index schema at version (\d+) \((\w+)\)`", README))
    assert named == {"sqlite": sqlite.SCHEMA_VERSION, "cassandra": cassandra.SCHEMA_VERSION}, named
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNA_")}
    r = subprocess.run([*VNA, "index", "migrate", "--data-dir", str(tmp_path / "data")], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"index schema at version {named['sqlite']} (sqlite)"
