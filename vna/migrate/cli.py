"""``vna migrate plan|run|status|report`` verbs."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from typing import Any

from vna.cli_support import add_common, add_job_flags, load, print_report

__all__ = ["register", "status_rows"]


def _date(text: str) -> dt.date:
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYYMMDD") from None


def cmd_plan(args: argparse.Namespace) -> int:
    """Enumerate a source into the ledger."""
    from vna.migrate import open_ledger
    from vna.migrate.runner import plan_source
    from vna.migrate.source import DimseSource, SourceError

    cfg = load(args)
    src = cfg.migrate.find_source(args.source)
    if src is None:
        print(f"vna migrate: {args.source!r} is not a [[migrate.source]] ae_title", file=sys.stderr)
        return 2
    start = args.date_from or dt.date(1900, 1, 1)
    end = args.date_to or dt.date.today()
    if start > end:
        print("vna migrate: --from is after --to", file=sys.stderr)
        return 2
    ledger = open_ledger(cfg)
    try:
        source = DimseSource(src, cfg.dicom.ae_title)
        found, new = plan_source(ledger, source, start, end)
    except SourceError as exc:
        print(f"vna migrate plan: {exc}" + (f" ({exc.comment})" if exc.comment else ""), file=sys.stderr)
        return 1
    finally:
        ledger.close()
    out = {"source": src.ae_title, "from": start.isoformat(), "to": end.isoformat(), "studies": found,
           "new": new, "queries": source.find_queries}
    print(json.dumps(out) if args.json else
          f"plan {src.ae_title}: {found} studies found ({new} new) from {start} to {end}, "
          f"{source.find_queries} C-FIND queries")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """One bounded migration run."""
    from vna.archive import Archive
    from vna.migrate import open_ledger
    from vna.migrate.runner import MigrationJob

    cfg = load(args)
    sources = cfg.migrate.source
    if args.source:
        src = cfg.migrate.find_source(args.source)
        if src is None:
            print(f"vna migrate: {args.source!r} is not a [[migrate.source]] ae_title", file=sys.stderr)
            return 2
        sources = (src,)
    if args.limit is not None and args.limit < 1:
        print("vna migrate: --limit must be >= 1", file=sys.stderr)
        return 2
    archive = Archive(cfg)
    ledger = open_ledger(cfg)
    try:
        report = MigrationJob(archive, cfg, ledger, sources).run_once(limit=args.limit, dry_run=args.dry_run)
    finally:
        ledger.close()
        archive.close()
    return print_report(report, args.json)


def status_rows(ledger: Any, now: float) -> list[dict[str, Any]]:
    """Progress per source from the ledger's counters: studies/instances/bytes done, rate, ETA."""
    rows = []
    for source in ledger.sources():
        c = ledger.counts(source)
        first, last = ledger.times(source)
        studies = sum(x.studies for x in c.values())
        remaining = c["planned"].instances + c["failed"].instances
        rate = c["done"].archived / (last - first) if last > first else 0.0
        rows.append({"source": source, "studies": studies, "studies_done": c["done"].studies,
                     "studies_failed": c["failed"].studies, "studies_planned": c["planned"].studies,
                     "instances_done": c["done"].archived, "instances_remaining": remaining,
                     "bytes_done": c["done"].bytes, "instances_per_second": round(rate, 2),
                     "eta_seconds": round(remaining / rate) if rate and remaining else (0 if not remaining else None),
                     "last_done_at": last})
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    """Progress per source."""
    from vna.migrate import open_ledger

    ledger = open_ledger(load(args))
    try:
        rows = status_rows(ledger, time.time())
    finally:
        ledger.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no migration planned")
    for r in rows:
        total = max(r["studies"], 1)
        width = 30
        filled = int(width * r["studies_done"] / total)
        bar = f"[{'#' * filled}{'.' * (width - filled)}] " if sys.stdout.isatty() else ""
        eta = "-" if r["eta_seconds"] is None else f"{r['eta_seconds']}s"
        print(f"{r['source']}: {bar}{r['studies_done']}/{r['studies']} studies done, {r['studies_failed']} failed; "
              f"{r['instances_done']} instances, {r['bytes_done']} bytes; "
              f"{r['instances_per_second']} instances/s; ETA {eta}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Per study: expected vs archived, missing UIDs, failures with DIMSE status and comment; exit 1 if any
    study is not done."""
    from vna.migrate import open_ledger

    cfg = load(args)
    ledger = open_ledger(cfg)
    studies: list[dict[str, Any]] = []
    try:
        for source in ([args.source] if args.source else ledger.sources()):
            for p in ledger.studies(source):
                studies.append({"source": source, "study_uid": p.study_uid, "study_date": p.study_date,
                                "state": p.state, "attempts": p.attempts, "expected_instances": p.expected_instances,
                                "archived_instances": p.archived_instances, "bytes": p.bytes, "missing": p.missing,
                                "not_listed_by_source": p.extra,
                                "dimse_status": None if p.status < 0 else f"0x{p.status:04X}",
                                "comment": p.comment})
    finally:
        ledger.close()
    open_ = [s for s in studies if s["state"] != "done"]
    if args.json:
        print(json.dumps({"studies": studies, "done": len(studies) - len(open_), "not_done": len(open_)}, indent=2))
    else:
        for s in studies:
            line = (f"{s['source']} {s['study_uid']} {s['state']}: {s['archived_instances']}/"
                    f"{s['expected_instances']} instances")
            if s["missing"]:
                line += f", missing {' '.join(s['missing'])}"
            if s["dimse_status"]:
                line += f", status {s['dimse_status']}"
            if s["comment"]:
                line += f" ({s['comment']})"
            if s["not_listed_by_source"]:
                line += f", {len(s['not_listed_by_source'])} held by vna but not listed by the source"
            print(line)
        print(f"report: {len(studies)} studies, {len(studies) - len(open_)} done, {len(open_)} not done")
    return 1 if open_ else 0


def register(sub: Any) -> None:
    """Add ``migrate`` and its verbs to the ``vna`` parser."""
    p = sub.add_parser("migrate", help="migrate studies from legacy DIMSE archives")
    msub = p.add_subparsers(dest="what", required=True)
    q = msub.add_parser("plan", help="enumerate a source (C-FIND) into the migration plan")
    add_common(q)
    q.add_argument("--source", required=True, help="the source's ae_title")
    q.add_argument("--from", dest="date_from", type=_date, default=None, help="first StudyDate (YYYYMMDD)")
    q.add_argument("--to", dest="date_to", type=_date, default=None, help="last StudyDate (YYYYMMDD)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_plan)
    q = msub.add_parser("run", help="pull, verify and record planned studies (one bounded run)")
    add_common(q)
    add_job_flags(q)
    q.add_argument("--source", default=None, help="only this source's studies")
    q.set_defaults(func=cmd_run)
    q = msub.add_parser("status", help="progress per source")
    add_common(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_status)
    q = msub.add_parser("report", help="reconciliation per study (exit 1 if any study is not done)")
    add_common(q)
    q.add_argument("--source", default=None)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_report)
