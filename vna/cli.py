"""The ``vna`` command. Each verb is a testable ``main(argv) -> int``.

Exit codes: 0 clean, 1 findings or failures, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Sequence

from vna import __version__, preflight
from vna.cli_support import add_common, explain, load, setting_origins
from vna.config import Config
from vna.errors import ConfigError, VnaError
from vna.preflight import listen_error
from vna.progress import add_progress_flag

if TYPE_CHECKING:
    from vna.index.base import IndexStats

__all__ = ["main"]

log = logging.getLogger("vna")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at INFO; keep it to warnings
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _prepare_spool(cfg: Config) -> None:
    for name in ("spool/incoming", "spool/grpc", "spool/web"):
        spool = cfg.resolve(name)
        spool.mkdir(parents=True, exist_ok=True)
        for stale in spool.iterdir():  # never acknowledged: a previous process died mid-receive
            stale.unlink(missing_ok=True)


def _serve_process(cfg: Config, stop: Any, ready: Any, reuse_port: bool, log_level: str | None = None,
                   run_jobs: bool = True, dicom: bool = True) -> None:
    """One server process: serve until ``stop`` is set (``ready`` is set once listening).

    It runs the DIMSE server (unless ``dicom`` is false) and, when
    ``grpc.enabled``, the gRPC server; with ``reuse_port`` both share their
    ports with sibling worker processes (SO_REUSEPORT: every worker serves
    both protocols). With ``run_jobs`` it also runs the enabled background
    jobs (lifecycle...).
    """
    from vna.archive import Archive
    from vna.dicom.server import DicomServer
    from vna.jobs import Daemon

    terminated: list[int] = []
    if log_level is not None:  # a spawned worker
        _setup_logging(log_level)
        # Only note the signal: setting the multiprocessing Event from a handler that
        # interrupted stop.wait() on it deadlocks on the Event's own lock.
        signal.signal(signal.SIGTERM, lambda signum, _: terminated.append(signum))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    # pynetdicom spools incoming datasets with tempfile: keep them on the data disk
    tempfile.tempdir = str(cfg.resolve("spool/incoming"))
    archive = Archive(cfg)
    server: Any = None
    if dicom and cfg.dicom.receiver == "native":
        from vna.dicom.native_server import NativeDicomServer

        server = NativeDicomServer(archive, cfg.dicom, reuse_port=reuse_port)
        if cfg.dicom.tls_port:  # the TLS port stays on pynetdicom, next to the native plain port
            server = DicomListeners(server, DicomServer(archive, cfg.dicom, reuse_port=reuse_port, tls_only=True))
    elif dicom:
        server = DicomServer(archive, cfg.dicom, reuse_port=reuse_port)
    grpc_server = None
    if cfg.grpc.enabled:
        from vna.api.server import GrpcServer

        grpc_server = GrpcServer(archive, cfg, reuse_port=reuse_port)
    web_server = None
    if cfg.web.port:
        from vna.web import WebServer

        web_server = WebServer(archive, cfg, reuse_port=reuse_port)
    daemons: list[Daemon] = []
    if run_jobs:
        from vna.integrity import daemons as integrity_daemons

        if cfg.lifecycle.enabled:
            daemons.append(Daemon(archive.migrator(), cfg.lifecycle.interval_seconds, cfg.lifecycle.batch_limit))
        daemons.extend(integrity_daemons(archive))
        from vna.index.janitor import IndexJanitor

        daemons.append(Daemon(IndexJanitor(archive.index), 300.0, 1000, telemetry=archive.telemetry))
        if cfg.migrate.enabled and cfg.migrate.source:
            from vna.migrate import open_ledger
            from vna.migrate.runner import MigrationJob

            daemons.append(Daemon(MigrationJob(archive, cfg, open_ledger(cfg)), cfg.migrate.interval_seconds,
                                  cfg.migrate.batch_limit, telemetry=archive.telemetry))
        if cfg.federation.copy_enabled and cfg.federation.copy:
            from vna.federation.cli import copy_job

            daemons.append(Daemon(copy_job(archive), cfg.federation.copy_interval_seconds,
                                  cfg.federation.copy_batch_limit, telemetry=archive.telemetry))
    health = _health_server(cfg, archive, server, grpc_server, stop, reuse_port)
    try:
        if server is not None:
            try:
                server.start()
            except OSError as exc:  # the port was taken after the preflight probe
                raise listen_error("dicom.port", "the DICOM listener", cfg.dicom.host, cfg.dicom.port, exc) from exc
        if grpc_server is not None:
            grpc_server.start()
        if web_server is not None:
            web_server.start()
        if health is not None:
            health.start()
        for d in daemons:
            d.start()
        ready.set()
        while not stop.wait(0.5) and not terminated:
            pass
    finally:
        if health is not None:
            health.drain()
        for d in daemons:
            d.stop()
        if web_server is not None:
            web_server.stop()
        if grpc_server is not None:
            grpc_server.stop()
        if server is not None:
            server.stop()
        if health is not None:
            health.stop()
        archive.close()


class DicomListeners:
    """Several DICOM servers of one process served as one: ``start``, ``stop``, ``listening``.

    ``start`` starts them in order (stopping those already started when one
    fails, and re-raising); ``stop`` stops them all at once, each with the same
    grace; ``listening`` is true while every one listens.
    """

    def __init__(self, *servers: Any) -> None:
        self.servers = servers

    def start(self) -> None:
        started: list[Any] = []
        try:
            for server in self.servers:
                server.start()
                started.append(server)
        except BaseException:
            for server in reversed(started):
                server.stop(0)
            raise

    def stop(self, grace: float = 30.0) -> None:
        threads = [threading.Thread(target=server.stop, args=(grace,), name="vna-dicom-stop")
                   for server in self.servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    @property
    def listening(self) -> bool:
        return all(server.listening for server in self.servers)


def _health_server(cfg: Config, archive: Any, dicom: Any, grpc_server: Any, stop: Any,
                   reuse_port: bool) -> Any:
    """The ``[health]`` readiness endpoint of one server process (None when ``health.port`` is 0)."""
    if not cfg.health.port:
        return None
    from vna.errors import AuditUnavailable
    from vna.health import Check, HealthServer

    def index() -> str | None:
        archive.index.get_instance("0")  # raises IndexUnavailable when the index does not answer
        return None

    def audit() -> str | None:
        try:
            archive.audit.require()
        except AuditUnavailable as exc:
            return str(exc)
        return None

    checks: list[Check] = [("stopping", lambda: "stop requested" if stop.is_set() else None)]
    if dicom is not None:
        checks.append(("dicom", lambda: None if dicom.listening else "DICOM listener not open"))
    if grpc_server is not None:
        checks.append(("grpc", lambda: None if grpc_server.serving else "gRPC server not serving"))
    checks += [("index", index), ("audit", audit)]
    return HealthServer(cfg.health.host, cfg.health.port, checks, reuse_port=reuse_port)


def _worker_main(cfg: Config, stop: Any, ready: Any, log_level: str, run_jobs: bool, dicom: bool = True) -> None:
    """A spawned worker process: a configuration error is one log line and exit status 2, not a traceback."""
    try:
        _serve_process(cfg, stop, ready, True, log_level, run_jobs, dicom)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        sys.exit(2)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the DIMSE and gRPC servers (``dicom.workers`` processes on their ports) until SIGTERM/SIGINT."""
    cfg = load(args)
    dicom = not args.no_dicom
    if not dicom and not cfg.grpc.enabled:
        raise ConfigError("--no-dicom leaves nothing to serve: enable [grpc]")
    if dicom and cfg.dicom.receiver == "native":
        from vna.dicom import native

        native.load()  # not built: ConfigError (exit 2) saying how to build it, never a fallback
    preflight.check_serve(cfg, dicom=dicom)
    created = preflight.missing_roots(cfg)
    started = threading.Event()
    try:
        code = _serve(cfg, args, dicom, started)
    except BaseException:
        if not started.is_set():  # a failed start leaves no half-made directories behind
            preflight.remove_created(created, cfg)
        raise
    if not started.is_set():
        preflight.remove_created(created, cfg)
    return code


def _serve(cfg: Config, args: argparse.Namespace, dicom: bool, started: threading.Event) -> int:
    """``cmd_serve`` once the preflight checks passed; ``started`` is set once every listener is up.

    Raises (ConfigError...) if the start fails.
    """
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    _prepare_spool(cfg)
    if cfg.index.migrate_on_start:
        from vna.index import open_index

        open_index(cfg).close()  # migrate once, before any worker starts
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fronts = []
    if dicom:
        fronts.append(f"DICOM AE {cfg.dicom.ae_title} listening on {cfg.dicom.host}:{cfg.dicom.port}")
    if cfg.grpc.enabled:
        fronts.append(f"gRPC on {cfg.grpc.host}:{cfg.grpc.port} (TLS {'on' if cfg.grpc.tls_cert else 'off'})")
    if cfg.web.port:
        scheme = "https" if cfg.web.tls_cert else "http"
        fronts.append(f"DICOMweb on {scheme}://{cfg.web.host}:{cfg.web.port}/dicomweb")
    summary = (f"{', '.join(fronts)} "
               f"(index {cfg.index.backend}, {cfg.hot.count} hot replicas, W={cfg.hot.quorum}, "
               f"data {cfg.data_dir}")
    if cfg.dicom.workers == 1:
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                _serve_process(cfg, stop, ready, False, None, True, dicom)
            except BaseException as exc:  # re-raised in the main thread: one message, the right exit code
                failed.append(exc)

        thread = threading.Thread(target=run, name="vna-serve")
        thread.start()
        while not ready.wait(0.1):
            if not thread.is_alive():
                break
        if ready.is_set():
            started.set()
            log.info("vna ready: %s)", summary)
            if cfg.web.port:
                log.info("open the viewer: %s://%s:%d/viewer/", "https" if cfg.web.tls_cert else "http",
                         cfg.web.host, cfg.web.port)
        while thread.is_alive():
            thread.join(0.5)
        if failed:
            raise failed[0]
        log.info("vna stopped")
        return 0 if ready.is_set() else 1
    return _serve_workers(cfg, stop, summary, args.log_level, dicom, started)


def _serve_workers(cfg: Config, stop: threading.Event, summary: str, log_level: str, dicom: bool = True,
                   started: threading.Event | None = None) -> int:
    """Supervise ``dicom.workers`` processes sharing the DICOM port; restart any that dies."""
    ctx = multiprocessing.get_context("spawn")

    def spawn(i: int) -> tuple[Any, Any, Any]:
        wstop, wready = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_worker_main, args=(cfg, wstop, wready, log_level, i == 0, dicom),
                           name=f"vna-worker-{i}")
        proc.start()
        log.info("worker %d started (pid %s)", i, proc.pid)
        return proc, wstop, wready

    workers = [spawn(i) for i in range(cfg.dicom.workers)]
    deadline = time.monotonic() + 120
    while not all(w[2].is_set() for w in workers):
        if stop.is_set() or time.monotonic() > deadline or any(not w[0].is_alive() for w in workers):
            log.error("workers failed to start")
            stop.set()
            break
        time.sleep(0.05)
    else:
        if started is not None:
            started.set()
        log.info("vna ready: %s, %d worker processes)", summary, len(workers))
    while not stop.wait(1.0):
        for i, (proc, _, _) in enumerate(workers):
            if not proc.is_alive():
                log.error("worker %d exited with %s; restarting it", i, proc.exitcode)
                workers[i] = spawn(i)
    log.info("vna stopping")
    for _, wstop, _ in workers:
        wstop.set()
    for proc, _, _ in workers:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    log.info("vna stopped")
    if started is None or started.is_set():
        return 0
    return 2 if any(proc.exitcode == 2 for proc, _, _ in workers) else 1  # 2: a worker logged a config error


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the effective config as JSON."""
    cfg = load(args)
    print(json.dumps(cfg.as_dict(), indent=2))
    return 0


def cmd_index_stats(args: argparse.Namespace) -> int:
    """Print index counts and bytes per tier."""
    from vna.index import open_index

    cfg = load(args)
    preflight.require_archive(cfg)
    index = open_index(cfg)
    try:
        if args.recount:
            return _print_recount(*index.recount(), as_json=args.json)
        s = index.stats()
        abandoned = len(index.abandoned_registrations())  # begun, never committed (Cassandra; see janitor)
    finally:
        index.close()
    if args.json:
        print(json.dumps({
            "patients": s.patients, "studies": s.studies, "series": s.series, "instances": s.instances,
            "content_bytes": s.content_bytes, "abandoned_registrations": abandoned,
            "tiers": {k: {"placements": v.placements, "stored_bytes": v.stored_bytes, "by_state": v.by_state}
                      for k, v in s.tiers.items()},
        }, indent=2))
        return 0
    print(f"patients   {s.patients}")
    print(f"studies    {s.studies}")
    print(f"series     {s.series}")
    print(f"instances  {s.instances}")
    print(f"bytes      {s.content_bytes}")
    print(f"abandoned  {abandoned}  (registrations never committed; `vna index janitor` cleans them)")
    for tier, t in sorted(s.tiers.items()):
        states = ", ".join(f"{k}={v}" for k, v in sorted(t.by_state.items()))
        print(f"tier {tier:<5} placements {t.placements}  stored bytes (OK) {t.stored_bytes}  [{states}]")
    return 0


def _flat_stats(s: IndexStats) -> dict[str, int]:
    out = {"patients": s.patients, "studies": s.studies, "series": s.series, "instances": s.instances,
           "content_bytes": s.content_bytes}
    for tier, t in sorted(s.tiers.items()):
        out[f"{tier}.placements"] = t.placements
        out[f"{tier}.stored_bytes"] = t.stored_bytes
        out |= {f"{tier}.{state}": n for state, n in sorted(t.by_state.items())}
    return out


def _print_recount(maintained: IndexStats, recounted: IndexStats, *, as_json: bool) -> int:
    """Both figures and their difference (recounted - maintained); 0 (the totals are repaired either way)."""
    a, b = _flat_stats(maintained), _flat_stats(recounted)
    keys = list(dict.fromkeys([*b, *a]))
    diff = {k: b.get(k, 0) - a.get(k, 0) for k in keys if b.get(k, 0) != a.get(k, 0)}
    if as_json:
        print(json.dumps({"maintained": a, "recounted": b, "difference": diff, "repaired": True}, indent=2))
        return 0
    print(f"{'':<22} {'maintained':>14} {'recounted':>14} {'difference':>12}")
    for k in keys:
        print(f"{k:<22} {a.get(k, 0):>14} {b.get(k, 0):>14} {b.get(k, 0) - a.get(k, 0):>+12}")
    print("maintained counters repaired to the recount" if diff else "maintained counters agree with the recount")
    return 0


def cmd_index_migrate(args: argparse.Namespace) -> int:
    """Create or upgrade the index schema."""
    from vna.index import open_index

    cfg = load(args)
    index = open_index(cfg)
    try:
        version = index.migrate()
    finally:
        index.close()
    print(f"index schema at version {version} ({cfg.index.backend})")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    """Ingest Part 10 files directly (bulk import): see :mod:`vna.bulk_import`."""
    from vna.bulk_import import store_main

    return store_main(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every verb."""
    parser = argparse.ArgumentParser(prog="vna", description="vendor-neutral archive")
    parser.add_argument("--version", action="version", version=f"vna {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("serve", help="run the archive (DICOM DIMSE and, when [grpc] enabled, gRPC)")
    add_common(p)
    p.add_argument("--dicom-port", type=int)
    p.add_argument("--ae-title")
    p.add_argument("--host")
    p.add_argument("--workers", type=int, help="worker processes sharing the DICOM (and gRPC) port")
    p.add_argument("--no-dicom", action="store_true", help="serve gRPC only (needs grpc.enabled)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("config", help="configuration")
    csub = p.add_subparsers(dest="what", required=True)
    q = csub.add_parser("show", help="print the effective configuration")
    add_common(q)
    q.add_argument("--dicom-port", type=int)
    q.add_argument("--ae-title")
    q.set_defaults(func=cmd_config_show)

    p = sub.add_parser("index", help="index administration")
    isub = p.add_subparsers(dest="what", required=True)
    q = isub.add_parser("stats", help="counts and bytes per tier")
    add_common(q)
    q.add_argument("--json", action="store_true")
    q.add_argument("--recount", action="store_true",
                   help="full recount (reads the whole catalogue): print the maintained and recounted figures "
                        "and their difference, and repair the maintained ones")
    q.set_defaults(func=cmd_index_stats)
    q = isub.add_parser("migrate", help="create or upgrade the schema")
    add_common(q)
    q.set_defaults(func=cmd_index_migrate)
    q = isub.add_parser("janitor", help="list and clean abandoned registrations (a front-end died mid-store)")
    add_common(q)
    q.add_argument("--limit", type=int, default=None)
    q.add_argument("--dry-run", action="store_true")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=lambda a: importlib.import_module("vna.index.cli").cmd_index_janitor(a))

    p = sub.add_parser("store", help="import DICOM files, directories or DICOMDIRs (parallel, resumable)")
    add_common(p)
    add_progress_flag(p)
    importlib.import_module("vna.bulk_import").add_store_flags(p)
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_store)

    # verbs of the job modules register themselves
    for module in _VERB_MODULES:
        importlib.import_module(module).register(sub)
    return parser


#: Modules exposing ``register(subparsers)`` for their verbs.
_VERB_MODULES: tuple[str, ...] = ("vna.integrity.cli", "vna.lifecycle.cli", "vna.api.cli",
                                   "vna.audit_cli", "vna.federation.cli", "vna.migrate.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vna`` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    _setup_logging(args.log_level)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe can still be handled
        return code
    except BrokenPipeError:  # `vna ... | head`: the reader has gone; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except ConfigError as exc:
        print(f"vna: configuration error: {explain(str(exc), setting_origins(args))}", file=sys.stderr)
        return 2
    except VnaError as exc:
        print(f"vna: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
