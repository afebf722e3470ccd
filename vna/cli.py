"""The ``vna`` command. Each verb is a testable ``main(argv) -> int``.

Exit codes: 0 clean, 1 findings or failures, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

from vna.config import Config, load_config
from vna.errors import ConfigError, VnaError

__all__ = ["main"]

log = logging.getLogger("vna")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--data-dir", help="data directory (default ./vna-data)")
    p.add_argument("--log-level", default=os.environ.get("VNA_LOG_LEVEL", "INFO"))


def _load(args: argparse.Namespace) -> Config:
    over: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        over.setdefault("archive", {})["data_dir"] = args.data_dir
    if getattr(args, "dicom_port", None):
        over.setdefault("dicom", {})["port"] = args.dicom_port
    if getattr(args, "ae_title", None):
        over.setdefault("dicom", {})["ae_title"] = args.ae_title
    if getattr(args, "host", None):
        over.setdefault("dicom", {})["host"] = args.host
    return load_config(args.config, env=os.environ, overrides=over)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at INFO; keep it to warnings
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the DIMSE server until SIGTERM/SIGINT."""
    from vna.archive import Archive
    from vna.dicom.server import DicomServer

    cfg = _load(args)
    spool = cfg.resolve("spool/incoming")
    spool.mkdir(parents=True, exist_ok=True)
    for stale in spool.iterdir():  # never acknowledged: a previous process died mid-receive
        stale.unlink(missing_ok=True)
    # pynetdicom spools incoming datasets with tempfile: keep them on the data disk
    tempfile.tempdir = str(spool)
    archive = Archive(cfg)
    server = DicomServer(archive, cfg.dicom)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    log.info("vna ready: DICOM AE %s listening on %s:%d (index %s, %d hot replicas, W=%d, data %s)",
             cfg.dicom.ae_title, cfg.dicom.host, cfg.dicom.port, cfg.index.backend,
             len(cfg.hot.replicas), cfg.hot.quorum, cfg.data_dir)
    stop.wait()
    log.info("vna stopping")
    server.stop()
    archive.close()
    log.info("vna stopped")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the effective config as JSON."""
    cfg = _load(args)
    print(json.dumps(cfg.as_dict(), indent=2))
    return 0


def cmd_index_stats(args: argparse.Namespace) -> int:
    """Print index counts and bytes per tier."""
    from vna.index import open_index

    cfg = _load(args)
    index = open_index(cfg)
    try:
        s = index.stats()
    finally:
        index.close()
    if args.json:
        print(json.dumps({
            "patients": s.patients, "studies": s.studies, "series": s.series, "instances": s.instances,
            "content_bytes": s.content_bytes,
            "tiers": {k: {"placements": v.placements, "stored_bytes": v.stored_bytes, "by_state": v.by_state}
                      for k, v in s.tiers.items()},
        }, indent=2))
        return 0
    print(f"patients   {s.patients}")
    print(f"studies    {s.studies}")
    print(f"series     {s.series}")
    print(f"instances  {s.instances}")
    print(f"bytes      {s.content_bytes}")
    for tier, t in sorted(s.tiers.items()):
        states = ", ".join(f"{k}={v}" for k, v in sorted(t.by_state.items()))
        print(f"tier {tier:<5} placements {t.placements}  stored bytes (OK) {t.stored_bytes}  [{states}]")
    return 0


def cmd_index_migrate(args: argparse.Namespace) -> int:
    """Create or upgrade the index schema."""
    from vna.index import open_index

    cfg = _load(args)
    index = open_index(cfg)
    try:
        version = index.migrate()
    finally:
        index.close()
    print(f"index schema at version {version} ({cfg.index.backend})")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    """Ingest Part 10 files directly (bulk import), one line per file."""
    from vna.archive import Archive

    cfg = _load(args)
    archive = Archive(cfg)
    failures = 0
    try:
        files: list[Path] = []
        for name in args.paths:
            p = Path(name)
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
        for f in files:
            try:
                r = archive.ingest.ingest_file(f, source_ae="vna-cli")
                print(f"{'duplicate' if r.duplicate else 'stored'} {f} {r.sop_uid}")
            except VnaError as exc:
                failures += 1
                print(f"failed {f}: {exc}", file=sys.stderr)
    finally:
        archive.close()
    print(f"{len(files) - failures} stored, {failures} failed")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every verb."""
    parser = argparse.ArgumentParser(prog="vna", description="vendor-neutral archive")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("serve", help="run the archive (DICOM DIMSE)")
    _common(p)
    p.add_argument("--dicom-port", type=int)
    p.add_argument("--ae-title")
    p.add_argument("--host")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("config", help="configuration")
    csub = p.add_subparsers(dest="what", required=True)
    q = csub.add_parser("show", help="print the effective configuration")
    _common(q)
    q.add_argument("--dicom-port", type=int)
    q.add_argument("--ae-title")
    q.set_defaults(func=cmd_config_show)

    p = sub.add_parser("index", help="index administration")
    isub = p.add_subparsers(dest="what", required=True)
    q = isub.add_parser("stats", help="counts and bytes per tier")
    _common(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_index_stats)
    q = isub.add_parser("migrate", help="create or upgrade the schema")
    _common(q)
    q.set_defaults(func=cmd_index_migrate)

    p = sub.add_parser("store", help="import DICOM files or directories")
    _common(p)
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_store)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vna`` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"vna: configuration error: {exc}", file=sys.stderr)
        return 2
    except VnaError as exc:
        print(f"vna: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
