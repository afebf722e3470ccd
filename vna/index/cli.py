"""``vna index janitor``: abandoned registrations listed and cleaned (the parser lives in vna/cli.py)."""

from __future__ import annotations

import argparse
import json

from vna import preflight
from vna.cli_support import load

__all__ = ["cmd_index_janitor"]


def cmd_index_janitor(args: argparse.Namespace) -> int:
    """Run the index janitor once; exit 1 if abandoned registrations are left."""
    from vna.index import open_index
    from vna.index.janitor import IndexJanitor

    cfg = load(args)
    preflight.require_archive(cfg)
    index = open_index(cfg)
    try:
        report = IndexJanitor(index).run_once(limit=args.limit, dry_run=args.dry_run)
    finally:
        index.close()
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 1 if report.findings or report.failures else 0
