"""``vna grpc store|retrieve|query|metadata|health``: the gRPC API from the command line.

The server address defaults to ``127.0.0.1:<grpc.port>`` of the effective
config; the token to ``$VNA_GRPC_TOKEN``. TLS is used with ``--tls`` or
``--ca-cert`` (``--client-cert``/``--client-key`` for mutual TLS).
Exit codes: 0 done, 1 a call failed or data did not verify (or the server is
not SERVING), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vna.cli_support import add_common, load
from vna.errors import VnaError

if TYPE_CHECKING:
    from vna.api.client import VnaClient

__all__ = ["register"]


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _client(args: argparse.Namespace) -> "VnaClient":
    from vna.api.client import VnaClient

    target = args.target
    if not target:
        cfg = load(args)
        host = cfg.grpc.host if cfg.grpc.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        target = f"[{host}]:{cfg.grpc.port}" if ":" in host else f"{host}:{cfg.grpc.port}"
    token = args.token if args.token is not None else os.environ.get("VNA_GRPC_TOKEN")
    return VnaClient(target, token, tls=args.tls, root_certificates=_read(args.ca_cert),
                     certificate_chain=_read(args.client_cert), private_key=_read(args.client_key),
                     timeout=args.timeout)


def _fail(exc: VnaError) -> int:
    print(f"vna grpc: {exc}", file=sys.stderr)
    return 1


def cmd_store(args: argparse.Namespace) -> int:
    """Upload files (directories recursively), one line per file."""
    files: list[Path] = []
    for name in args.paths:
        p = Path(name)
        files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    failures = 0
    with _client(args) as client:
        for f in files:
            try:
                r = client.store(f)
                print(f"{'duplicate' if r.duplicate else 'stored'} {f} {r.sop_instance_uid} {r.content_sha256}")
            except (VnaError, OSError) as exc:
                failures += 1
                print(f"failed {f}: {exc}", file=sys.stderr)
    print(f"{len(files) - failures} stored, {failures} failed")
    return 1 if failures else 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    """Download an instance, series or study into a directory, verifying every file."""
    key = {"instance": "sop_uid", "series": "series_uid", "study": "study_uid"}[args.level]
    n = 0
    with _client(args) as client:
        try:
            for inst in client.retrieve_to(Path(args.output), **{key: args.uid}):
                n += 1
                print(f"{inst.path} {inst.size} {inst.content_sha256}")
        except VnaError as exc:
            return _fail(exc)
    print(f"{n} instances retrieved and verified")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    """C-FIND-style query: ``vna grpc query study PatientName='DOE^*' StudyDate=``."""
    keys: dict[str, str] = {}
    for item in args.keys:
        kw, sep, value = item.partition("=")
        if not sep or not kw:
            print(f"vna grpc query: expected KEYWORD=VALUE, not {item!r}", file=sys.stderr)
            return 2
        keys[kw] = value
    with _client(args) as client:
        try:
            rows = list(client.query(args.level, keys, page_size=args.page_size, limit=args.limit))
            unreachable = list(client.query_response(args.level, keys, page_size=1).unreachable_sites)
        except VnaError as exc:
            return _fail(exc)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print("  ".join(f"{k}={v}" for k, v in sorted(row.items())))
        print(f"{len(rows)} matches")
    if unreachable:  # federation: their data in these matches is UNAVAILABLE (when asked for)
        print(f"vna grpc query: sites not reachable now: {', '.join(unreachable)}", file=sys.stderr)
    return 0


def cmd_metadata(args: argparse.Namespace) -> int:
    """A study's series and instances with digests and availability, as JSON."""
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        try:
            meta = client.study_metadata(args.study_uid)
        except VnaError as exc:
            return _fail(exc)
    print(json.dumps(MessageToDict(meta, preserving_proto_field_name=True), indent=2))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Print the health status; exit 0 only when SERVING."""
    with _client(args) as client:
        try:
            status = client.health(args.service)
        except VnaError as exc:
            return _fail(exc)
    print(status)
    return 0 if status == "SERVING" else 1


def _connection_flags(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--target", help="host:port of the gRPC server (default 127.0.0.1:<grpc.port>)")
    p.add_argument("--token", help="bearer token (default $VNA_GRPC_TOKEN)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's CA roots")
    p.add_argument("--ca-cert", help="PEM CA bundle to verify the server (implies TLS)")
    p.add_argument("--client-cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--client-key", help="PEM private key of --client-cert")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per call (default 300)")


def register(subparsers: Any) -> None:
    """Add ``grpc`` and its verbs to the ``vna`` parser."""
    p = subparsers.add_parser("grpc", help="use a vna server's gRPC API")
    sub = p.add_subparsers(dest="what", required=True)

    q = sub.add_parser("store", help="upload DICOM Part 10 files or directories")
    _connection_flags(q)
    q.add_argument("paths", nargs="+")
    q.set_defaults(func=cmd_store)

    q = sub.add_parser("retrieve", help="download verified instances into a directory")
    _connection_flags(q)
    q.add_argument("uid", help="SOP Instance UID (or Series / Study Instance UID with --level)")
    q.add_argument("-o", "--output", required=True, help="directory for <SOPInstanceUID>.dcm files")
    q.add_argument("--level", choices=("instance", "series", "study"), default="instance")
    q.set_defaults(func=cmd_retrieve)

    q = sub.add_parser("query", help="query with C-FIND matching (KEYWORD=VALUE, empty value: return only)")
    _connection_flags(q)
    q.add_argument("level", type=str.upper, choices=("PATIENT", "STUDY", "SERIES", "INSTANCE"))
    q.add_argument("keys", nargs="*", metavar="KEYWORD=VALUE")
    q.add_argument("--page-size", type=int, default=100)
    q.add_argument("--limit", type=int, default=None, help="at most this many matches")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_query)

    q = sub.add_parser("metadata", help="a study's series and instances (JSON)")
    _connection_flags(q)
    q.add_argument("study_uid")
    q.set_defaults(func=cmd_metadata)

    q = sub.add_parser("health", help="the server's health status (exit 0 when SERVING)")
    _connection_flags(q)
    q.add_argument("--service", default="", help="a service name (default: the whole server)")
    q.set_defaults(func=cmd_health)
