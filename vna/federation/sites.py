"""Other sites of the federation, reached through their gRPC front-ends.

:class:`SiteClient` wraps :class:`~vna.api.client.VnaClient` for one site:
``healthy()`` (grpc.health.v1, short timeout, cached a few seconds),
``find`` (gRPC Query) and ``fetch`` (a ``local_only`` Retrieve of one instance,
verified end to end against the digest and size the shared index records).
:class:`Sites` is the registry built from ``[federation]``.

Errors: an unreachable site raises :class:`~vna.errors.SiteUnavailable`;
bytes that do not match the index raise :class:`~vna.errors.IntegrityError`
(the received file is removed); an instance the site does not hold raises
:class:`~vna.errors.NotFound`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

import grpc

from vna.api.client import ApiError, VnaClient
from vna.config import FederationConfig, SiteConfig
from vna.errors import ConfigError, IntegrityError, NotFound, SiteUnavailable, VnaError

__all__ = ["SiteClient", "Sites"]

log = logging.getLogger(__name__)

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
# reconnect quickly once a site comes back (gRPC's default backoff grows to two minutes)
_CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
                    ("grpc.max_reconnect_backoff_ms", 3000))


def _mapped(site: str, exc: ApiError) -> VnaError:
    """A gRPC failure of ``site`` in vna's error tree."""
    if exc.code in _UNREACHABLE:
        return SiteUnavailable(f"site {site} cannot be reached: {exc.details}")
    if exc.code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"site {site}: {exc.details}")
    if exc.code == grpc.StatusCode.DATA_LOSS:
        return IntegrityError(f"site {site}: {exc.details}")
    if exc.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return ConfigError(f"site {site} refused our token ({exc.code.name}): check [[federation.site]].token")
    return SiteUnavailable(f"site {site} failed: {exc}")


class SiteClient:
    """One other site's archive over gRPC. Thread-safe; ``close()`` when done."""

    def __init__(self, site: SiteConfig, fed: FederationConfig, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.site_id = site.id
        self.config = site
        self._health_timeout = fed.health_timeout
        self._cache_seconds = fed.health_cache_seconds
        self._clock = clock
        ca = None
        if site.tls_ca:
            try:
                ca = Path(site.tls_ca).read_bytes()
            except OSError as exc:
                raise ConfigError(f"federation site {site.id}: cannot read tls_ca {site.tls_ca}: {exc.strerror}") \
                    from exc
        self.client = VnaClient(site.grpc_endpoint, site.token, root_certificates=ca,
                                timeout=fed.retrieve_timeout, options=_CHANNEL_OPTIONS)
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._healthy = False

    def close(self) -> None:
        """Close the channel."""
        self.client.close()

    def healthy(self, *, fresh: bool = False) -> bool:
        """True if the site's gRPC front-end answers SERVING within ``health_timeout``.

        The answer is cached ``health_cache_seconds`` (unless ``fresh``), so a
        down site costs one short timeout every few seconds, not one per row.
        """
        with self._lock:
            now = self._clock()
            if not fresh and self._checked_at is not None and now - self._checked_at < self._cache_seconds:
                return self._healthy
            from grpc_health.v1 import health_pb2

            try:
                r = self.client.health_stub.Check(health_pb2.HealthCheckRequest(service=""),
                                                  timeout=self._health_timeout)
                ok = bool(r.status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.RpcError as exc:
                log.debug("site %s health check failed: %s", self.site_id, exc)
                ok = False
            if ok != self._healthy or self._checked_at is None:
                log.log(logging.INFO if ok else logging.WARNING, "site %s is %s", self.site_id,
                        "reachable" if ok else "unreachable")
            self._healthy, self._checked_at = ok, self._clock()
            return ok

    def mark_unreachable(self) -> None:
        """Record a failed call: the site counts as unreachable until the next health check."""
        with self._lock:
            self._healthy, self._checked_at = False, self._clock()

    def find(self, level: str, keys: Mapping[str, str] | None = None, *,
             limit: int | None = None) -> Iterator[dict[str, str]]:
        """Matches of a query at that site (its gRPC Query). Raises SiteUnavailable."""
        try:
            yield from self.client.query(level, keys, limit=limit)
        except ApiError as exc:
            raise _mapped(self.site_id, exc) from None

    def fetch(self, sop_uid: str, dest: Path, *, content_sha256: str, size: int) -> None:
        """Copy the instance's bytes as held at that site (its own copies only) to ``dest``, verified.

        The site's stream is verified against the digest it announces and then
        against ``content_sha256``/``size`` (what the index records); ``dest``
        exists only if both hold. Raises SiteUnavailable, NotFound, IntegrityError.
        """
        work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".fetch-"))
        try:
            got = None
            try:
                for inst in self.client.retrieve_to(work, sop_uid=sop_uid, local_only=True):
                    got = inst
            except ApiError as exc:
                err = _mapped(self.site_id, exc)
                if isinstance(err, SiteUnavailable) and not exc.error:
                    self.mark_unreachable()  # the transport failed (the site's own errors carry vna-error)
                raise err from None
            if got is None or got.path is None:
                raise NotFound(f"site {self.site_id} sent nothing for {sop_uid}")
            h = hashlib.sha256()
            n = 0
            with open(got.path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                    n += len(chunk)
            if h.hexdigest() != content_sha256 or n != size:
                raise IntegrityError(f"site {self.site_id} sent {sop_uid} as {n} bytes hashing to "
                                     f"{h.hexdigest()[:12]}..., the index records {size} bytes {content_sha256[:12]}...")
            got.path.replace(dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)


class Sites:
    """The other sites of the federation (``[[federation.site]]``), by id. ``own`` is this site's id."""

    def __init__(self, own: str, fed: FederationConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.own = own
        self.config = fed
        self.clients: dict[str, SiteClient] = {s.id: SiteClient(s, fed, clock=clock) for s in fed.site}

    def __bool__(self) -> bool:
        return bool(self.clients)

    def get(self, site_id: str) -> SiteClient | None:
        """The client of a configured site, or None (own or unknown site)."""
        return self.clients.get(site_id)

    def reachable(self, site_id: str) -> bool:
        """True for this site, and for a configured site that answers its health check (cached)."""
        if site_id == self.own:
            return True
        client = self.clients.get(site_id)
        return client is not None and client.healthy()

    def unreachable(self) -> list[str]:
        """The configured sites that cannot be reached now, sorted."""
        return sorted(sid for sid, c in self.clients.items() if not c.healthy())

    def close(self) -> None:
        """Close every channel."""
        for c in self.clients.values():
            c.close()
