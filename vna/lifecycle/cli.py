"""``vna lifecycle plan|run|purge|hold|release`` verbs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vna.cli_support import add_common, add_job_flags, load, print_report
from vna.errors import InvalidInput, VnaError

__all__ = ["register"]


def _archive(args: argparse.Namespace) -> Any:
    from vna.archive import Archive

    return Archive(load(args))


def _estimate_ratio(archive: Any, study_uids: list[str], samples: int = 3) -> float:
    """Compression ratio measured on a few real instances of the plan (1.0 if none)."""
    from vna import pixelcodec

    raw = packed = 0
    for uid in study_uids:
        for inst in archive.index.study_instances(uid)[:1]:
            with archive.retrieve.open_verified(inst.sop_uid) as v:
                data = v.path.read_bytes()
            raw += len(data)
            packed += len(pixelcodec.encode(data, archive.cfg.cold.zstd_level))
        if len(study_uids) and raw and samples <= 1:
            break
        samples -= 1
    return raw / packed if packed else 1.0


def _copies_note(archive: Any, cold_store: str, kept: int) -> str:
    """Why a migration keeps ``kept`` hot copies per instance (``archive.min_copies`` and the cold store's count)."""
    cold = archive.copies.weight(cold_store)
    minimum = archive.copies.min_copies
    counts = f"cold tier counts {cold} cop{'y' if cold == 1 else 'ies'}, archive.min_copies = {minimum}"
    if not kept:
        return f"removes every hot copy: {counts}"
    hot = len(archive.hot.stores)
    note = f"keeps {kept} hot cop{'y' if kept == 1 else 'ies'} per instance: {counts}"
    if kept == hot and cold + sum(archive.copies.weight(s.store_id) for s in archive.hot.stores) < minimum:
        note += " (even so below the minimum)"
    return note


def cmd_plan(args: argparse.Namespace) -> int:
    """Print what a run would move, with a cold-size estimate."""
    archive = _archive(args)
    try:
        migrator = archive.migrator()
        plans = migrator.plan(args.limit)
        ratio = _estimate_ratio(archive, [p.study_uid for p in plans]) if plans else 1.0
        total = sum(p.hot_bytes for p in plans)
        kept = migrator.hot_copies_kept
        why = _copies_note(archive, migrator.cold_store.store_id, kept)
        if args.json:
            print(json.dumps({"studies": [p.__dict__ for p in plans], "hot_bytes": total,
                              "estimated_cold_bytes": int(total / ratio), "estimated_ratio": round(ratio, 3),
                              "min_copies": archive.copies.min_copies, "hot_copies_kept": kept,
                              "copies_note": why}, indent=2))
        else:
            keeps = f"; keeps {kept} hot cop{'y' if kept == 1 else 'ies'} per instance" if kept else ""
            for p in plans:
                print(f"  study {p.study_uid}: {p.instances} instances, {p.hot_bytes} bytes{keeps}")
            print(f"plan: {len(plans)} studies, {sum(p.instances for p in plans)} instances, {total} bytes hot "
                  f"-> about {int(total / ratio)} bytes cold (ratio {ratio:.2f}, sampled)")
            print(f"copies: {why}")
    finally:
        archive.close()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """One bounded migration run, then purge leftovers of interrupted runs."""
    archive = _archive(args)
    try:
        report = archive.migrator().run_once(limit=args.limit, dry_run=args.dry_run)
    finally:
        archive.close()
    return print_report(report, args.json)


def cmd_purge(args: argparse.Namespace) -> int:
    """Delete copies marked TO_DELETE after re-verifying another copy (needs --yes)."""
    if not args.dry_run and not args.yes:
        print("vna lifecycle purge deletes data: run with --dry-run to see the plan, --yes to do it")
        return 2
    archive = _archive(args)
    try:
        report = archive.migrator().purger.run_once(limit=args.limit, dry_run=args.dry_run)
    finally:
        archive.close()
    return print_report(report, args.json)


def cmd_hold(args: argparse.Namespace) -> int:
    """Place or lift a legal hold on a study."""
    from vna.domain import validate_uid

    from vna.audit import Actor

    archive = _archive(args)
    try:
        uid = validate_uid(args.study_uid, "StudyInstanceUID")
        held = args.what == "hold"
        archive.set_hold(uid, held, args.reason, Actor.local_user())
        print(f"study {uid}: legal hold {'placed' if held else 'lifted'}")
    except InvalidInput as exc:
        print(f"vna: {exc}")
        return 2
    except VnaError as exc:
        print(f"vna: {exc}")
        return 1
    finally:
        archive.close()
    return 0


def register(sub: Any) -> None:
    """Add ``lifecycle`` and its verbs to the ``vna`` parser."""
    p = sub.add_parser("lifecycle", help="migrate aged studies to the cold tier")
    lsub = p.add_subparsers(dest="what", required=True)
    q = lsub.add_parser("plan", help="what would move (dry run, with a size estimate)")
    add_common(q)
    q.add_argument("--limit", type=int, default=None)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_plan)
    q = lsub.add_parser("run", help="migrate due studies (one bounded run)")
    add_common(q)
    add_job_flags(q)
    q.set_defaults(func=cmd_run)
    q = lsub.add_parser("purge", help="delete copies marked TO_DELETE")
    add_common(q)
    add_job_flags(q, destructive=True)
    q.set_defaults(func=cmd_purge)
    for verb, text in (("hold", "place a legal hold on a study"), ("release", "lift a legal hold")):
        q = lsub.add_parser(verb, help=text)
        add_common(q)
        q.add_argument("study_uid")
        q.add_argument("--reason", default="")
        q.set_defaults(func=cmd_hold, what=verb)
