"""What a failed start removes: the directories it created, never a stored copy."""

from __future__ import annotations

from pathlib import Path

from vna.config import Config, load_config
from vna.preflight import missing_roots, remove_created


def _config(data_dir: Path) -> Config:
    return load_config(None, env={}, overrides={"archive": {"data_dir": str(data_dir)}})


def test_a_failed_start_removes_the_directories_it_created(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "new" / "data")
    roots = missing_roots(cfg)
    assert roots == [tmp_path / "new"]
    for sub in ("hot/r1", "hot/r2", "spool/incoming", "audit"):
        (tmp_path / "new" / "data" / sub).mkdir(parents=True)
    (tmp_path / "new" / "data" / "index.sqlite").write_bytes(b"")
    remove_created(roots, cfg)
    assert not (tmp_path / "new").exists()


def test_a_failed_start_keeps_a_created_directory_holding_a_stored_copy(tmp_path: Path) -> None:
    """A listener may have acknowledged an instance before a later step of the start failed."""
    cfg = _config(tmp_path / "new" / "data")
    roots = missing_roots(cfg)
    blob = tmp_path / "new" / "data" / "hot" / "r2" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.v1.dcm"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"DICM")
    remove_created(roots, cfg)
    assert blob.read_bytes() == b"DICM"
