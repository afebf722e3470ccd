"""Helpers shared by every ``vna`` verb module: common flags, config loading, job output."""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

from vna import permissions
from vna.config import Config, env_settings, load_config
from vna.jobs import JobReport

__all__ = ["add_common", "load", "add_job_flags", "print_report", "setting_origins", "explain"]

#: the choices of --log-level
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: the flags that set a setting: attribute of the parsed arguments -> (setting, flag)
_FLAGS: dict[str, tuple[str, str]] = {
    "data_dir": ("archive.data_dir", "--data-dir"),
    "dicom_port": ("dicom.port", "--dicom-port"),
    "ae_title": ("dicom.ae_title", "--ae-title"),
    "workers": ("dicom.workers", "--workers"),
    "host": ("dicom.host", "--host"),
}


def add_common(p: argparse.ArgumentParser) -> None:
    """--config, --data-dir, --log-level."""
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--data-dir", help="data directory (default ./vna-data)")
    p.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                   default=os.environ.get("VNA_LOG_LEVEL", "INFO").upper(),
                   help="log level (default: $VNA_LOG_LEVEL or INFO)")


def load(args: argparse.Namespace) -> Config:
    """The effective config: file < VNA_* environment < flags.

    Once loaded, ``archive.permissions`` becomes the process umask (and vna's
    existing top-level paths are tightened to it), and readable secrets are
    warned about: see :mod:`vna.permissions`.
    """
    over: dict[str, Any] = {}
    for attr, (setting, _) in _FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None and value != "":
            section, key = setting.split(".")
            over.setdefault(section, {})[key] = value
    cfg = load_config(args.config, env=os.environ, overrides=over)
    permissions.apply(cfg)
    permissions.warn_readable_secrets(cfg, args.config)
    return cfg


def setting_origins(args: argparse.Namespace) -> dict[str, str]:
    """Settings given by a ``VNA_*`` variable or a flag (flags win): dotted name -> where it came from."""
    origins = {name: f"the environment variable {var}" for name, var in env_settings(os.environ).items()}
    for attr, (setting, flag) in _FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None and value != "":
            origins[setting] = f"the {flag} flag"
    return origins


def explain(message: str, origins: dict[str, str]) -> str:
    """``message`` with where each setting it names came from, when that was not the config file."""
    hits = [f"{setting} came from {origin}" for setting, origin in origins.items()
            if re.search(rf"(?<![\w.]){re.escape(setting)}(?![\w])", message)]
    return f"{message} ({'; '.join(hits)}, not the config file)" if hits else message


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
