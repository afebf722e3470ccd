"""Helpers shared by every ``vna`` verb module: common flags, config loading, job output."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from vna import permissions
from vna.config import Config, load_config
from vna.jobs import JobReport

__all__ = ["add_common", "load", "add_job_flags", "print_report"]


def add_common(p: argparse.ArgumentParser) -> None:
    """--config, --data-dir, --log-level."""
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--data-dir", help="data directory (default ./vna-data)")
    p.add_argument("--log-level", default=os.environ.get("VNA_LOG_LEVEL", "INFO"))


def load(args: argparse.Namespace) -> Config:
    """The effective config: file < VNA_* environment < flags.

    Once loaded, ``archive.permissions`` becomes the process umask (and vna's
    existing top-level paths are tightened to it), and readable secrets are
    warned about: see :mod:`vna.permissions`.
    """
    over: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        over.setdefault("archive", {})["data_dir"] = args.data_dir
    if getattr(args, "dicom_port", None):
        over.setdefault("dicom", {})["port"] = args.dicom_port
    if getattr(args, "ae_title", None):
        over.setdefault("dicom", {})["ae_title"] = args.ae_title
    if getattr(args, "workers", None):
        over.setdefault("dicom", {})["workers"] = args.workers
    if getattr(args, "host", None):
        over.setdefault("dicom", {})["host"] = args.host
    cfg = load_config(args.config, env=os.environ, overrides=over)
    permissions.apply(cfg)
    permissions.warn_readable_secrets(cfg, args.config)
    return cfg


def add_job_flags(p: argparse.ArgumentParser, destructive: bool = False) -> None:
    """--once, --limit, --dry-run, --json (and --yes for destructive jobs)."""
    p.add_argument("--once", action="store_true", help="one bounded run, then exit (the default for the CLI)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items")
    p.add_argument("--dry-run", action="store_true", help="report what would be done, change nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    if destructive:
        p.add_argument("--yes", action="store_true", help="confirm a destructive run")


def print_report(report: JobReport, as_json: bool) -> int:
    """Print the report; exit code 1 if it has findings or failures."""
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for d in report.details:
            print("  " + " ".join(f"{k}={v}" for k, v in d.items()))
        print(report.summary())
    return 1 if report.findings or report.failures else 0
