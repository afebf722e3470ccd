"""``vna audit verify|search`` verbs.

``verify`` exits 0 when the hash chain is intact, 1 at the first broken
record (its sequence number is printed). ``search`` prints matching records.
Both read the trail of ``[audit] path``; each use is itself audited
("Audit Log Used", 110101), after the read.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

from vna.audit import AUDIT_LOG_USED, Actor, AuditLog, search, verify
from vna.cli_support import add_common, load
from vna.config import Config
from vna.errors import AuditUnavailable, ConfigError

__all__ = ["register"]


def _log_use(cfg: Config, what: str, details: dict[str, Any]) -> str | None:
    """Record the use of the trail; returns an error text if that failed."""
    audit = AuditLog(cfg.audit, cfg.resolve(cfg.audit.path), source={"ae": cfg.dicom.ae_title,
                                                                     "site": cfg.archive.site_id})
    try:
        audit.record(AUDIT_LOG_USED, "R", Actor.local_user(), details={"verb": what, **details})
        return None
    except AuditUnavailable as exc:
        return str(exc)
    finally:
        audit.close()


def cmd_verify(args: argparse.Namespace) -> int:
    """Check the hash chain of the audit trail."""
    cfg = load(args)
    path = cfg.resolve(cfg.audit.path)
    if not path.exists():
        print(f"vna: no audit trail at {path}", file=sys.stderr)
        return 1
    result = verify(path)
    if args.json:
        print(json.dumps({"path": str(path), **result.as_dict()}, indent=2))
    elif result.intact:
        note = f" ({result.reason})" if result.reason else ""
        print(f"audit trail intact: {result.records} records, head seq {result.head_seq} "
              f"hash {result.head_hash}{note}")
    else:
        print(f"audit trail TAMPERED: first bad seq {result.first_bad_seq} (line {result.line}): {result.reason}")
    err = _log_use(cfg, "verify", {"intact": result.intact, "records": result.records})
    if err:
        print(f"vna: warning: this verification could not be audited: {err}", file=sys.stderr)
    return 0 if result.intact else 1


def _utc(text: str | None, name: str) -> str | None:
    """A --since/--until value in the trail's timestamp format (UTC); a bare date stays a date."""
    if text is None:
        return None
    if len(text) == 10:
        try:
            datetime.strptime(text, "%Y-%m-%d")
            return text
        except ValueError:
            pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--{name} {text!r} is not an ISO 8601 date or time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def cmd_search(args: argparse.Namespace) -> int:
    """Print the records matching the filters."""
    cfg = load(args)
    path = cfg.resolve(cfg.audit.path)
    if not path.exists():
        print(f"vna: no audit trail at {path}", file=sys.stderr)
        return 1
    filters = {"patient": args.patient, "study": args.study, "actor": args.actor,
               "since": _utc(args.since, "since"), "until": _utc(args.until, "until"), "event": args.event}
    found = list(search(path, **filters))
    # the results show patient data: the access is recorded before they are shown
    err = _log_use(cfg, "search", {"filters": {k: v for k, v in filters.items() if v}, "matches": len(found)})
    if err and cfg.audit.on_failure == "refuse":
        print(f"vna: this search cannot be audited, results withheld: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found, indent=2, ensure_ascii=False))
        return 0
    for r in found:
        a = r.get("actor") or {}
        who = f"{a.get('id', '')}@{a.get('address', '')}" if a.get("address") else str(a.get("id", ""))
        print(f"{r.get('seq'):>8} {r.get('ts')} {r.get('event_id')} {r.get('event')} {r.get('action')} "
              f"outcome={r.get('outcome')} actor={who} patients={','.join(r.get('patient_ids', []))} "
              f"studies={','.join(r.get('study_uids', []))}")
    print(f"{len(found)} records")
    return 0


def register(sub: Any) -> None:
    """Add ``audit`` and its verbs to the ``vna`` parser."""
    p = sub.add_parser("audit", help="the audit trail: verify its hash chain, search it")
    asub = p.add_subparsers(dest="what", required=True)
    q = asub.add_parser("verify", help="check the hash chain (exit 1 at the first bad record)")
    add_common(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_verify)
    q = asub.add_parser("search", help="records by patient, study, actor, time, event")
    add_common(q)
    q.add_argument("--patient", help="a Patient ID")
    q.add_argument("--study", help="a Study Instance UID")
    q.add_argument("--actor", help="an AE title, token name, user or address")
    q.add_argument("--since", help="ISO 8601 date or time (UTC unless it has an offset)")
    q.add_argument("--until", help="ISO 8601 date or time, inclusive")
    q.add_argument("--event", help="event id (110104) or a word of its name (query)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_search)
