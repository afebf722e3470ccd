"""``vna lifecycle plan|run|purge|hold|release`` verbs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vna.cli_support import add_common, add_job_flags, load, print_report
from vna.errors import InvalidInput, VnaError
from vna.jobs import format_bytes
from vna.progress import add_progress_flag, progress_for

__all__ = ["register"]


def _archive(args: argparse.Namespace, *, existing: bool = False) -> Any:
    """The archive of the parsed arguments; ``existing``: a read-only verb, no archive is created."""
    from vna.archive import Archive
    from vna.preflight import require_archive

    cfg = load(args)
    if existing:
        require_archive(cfg)
    return Archive(cfg)


#: instances compressed at most to estimate the cold size of a plan
ESTIMATE_SAMPLES = 16


def _spread(n: int, k: int) -> list[int]:
    """``min(n, k)`` indexes spread evenly over ``range(n)``, first and last included (the middle one for k = 1)."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _estimate_ratio(archive: Any, study_uids: list[str], samples: int = ESTIMATE_SAMPLES) -> float:
    """Compression ratio measured on at most ``samples`` instances spread over the whole plan (1.0 if none).

    The studies sampled are spread evenly over the plan, and so is the
    instance taken in each; when the plan has fewer studies than samples,
    each study gives several instances spread over it.
    """
    from vna import pixelcodec

    if not study_uids:
        return 1.0
    raw = packed = 0
    chosen = [study_uids[i] for i in _spread(len(study_uids), samples)]
    per_study = max(1, samples // len(chosen))
    for uid in chosen:
        instances = archive.index.study_instances(uid)
        for i in _spread(len(instances), per_study):
            with archive.retrieve.open_verified(instances[i].sop_uid) as v:
                data = v.path.read_bytes()
            raw += len(data)
            packed += len(pixelcodec.encode(data, archive.cfg.cold.zstd_level,
                                            version=pixelcodec.CODEC_VERSIONS[archive.cfg.cold.codec]))
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
    archive = _archive(args, existing=True)
    try:
        migrator = archive.migrator()
        held: list[Any] = []
        plans = migrator.plan(args.limit, held=held)
        ratio = _estimate_ratio(archive, [p.study_uid for p in plans]) if plans else 1.0
        total = sum(p.hot_bytes for p in plans)
        kept = migrator.hot_copies_kept
        why = _copies_note(archive, migrator.cold_store.store_id, kept)
        if args.json:
            print(json.dumps({"studies": [p.__dict__ for p in plans], "hot_bytes": total,
                              "estimated_cold_bytes": int(total / ratio), "estimated_ratio": round(ratio, 3),
                              "min_copies": archive.copies.min_copies, "hot_copies_kept": kept,
                              "copies_note": why,
                              "skipped": [{"study": h.study_uid, "instances": h.instances, "reason": "legal hold"}
                                          for h in held]}, indent=2))
        else:
            keeps = f"; keeps {kept} hot cop{'y' if kept == 1 else 'ies'} per instance" if kept else ""
            for p in plans:
                print(f"  study {p.study_uid}: {p.instances} instances, {format_bytes(p.hot_bytes)}{keeps}")
            for h in held:
                print(f"  skipped study {h.study_uid}: {h.instances} instances, due but under legal hold "
                      f"(vna lifecycle release to let it move)")
            print(f"plan: {len(plans)} studies, {sum(p.instances for p in plans)} instances, {format_bytes(total)} "
                  f"hot -> about {format_bytes(int(total / ratio))} cold (ratio {ratio:.2f}, sampled)"
                  + (f"; {len(held)} held {'study' if len(held) == 1 else 'studies'} skipped" if held else ""))
            print(f"copies: {why}")
    finally:
        archive.close()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """One bounded migration run, then purge leftovers of interrupted runs."""
    archive = _archive(args)
    try:
        job = archive.migrator()
        with progress_for(job.name, args) as progress:
            report = job.run_once(limit=args.limit, dry_run=args.dry_run, progress=progress)
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
        if not held and not archive.index.is_held(uid):
            print(f"study {uid}: not under legal hold, nothing changed")
            return 1
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
    add_progress_flag(q)
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
