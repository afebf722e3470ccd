"""``vna integrity scrub|repair|orphans|report``.

Exit codes: 0 clean, 1 findings or failures (damage found, a copy that could
not be rebuilt, LastVerifiedCopyLost, orphans), 2 usage or configuration error
(including a destructive orphan action without ``--yes``: the plan is printed,
nothing is changed).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, Sequence

from vna.cli_support import add_common, add_job_flags, load, print_report
from vna.config import Config
from vna.domain import Tier

if TYPE_CHECKING:
    from vna.archive import Archive

__all__ = ["register", "main"]

_LEVELS = ("exists", "size", "stored", "content")


def _archive(cfg: Config) -> "Archive":
    from vna.archive import Archive

    return Archive(cfg)


def _bad_limit(args: argparse.Namespace) -> bool:
    if args.limit is not None and args.limit < 1:
        print("vna integrity: --limit must be >= 1", file=sys.stderr)
        return True
    return False


def cmd_scrub(args: argparse.Namespace) -> int:
    """Verify placements oldest-verified first; record OK / MISSING / CORRUPT; quarantine corrupt blobs."""
    if _bad_limit(args):
        return 2
    from vna.integrity.scrubber import Scrubber

    cfg = load(args)
    ic = cfg.integrity
    archive = _archive(cfg)
    try:
        job = Scrubber(
            archive.index, archive.tiers,
            level=args.level or ic.verify_level,
            objects_per_second=ic.objects_per_second if args.objects_per_second is None else args.objects_per_second,
            bytes_per_second=ic.bytes_per_second if args.bytes_per_second is None else args.bytes_per_second,
            tier=Tier(args.tier) if args.tier else None, store_id=args.store)
        report = job.run_once(limit=args.limit, dry_run=args.dry_run)
    finally:
        archive.close()
    return print_report(report, args.json)


def cmd_repair(args: argparse.Namespace) -> int:
    """Rebuild MISSING/CORRUPT copies from verified siblings; bring instances back to N hot copies."""
    if _bad_limit(args):
        return 2
    from vna.integrity.repair import Repairer

    cfg = load(args)
    archive = _archive(cfg)
    try:
        job = Repairer(archive.index, archive.tiers, cfg.resolve("spool/integrity"),
                       stale_pending_seconds=cfg.integrity.stale_pending_seconds,
                       rereplicate=not args.no_rereplicate, sites=archive.sites)
        report = job.run_once(limit=args.limit, dry_run=args.dry_run)
    finally:
        archive.close()
    return print_report(report, args.json)


def cmd_orphans(args: argparse.Namespace) -> int:
    """Report blobs without placements and OK placements without blobs; quarantine/delete orphans with --yes."""
    if _bad_limit(args):
        return 2
    from vna.integrity.orphans import OrphanFinder

    cfg = load(args)
    action = "quarantine" if args.quarantine else "delete" if args.delete else "report"
    confirmed = action == "report" or args.yes
    archive = _archive(cfg)
    try:
        job = OrphanFinder(archive.index, archive.tiers, action=action,
                           grace_seconds=cfg.integrity.orphan_grace_seconds if args.grace is None else args.grace)
        report = job.run_once(limit=args.limit, dry_run=args.dry_run or not confirmed)
    finally:
        archive.close()
    code = print_report(report, args.json)
    if not confirmed:
        print(f"vna integrity orphans: refusing to {action} without --yes (the plan above changed nothing)",
              file=sys.stderr)
        return 2
    return code


def _fmt_counts(c: dict[str, Any]) -> str:
    states = ", ".join(f"{k}={v}" for k, v in sorted(c["by_state"].items()))
    ages = ", ".join(f"{k} {v}" for k, v in c["verified"].items() if v)
    return (f"placements {c['placements']} [{states}], OK bytes {c['stored_bytes_ok']}; "
            f"verified: {ages or '-'}; oldest {c['oldest_verified'] or '-'}, newest {c['newest_verified'] or '-'}")


def _print_fixity(f: dict[str, Any]) -> None:
    if "study_uid" in f:
        print(f"study {f['study_uid']}: {f['outcome']}, {f['instances']} instances "
              f"({', '.join(f'{k} {v}' for k, v in f['by_outcome'].items() if v)}), "
              f"all copies verified since {f['last_verified'] or 'never'}")
        items = f["instance_fixity"]
    else:
        items = [f]
    for i in items:
        print(f"  instance {i['sop_uid']} v{i['version']}: {i['outcome']}, verified since {i['last_verified'] or 'never'}")
        for c in i["copies"]:
            print(f"    {c['tier']}/{c['store']}: {c['state']} (checked {c['verified'] or 'never'})")


def cmd_report(args: argparse.Namespace) -> int:
    """Per tier how much was verified when, and what is damaged or at risk; or one study's/instance's fixity."""
    from vna.errors import NotFound
    from vna.integrity.report import instance_fixity, integrity_report, study_fixity

    cfg = load(args)
    archive = _archive(cfg)
    try:
        if args.study or args.instance:
            try:
                fixity = study_fixity(archive.index, args.study) if args.study else \
                    instance_fixity(archive.index, args.instance)
            except NotFound as exc:
                print(f"vna: {exc}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(fixity, indent=2))
            else:
                _print_fixity(fixity)
            return 0 if fixity["outcome"] == "OK" else 1
        rep = integrity_report(archive.index, archive.tiers, max_items=args.limit, copies=archive.copies)
    finally:
        archive.close()
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"integrity report at {rep['generated']}: {rep['instance_versions']} instance versions")
        for tier, c in sorted(rep["tiers"].items()):
            print(f"tier {tier}: {_fmt_counts(c)}")
        for store, c in sorted(rep["stores"].items()):
            print(f"  store {store} ({c['tier']}): {_fmt_counts(c)}")
        for name in ("damaged", "lost", "under_replicated"):
            print(f"{name.replace('_', '-')}: {rep[name]['count']}")
            for item in rep[name]["items"]:
                print("  " + " ".join(f"{k}={v}" for k, v in item.items()))
        print(f"single-copy instance versions: {rep['single_copy']['count']}")
        below = rep["below_min_copies"]
        print(f"below archive.min_copies ({below['min_copies']}): {below['count']}")
        for item in below["items"]:
            print("  " + " ".join(f"{k}={v}" for k, v in item.items()))
        if below["count"]:
            print(f"WARNING: {below['count']} instance version(s) have fewer than archive.min_copies = "
                  f"{below['min_copies']} verified copies")
    return 1 if rep["findings"] else 0


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if rate < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0: unlimited)")
    return rate


def _limit(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def register(subparsers: Any) -> None:
    """Add ``integrity`` and its sub-verbs to the ``vna`` parser."""
    p = subparsers.add_parser("integrity", help="scrub, repair, orphans, fixity report")
    sub = p.add_subparsers(dest="what", required=True)

    q = sub.add_parser("scrub", help="verify stored copies and record what is wrong (never fixes)")
    add_common(q)
    add_job_flags(q)
    q.add_argument("--level", choices=_LEVELS, help="verify level (default: integrity.verify_level)")
    q.add_argument("--objects-per-second", type=_rate, help="rate limit (0: unlimited)")
    q.add_argument("--bytes-per-second", type=_rate, help="read-rate limit (0: unlimited)")
    q.add_argument("--tier", choices=[t.value for t in Tier], help="only this tier")
    q.add_argument("--store", help="only this store id (e.g. hot-2)")
    q.set_defaults(func=cmd_scrub)

    q = sub.add_parser("repair", help="rebuild MISSING/CORRUPT copies from verified siblings; re-replicate")
    add_common(q)
    add_job_flags(q)
    q.add_argument("--no-rereplicate", action="store_true", help="only rebuild damaged copies")
    q.set_defaults(func=cmd_repair)

    q = sub.add_parser("orphans", help="blobs without placements, placements without blobs")
    add_common(q)
    add_job_flags(q, destructive=True)
    act = q.add_mutually_exclusive_group()
    act.add_argument("--quarantine", action="store_true", help="move orphan blobs to quarantine (needs --yes)")
    act.add_argument("--delete", action="store_true", help="delete orphan blobs (needs --yes)")
    q.add_argument("--grace", type=_rate, help="seconds; younger blobs are never orphans "
                                               "(default: integrity.orphan_grace_seconds)")
    q.set_defaults(func=cmd_orphans)

    q = sub.add_parser("report", help="verification age per tier, damage and risk; per-study fixity")
    add_common(q)
    q.add_argument("--json", action="store_true")
    who = q.add_mutually_exclusive_group()
    who.add_argument("--study", help="fixity of one study (StudyInstanceUID)")
    who.add_argument("--instance", help="fixity of one instance (SOPInstanceUID)")
    q.add_argument("--limit", type=_limit, default=100, help="list at most this many items per section")
    q.set_defaults(func=cmd_report)


def main(argv: Sequence[str] | None = None) -> int:
    """``vna integrity ...`` as a function: ``main(["scrub", "--json"])``."""
    from vna.cli import main as vna_main

    return vna_main(["integrity", *(sys.argv[1:] if argv is None else argv)])
