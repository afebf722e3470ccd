"""``vna sites status|copy``: the federation from one site's point of view.

Exit codes: 0 clean; 1 findings or failures (a site or an index node that
cannot be reached, an instance that could not be copied); 2 usage or
configuration error (e.g. no ``[[federation.site]]`` configured).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from vna.cli_support import add_common, add_job_flags, load, print_report
from vna.domain import PlacementState, site_of
from vna.errors import ConfigError
from vna.preflight import require_archive
from vna.progress import add_progress_flag, progress_for

if TYPE_CHECKING:
    from vna.archive import Archive
    from vna.federation.copy import CopyJob

__all__ = ["register", "copy_job", "holdings", "status"]


def copy_job(archive: Archive) -> CopyJob:
    """The cross-site copy job of this archive (``[[federation.copy]]`` rules). Raises ConfigError."""
    from vna.federation.copy import CopyJob

    if archive.sites is None:
        raise ConfigError("no [[federation.site]] is configured: nothing to copy from")
    return CopyJob(archive.index, archive.hot, archive.sites, archive.cfg.federation,
                   archive.cfg.resolve("spool/federation"))


def holdings(archive: Archive) -> dict[str, dict[str, int]]:
    """Per site: instance versions with a verified copy there, their bytes, and how many are DR copies.

    One pass over the placement ledger (an operator's command, not a hot path).
    """
    from vna.federation.copy import DR_PREFIX

    seen: dict[str, dict[tuple[str, int], tuple[int, bool]]] = defaultdict(dict)
    for p in archive.index.iter_placements(states=[PlacementState.OK]):
        key = (p.sop_uid, p.version)
        site = site_of(p.store_id)
        _, dr = seen[site].get(key, (0, True))
        seen[site][key] = (p.content_size, dr and p.blob_key.startswith(DR_PREFIX + "/"))
    return {site: {"instances": len(v), "bytes": sum(size for size, _ in v.values()),
                   "dr_copies": sum(1 for _, dr in v.values() if dr)} for site, v in sorted(seen.items())}


def status(archive: Archive) -> dict[str, Any]:
    """Reachability of each site, index replication health and what each site holds."""
    sites: list[dict[str, Any]] = [{"id": archive.site_id, "self": True, "reachable": True,
                                    "retrieve_ae": archive.cfg.dicom.ae_title}]
    for sid, client in sorted((archive.sites.clients if archive.sites else {}).items()):
        sites.append({"id": sid, "self": False, "endpoint": client.config.grpc_endpoint,
                      "retrieve_ae": client.config.retrieve_ae, "reachable": client.healthy(fresh=True)})
    dcs = getattr(archive.index, "datacenters", None)
    index: dict[str, Any] = {"backend": archive.cfg.index.backend}
    if callable(dcs):
        index["datacenters"] = dcs()
        index["replication"] = archive.cfg.index.cassandra.replication_map
    return {"site": archive.site_id, "sites": sites, "index": index, "holdings": holdings(archive)}


def cmd_status(args: argparse.Namespace) -> int:
    """Print the federation status; exit 1 if a site or an index node is unreachable."""
    from vna.archive import Archive

    cfg = load(args)
    require_archive(cfg)
    archive = Archive(cfg)
    try:
        st = status(archive)
    finally:
        archive.close()
    down_sites = [s["id"] for s in st["sites"] if not s["reachable"]]
    down_nodes = [a for dc in st["index"].get("datacenters", {}).values() for a in dc["down"]]
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        for s in st["sites"]:
            where = "this site" if s["self"] else s["endpoint"]
            held = st["holdings"].get(s["id"], {"instances": 0, "bytes": 0, "dr_copies": 0})
            print(f"site {s['id']:<10} {'reachable' if s['reachable'] else 'UNREACHABLE':<12} {where:<24} "
                  f"{held['instances']} instances, {held['bytes']} bytes, {held['dr_copies']} DR copies")
        for dc, hosts in sorted(st["index"].get("datacenters", {}).items()):
            print(f"index {dc:<10} {len(hosts['up'])} nodes up, {len(hosts['down'])} down"
                  + (f" ({', '.join(hosts['down'])})" if hosts["down"] else ""))
    return 1 if down_sites or down_nodes else 0


def cmd_copy(args: argparse.Namespace) -> int:
    """One bounded cross-site copy run (the DR copies the rules ask for)."""
    if args.limit is not None and args.limit < 1:
        print("vna sites: --limit must be >= 1", file=sys.stderr)
        return 2
    from vna.archive import Archive

    cfg = load(args)
    require_archive(cfg)
    archive = Archive(cfg)
    try:
        job = copy_job(archive)
        with progress_for(job.name, args) as progress:
            report = job.run_once(limit=args.limit, dry_run=args.dry_run, progress=progress)
    finally:
        archive.close()
    return print_report(report, args.json)


def register(subparsers: Any) -> None:
    """Add ``sites`` and its sub-verbs to the ``vna`` parser."""
    p = subparsers.add_parser("sites", help="federated sites: status, cross-site DR copies")
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("status", help="reachability, index replication health, what each site holds")
    add_common(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_status)
    q = sub.add_parser("copy", help="pull the studies the [[federation.copy]] rules select from their sites")
    add_common(q)
    add_job_flags(q)
    add_progress_flag(q)
    q.set_defaults(func=cmd_copy)
