"""Configuration: TOML file, then ``VNA_*`` environment variables, then CLI flags.

Parsed once into frozen dataclasses; each component receives its own slice.
Nothing else in vna reads the environment or config files.

Environment variables name a setting by its section and key in upper case,
joined by ``_``: ``VNA_DICOM_PORT=11113``, ``VNA_INDEX_BACKEND=cassandra``,
``VNA_INDEX_CASSANDRA_CONTACT_POINTS=10.0.0.1,10.0.0.2``, ``VNA_DATA_DIR=/srv/vna``
(``archive`` keys may omit the section). Lists are comma separated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from vna.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "RemoteAE",
    "SenderAE",
    "DicomConfig",
    "HotTierConfig",
    "S3Config",
    "ColdTierConfig",
    "LifecycleConfig",
    "IntegrityConfig",
    "CassandraConfig",
    "IndexConfig",
    "ArchiveConfig",
    "AuditConfig",
    "TelemetryConfig",
    "GrpcToken",
    "GrpcConfig",
    "WebConfig",
    "HealthConfig",
    "SiteConfig",
    "CopyRule",
    "FederationConfig",
    "Config",
    "load_config",
    "env_settings",
    "unknown_env",
]


@dataclass(frozen=True)
class RemoteAE:
    """A DICOM peer the archive may connect to (C-MOVE destination, commitment reports)."""

    ae_title: str
    host: str
    port: int
    tls: bool = False               # associate over TLS (verified with dicom.tls_ca)


@dataclass(frozen=True)
class SenderAE:
    """A DICOM peer that stores to the archive (``[[dicom.sender]]``), and what ingest assumes about its objects."""

    ae_title: str
    #: issuer recorded for its objects that carry a PatientID but no IssuerOfPatientID (the bytes stay as sent)
    issuer_of_patient_id: str = ""


@dataclass(frozen=True)
class DicomConfig:
    """The DIMSE front-end."""

    ae_title: str = "VNA"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aes: tuple[str, ...] = ()
    max_associations: int = 32
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu: int = 65536
    workers: int = 1
    receiver: str = "native"         # the Rust core owns the DICOM port (vna/dicom/native_server.py); "python": pynetdicom
    accept_unknown_storage_classes: bool = False  # accept storage SOP classes pynetdicom does not list (private ones)
    max_connections_per_address: int = 8   # open connections one peer address may hold (associations included)
    max_half_open_connections: int = 64    # connections not yet associated (counted apart from max_associations)
    remote: tuple[RemoteAE, ...] = ()
    sender: tuple[SenderAE, ...] = ()
    # DICOM over TLS (BCP 195, TLS 1.2+): a second listener on tls_port (0: none). Paths relative to data_dir.
    tls_port: int = 0
    tls_cert: str = ""              # PEM certificate (chain) presented by the listener and to TLS remotes
    tls_key: str = ""               # PEM private key of tls_cert
    tls_client_ca: str = ""         # PEM CA bundle: TLS clients must present a certificate it signed
    tls_ca: str = ""                # PEM CA bundle to verify TLS remotes (empty: the system's CAs)
    commitment_retries: int = 5     # further attempts to deliver a Storage Commitment report
    commitment_retry_interval: float = 10.0  # seconds before the first retry (doubling)

    def find_remote(self, ae_title: str) -> RemoteAE | None:
        """Return the configured peer with this AE title (trailing spaces ignored)."""
        wanted = ae_title.strip()
        for ae in self.remote:
            if ae.ae_title == wanted:
                return ae
        return None


@dataclass(frozen=True)
class S3Config:
    """One S3-compatible bucket (AWS S3, Ceph RGW, MinIO, SeaweedFS...)."""

    endpoint_url: str = ""          # empty: AWS default endpoint
    bucket: str = ""
    prefix: str = ""                # key prefix inside the bucket
    region: str = "us-east-1"
    access_key: str = ""            # empty: boto3's default credential chain
    secret_key: str = ""
    storage_class: str = ""         # e.g. STANDARD_IA, GLACIER_IR; empty: bucket default
    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    redundancy: int = 1             # copies this bucket counts for toward archive.min_copies (its own durability)


@dataclass(frozen=True)
class HotTierConfig:
    """Hot replicas: filesystem directories (``replicas``) and S3 buckets (``[[hot.s3]]``), write quorum W.

    The replica count N is ``len(replicas) + len(s3)``; ``write_quorum`` 0 means
    W = N. Store ids are ``hot-1..`` for directories and ``hot-s3-1..`` for
    buckets, in config order: every front-end of a cluster must list the same
    replicas in the same order (and reach all of them).
    """

    replicas: tuple[str, ...] = ("hot/r1", "hot/r2")
    s3: tuple[S3Config, ...] = ()
    write_quorum: int = 0
    fsync: bool = True

    @property
    def count(self) -> int:
        """N: how many hot replicas (directories and buckets)."""
        return len(self.replicas) + len(self.s3)

    @property
    def quorum(self) -> int:
        """The effective write quorum."""
        return self.write_quorum or self.count


COLD_CODECS = ("dicom-px1", "dicom-px2", "dicom-px3")


@dataclass(frozen=True)
class ColdTierConfig:
    """The compressed cold tier: a filesystem directory (embedded default) or an S3 bucket."""

    backend: str = "filesystem"     # or "s3"
    path: str = "cold"              # filesystem backend, relative to data_dir
    s3: S3Config = field(default_factory=S3Config)
    zstd_level: int = 9
    codec: str = "dicom-px1"        # cold frames: "dicom-px1", or "dicom-px2"/"dicom-px3" (native extension)
    encode_workers: int = 0         # threads encoding a bundle's frames (0: one per core)
    bundle_by: str = "series"       # or "study": one cold object per series / per study
    redundancy: int = 1             # copies the cold directory counts for toward archive.min_copies (cold.s3.redundancy for S3)

    @property
    def copies_counted(self) -> int:
        """How many of ``archive.min_copies`` one cold copy counts for (the store's declared redundancy)."""
        return self.s3.redundancy if self.backend == "s3" else self.redundancy


@dataclass(frozen=True)
class LifecycleConfig:
    """When studies move from hot to cold. Disabled unless ``enabled``."""

    enabled: bool = False
    min_age_days: float = 365.0
    age_basis: str = "ingest"       # "ingest" (received_at), "study_date", or "last_access"
    modalities: tuple[str, ...] = ()    # only studies with one of these modalities (empty: any)
    source_aes: tuple[str, ...] = ()    # only studies received from these AEs (empty: any)
    exclude_modalities: tuple[str, ...] = ()
    interval_seconds: float = 3600.0    # daemon pause between runs in `vna serve`
    batch_limit: int = 100              # studies per daemon run
    cache_ttl_days: float = 0.0         # >0: recalled instances are kept on the hot tier this long
    lease_seconds: float = 300.0        # a study's migration lease; renewed per bundle, expires if a worker dies


VERIFY_LEVELS = ("exists", "size", "stored", "content")


@dataclass(frozen=True)
class IntegrityConfig:
    """Scrub (detection), repair and orphan settings. Daemons run only when enabled."""

    verify_level: str = "content"       # one of VERIFY_LEVELS, cheapest first
    objects_per_second: float = 0.0     # scrub rate limit (0: unlimited)
    bytes_per_second: float = 0.0       # scrub read-rate limit (0: unlimited)
    orphan_grace_seconds: float = 86400.0   # blobs younger than this are never called orphans
    stale_pending_seconds: float = 3600.0   # a hot PENDING copy older than this is redone by repair
    scrub_interval_seconds: float = 3600.0  # daemon pause between scrub runs in `vna serve`
    repair_interval_seconds: float = 600.0  # daemon pause between repair runs in `vna serve`
    scrub_enabled: bool = False
    repair_enabled: bool = False
    batch_limit: int = 10000            # placements per daemon run


@dataclass(frozen=True)
class CassandraConfig:
    """Connection and schema settings of the Cassandra index."""

    contact_points: tuple[str, ...] = ("127.0.0.1",)
    port: int = 9042
    local_dc: str = "dc1"
    keyspace: str = "vna"
    replication: str = '{"dc1": 1}'
    username: str = ""
    password: str = ""
    consistency: str = "LOCAL_QUORUM"
    serial_consistency: str = "LOCAL_SERIAL"
    request_timeout: float = 30.0
    concurrency: int = 32

    @property
    def replication_map(self) -> dict[str, int]:
        """The per-datacenter replication factors."""
        try:
            value = json.loads(self.replication)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"index.cassandra.replication is not JSON: {exc}") from exc
        if not isinstance(value, dict) or not all(isinstance(v, int) for v in value.values()):
            raise ConfigError('index.cassandra.replication must look like {"dc1": 3}')
        return {str(k): int(v) for k, v in value.items()}


AUDIT_FAILURE_POLICIES = ("refuse", "buffer")


@dataclass(frozen=True)
class AuditConfig:
    """The audit trail: hash-chained JSON lines, optionally forwarded to a syslog collector (RFC 5424).

    ``fsync``: records are written to the kernel before the operation is
    answered, and fsynced every ``fsync_interval`` seconds (0: each record,
    before the answer). ``on_failure``: "refuse" answers every audited
    operation with a failure (before storing) while the trail cannot be
    written; "buffer" keeps up to ``buffer_max`` records in memory, logs an
    ERROR and flags health, and refuses once the buffer is full.
    """

    enabled: bool = True
    path: str = "audit/audit.log"   # relative to data_dir
    fsync: bool = True
    fsync_interval: float = 1.0
    on_failure: str = "refuse"      # or "buffer"
    buffer_max: int = 10000
    min_free_mb: int = 16           # "refuse": refuse before storing when the audit filesystem has less free
    syslog_host: str = ""           # empty: no forwarding
    syslog_port: int = 514
    syslog_protocol: str = "udp"    # or "tcp" (RFC 6587 octet counting); only tcp detects a lost collector
    transfer_flush_interval: float = 5.0   # DIMSE C-STORE: a study's record is written at the latest this
    #                                        many seconds after its first instance not yet in one (vna/transfer_audit.py)


@dataclass(frozen=True)
class TelemetryConfig:
    """OpenTelemetry traces and metrics. Disabled: no-op instruments, nothing exported."""

    enabled: bool = False
    service_name: str = "vna"
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int = 0        # 0: no Prometheus scrape endpoint
    otlp_endpoint: str = ""         # e.g. "http://collector:4317" (OTLP/gRPC); empty: no OTLP export
    export_interval_seconds: float = 10.0   # OTLP metric export period
    trace_sample_ratio: float = 1.0
    stats_interval_seconds: float = 300.0   # refresh of the index-derived gauges (tiers, lifecycle backlog); 0: off


@dataclass(frozen=True)
class IndexConfig:
    """Which index backend, and its settings."""

    backend: str = "sqlite"
    sqlite_path: str = "index.sqlite"
    migrate_on_start: bool = True
    cassandra: CassandraConfig = field(default_factory=CassandraConfig)


@dataclass(frozen=True)
class ArchiveConfig:
    """Archive-wide policy."""

    data_dir: str = "./vna-data"
    duplicate_policy: str = "reject"  # or "version"
    site_id: str = "local"
    min_copies: int = 2             # independent verified copies every instance keeps (lifecycle never goes below)
    permissions: str = "owner"      # files and directories under the data, spool, audit and cold paths: "owner" or "group"

    @property
    def umask(self) -> int:
        """The process umask of every ``vna`` verb: 0o077 for "owner", 0o027 for "group"."""
        return 0o027 if self.permissions == "group" else 0o077

    @property
    def file_mode(self) -> int:
        """The mode of files vna creates: 0o600 for "owner", 0o640 for "group"."""
        return 0o666 & ~self.umask

    @property
    def dir_mode(self) -> int:
        """The mode of directories vna creates: 0o700 for "owner", 0o750 for "group"."""
        return 0o777 & ~self.umask


GRPC_ROLES = ("read", "write")


@dataclass(frozen=True)
class GrpcToken:
    """One bearer token of the gRPC API (``[[grpc.token]]``): a name for logs, the secret, a role."""

    name: str
    token: str
    role: str = "read"              # "read" or "write" (write includes read)


@dataclass(frozen=True)
class GrpcConfig:
    """The gRPC front-end. TLS when ``tls_cert``/``tls_key`` are set; mutual TLS when ``client_ca`` is too.

    Paths are relative to the data directory unless absolute. Every call but
    health checks needs one of the ``token`` bearer tokens.
    """

    enabled: bool = False
    host: str = ""                  # empty: dicom.host
    port: int = 50051
    tls_cert: str = ""              # PEM server certificate (chain)
    tls_key: str = ""               # PEM private key of tls_cert
    client_ca: str = ""             # PEM CA bundle: clients must present a certificate it signed
    token: tuple[GrpcToken, ...] = ()
    max_message_bytes: int = 4 * 1024 * 1024
    max_workers: int = 16           # RPCs served at once (the servicer thread pool)


@dataclass(frozen=True)
class WebConfig:
    """DICOMweb (``/dicomweb``) and the OHIF viewer (``/viewer/``) over HTTP(S); ``port`` 0: off.

    Bound to a loopback address no token is asked; bound to any other address
    every request needs one of the ``[[grpc.token]]`` bearer tokens (read or
    write role), and the server refuses to start without them. TLS when
    ``tls_cert``/``tls_key`` are set (paths relative to the data directory).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: str = ""
    tls_key: str = ""
    max_body_bytes: int = 2 * 1024 ** 3     # largest STOW-RS request body accepted (413 above)
    viewer_dir: str = ""            # the prepared OHIF build; empty: the one `make install` fetched


@dataclass(frozen=True)
class HealthConfig:
    """The readiness endpoint for load balancers (``GET /health``, 200 or 503); ``port`` 0: off."""

    host: str = ""                  # empty: dicom.host
    port: int = 0


@dataclass(frozen=True)
class SiteConfig:
    """Another site of the federation (``[[federation.site]]``): its gRPC front-end and a token for it."""

    id: str
    grpc_endpoint: str              # host:port of that site's gRPC API (behind its load balancer)
    token: str                      # bearer token of that site's API (role read suffices)
    tls_ca: str = ""                # PEM CA bundle to verify its TLS certificate; empty: plaintext
    retrieve_ae: str = ""           # its DICOM AE title, for operators (C-MOVE at that site directly)


@dataclass(frozen=True)
class CopyRule:
    """Which studies of another site get a disaster-recovery copy here (``[[federation.copy]]``).

    A study matches when every given criterion holds: one of ``modalities``
    (empty: any), received at least ``min_age_days`` ago, in ``study_uids``
    (empty: any).
    """

    from_site: str
    modalities: tuple[str, ...] = ()
    min_age_days: float = 0.0
    study_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class FederationConfig:
    """The other sites sharing this index, and the cross-site copy rules. Empty: a single site."""

    site: tuple[SiteConfig, ...] = ()
    copy: tuple[CopyRule, ...] = ()
    health_timeout: float = 2.0         # seconds a reachability check waits
    health_cache_seconds: float = 5.0   # a site's reachability is re-checked at most this often
    retrieve_timeout: float = 300.0     # seconds one cross-site retrieve call may take
    cache_remote: bool = False          # keep a verified local hot copy of a remotely fetched instance
    copy_enabled: bool = False          # `vna serve` runs the cross-site copy daemon
    copy_interval_seconds: float = 3600.0
    copy_batch_limit: int = 1000        # instances per copy run

    def find_site(self, site_id: str) -> SiteConfig | None:
        """The configured site with this id, or None."""
        return next((s for s in self.site if s.id == site_id), None)


@dataclass(frozen=True)
class MigrateSource:
    """One legacy DIMSE archive to migrate from (``[[migrate.source]]``)."""

    ae_title: str
    host: str
    port: int
    method: str = "move"                # "move" (to dicom.ae_title, vna's own port) or "get"
    max_associations: int = 2           # studies pulled at once, one association each
    instances_per_second: float = 0.0   # pull rate limit (0: unlimited)
    mb_per_second: float = 0.0          # pull rate limit in MB/s (0: unlimited)
    windows: tuple[str, ...] = ()       # allowed local time windows "HH:MM-HH:MM" (empty: any time)
    issuer_of_patient_id: str = ""      # issuer to assume when the source's objects carry none
    find_limit: int = 0                 # the source's known cap on C-FIND answers (0: unknown)
    timeout: float = 60.0               # seconds one C-FIND/C-MOVE/C-GET may stay silent


@dataclass(frozen=True)
class MigrateConfig:
    """Migration from legacy DIMSE archives (``vna migrate``)."""

    source: tuple[MigrateSource, ...] = ()
    enabled: bool = False               # `vna serve` runs the migration daemon
    interval_seconds: float = 60.0      # daemon pause between runs
    batch_limit: int = 100              # studies per daemon run
    lease_seconds: float = 600.0        # a study's lease while a worker pulls it; expires if the worker dies
    max_attempts: int = 5               # attempts before a study stays failed (reported)
    retry_seconds: float = 30.0         # back-off before the first retry (doubling)

    def find_source(self, ae_title: str) -> MigrateSource | None:
        """The configured source with this AE title, or None."""
        return next((s for s in self.source if s.ae_title == ae_title), None)


@dataclass(frozen=True)
class Config:
    """The whole effective configuration."""

    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    hot: HotTierConfig = field(default_factory=HotTierConfig)
    cold: ColdTierConfig = field(default_factory=ColdTierConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    integrity: IntegrityConfig = field(default_factory=IntegrityConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    web: WebConfig = field(default_factory=WebConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    migrate: MigrateConfig = field(default_factory=MigrateConfig)

    def __post_init__(self) -> None:
        # the one place an empty grpc.host / health.host becomes dicom.host
        if not self.grpc.host:
            object.__setattr__(self, "grpc", dataclasses.replace(self.grpc, host=self.dicom.host))
        if not self.health.host:
            object.__setattr__(self, "health", dataclasses.replace(self.health, host=self.dicom.host))

    @property
    def data_dir(self) -> Path:
        """The absolute data directory."""
        return Path(self.archive.data_dir).expanduser().resolve()

    def resolve(self, path: str) -> Path:
        """A configured path, relative ones taken under the data directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.data_dir / p

    def assigned_issuers(self) -> dict[str, str]:
        """Calling AE title -> the IssuerOfPatientID ingest records for its objects that carry none.

        From ``[[dicom.sender]]`` and ``[[migrate.source]]`` (whose objects arrive from its AE
        title by C-MOVE or C-GET); entries without an issuer are left out.
        """
        out: dict[str, str] = {}
        for ae, issuer in [*((s.ae_title, s.issuer_of_patient_id) for s in self.dicom.sender),
                           *((s.ae_title, s.issuer_of_patient_id) for s in self.migrate.source)]:
            if issuer:
                out[ae.strip()] = issuer
        return out

    def as_dict(self) -> dict[str, Any]:
        """The config as plain data (for ``vna config show``); secrets masked."""
        data = dataclasses.asdict(self)
        if data["index"]["cassandra"]["password"]:
            data["index"]["cassandra"]["password"] = "***"
        for s3 in (data["cold"]["s3"], *data["hot"]["s3"]):
            if s3["secret_key"]:
                s3["secret_key"] = "***"
        for tok in data["grpc"]["token"]:
            tok["token"] = "***"
        for site in data["federation"]["site"]:
            site["token"] = "***"
        return data


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ) and isinstance(typ, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table")
        return _build(typ, value, where)
    if origin is tuple:
        (item_type, _) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list")
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: unsupported type")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer, not {value!r}") from None
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, not {value!r}") from None
    if typ is str:
        if isinstance(value, dict):
            return json.dumps(value)
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {typ!r}")


def _build(cls: type[Any], data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{where}]: {', '.join(sorted(unknown))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


#: ``VNA_*`` variables that are not settings: read by the CLI, the gRPC client, tests and the ops launchers
_ENV_NOT_SETTINGS = ("LOG_LEVEL", "GRPC_TOKEN")
_ENV_NOT_SETTINGS_PREFIXES = ("TEST_", "CASSANDRA_", "WEED", "BENCH_")


def _env_paths() -> dict[str, tuple[str, ...]]:
    """``SECTION_KEY`` (the variable name after ``VNA_``) -> the setting's path in the config tree."""
    paths: dict[str, tuple[str, ...]] = {}

    def walk(cls: type[Any], prefix: tuple[str, ...]) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            if isinstance(typ, type) and dataclasses.is_dataclass(typ):
                walk(typ, prefix + (f.name,))
            elif f.name not in ("remote", "sender", "token", "s3", "site", "copy", "source"):  # lists: TOML only
                paths["_".join(prefix + (f.name,)).upper()] = prefix + (f.name,)

    walk(Config, ())
    for f in dataclasses.fields(ArchiveConfig):
        paths[f.name.upper()] = ("archive", f.name)
    return paths


def env_settings(env: Mapping[str, str]) -> dict[str, str]:
    """The settings the ``VNA_*`` variables of ``env`` set: dotted name (``dicom.port``) -> variable name."""
    paths = _env_paths()
    return {".".join(paths[name[4:]]): name for name in env if name.startswith("VNA_") and name[4:] in paths}


def unknown_env(env: Mapping[str, str]) -> dict[str, str | None]:
    """``VNA_*`` variables of ``env`` that name no setting (a typo): name -> the closest setting's variable, or None."""
    import difflib

    paths = _env_paths()
    retired = {"_".join(path).upper() for path in RETIRED_SETTINGS}
    unknown: dict[str, str | None] = {}
    for name in env:
        rest = name[4:]
        if not name.startswith("VNA_") or rest in paths or rest in _ENV_NOT_SETTINGS or rest in retired \
                or rest.startswith(_ENV_NOT_SETTINGS_PREFIXES):
            continue
        close = difflib.get_close_matches(rest, list(paths), n=1)
        unknown[name] = f"VNA_{close[0]}" if close else None
    return unknown


#: settings that were removed but are still accepted (and ignored) with a warning: path -> what replaced them
RETIRED_SETTINGS: dict[tuple[str, ...], str] = {
    ("dicom", "fast_store"): 'the python receiver is plain pynetdicom now; the fast C-STORE path is '
                             'dicom.receiver = "native"',
}


def _drop_retired(data: dict[str, Any]) -> None:
    """Remove RETIRED_SETTINGS from the (merged) config tree, one warning each."""
    for path, instead in RETIRED_SETTINGS.items():
        node: Any = data
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, dict) and path[-1] in node:
            del node[path[-1]]
            log.warning("%s is retired and ignored: %s (remove it from the configuration)", ".".join(path), instead)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """Map ``VNA_SECTION_KEY`` variables onto the config tree (unknown ones are logged as warnings)."""
    tree: dict[str, Any] = {}
    paths = {**_env_paths(), **{"_".join(path).upper(): path for path in RETIRED_SETTINGS}}
    for name, hint in unknown_env(env).items():
        log.warning("environment variable %s is not a vna setting and is ignored%s", name,
                    f" (did you mean {hint}?)" if hint else "")
    for name, value in env.items():
        if not name.startswith("VNA_"):
            continue
        path = paths.get(name[4:])
        if path is None:
            continue
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective config: defaults < TOML file < ``VNA_*`` env < overrides.

    ``overrides`` is a nested mapping (from CLI flags). Raises ConfigError.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    if env:
        data = _merge(data, _env_overrides(env))
    if overrides:
        data = _merge(data, overrides)
    _drop_retired(data)
    cfg: Config = _build(Config, data, "config")
    _validate(cfg)
    if cfg.telemetry.prometheus_port and not cfg.telemetry.enabled:
        log.warning("telemetry.prometheus_port = %d is ignored: set telemetry.enabled = true to serve metrics",
                    cfg.telemetry.prometheus_port)
    return cfg


def _validate(cfg: Config) -> None:
    if not cfg.hot.count:
        raise ConfigError("hot.replicas and [[hot.s3]] must name at least one replica (directory or bucket)")
    if not 1 <= cfg.hot.quorum <= cfg.hot.count:
        raise ConfigError(
            f"hot.write_quorum must be between 1 and {cfg.hot.count} (the replica count)"
        )
    for i, s3 in enumerate(cfg.hot.s3):
        if not s3.bucket:
            raise ConfigError(f"hot.s3[{i}].bucket is required")
    if len({(s3.endpoint_url, s3.bucket, s3.prefix.strip("/")) for s3 in cfg.hot.s3}) != len(cfg.hot.s3):
        raise ConfigError("hot.s3 entries must name distinct buckets (or prefixes): two replicas in one place are one")
    _validate_replica_paths(cfg)
    if cfg.archive.duplicate_policy not in ("reject", "version"):
        raise ConfigError("archive.duplicate_policy must be 'reject' or 'version'")
    if cfg.archive.min_copies < 1:
        raise ConfigError("archive.min_copies must be >= 1")
    if cfg.archive.permissions not in ("owner", "group"):
        raise ConfigError("archive.permissions must be 'owner' or 'group'")
    if cfg.dicom.max_connections_per_address < 1:
        raise ConfigError("dicom.max_connections_per_address must be >= 1")
    if cfg.dicom.receiver not in ("python", "native"):
        raise ConfigError("dicom.receiver must be 'python' or 'native'")
    if cfg.dicom.max_half_open_connections < 1:
        raise ConfigError("dicom.max_half_open_connections must be >= 1")
    if cfg.index.backend not in ("sqlite", "cassandra"):
        raise ConfigError("index.backend must be 'sqlite' or 'cassandra'")
    if not 0 < cfg.dicom.port < 65536:
        raise ConfigError("dicom.port must be between 1 and 65535")
    ae = cfg.dicom.ae_title
    if not ae or len(ae) > 16 or "\\" in ae or not ae.isprintable():
        raise ConfigError("dicom.ae_title must be 1-16 printable characters")
    _validate_dicom_peers(cfg.dicom)
    if cfg.dicom.commitment_retries < 0 or cfg.dicom.commitment_retry_interval < 0:
        raise ConfigError("dicom.commitment_retries and dicom.commitment_retry_interval must be >= 0")
    if cfg.dicom.max_associations < 1 or cfg.dicom.workers < 1:
        raise ConfigError("dicom.max_associations and dicom.workers must be >= 1")
    _validate_dicom_tls(cfg.dicom)
    cfg.index.cassandra.replication_map  # validates
    if cfg.cold.backend not in ("filesystem", "s3"):
        raise ConfigError("cold.backend must be 'filesystem' or 's3'")
    if cfg.cold.backend == "s3" and not cfg.cold.s3.bucket:
        raise ConfigError("cold.s3.bucket is required when cold.backend = 's3'")
    if cfg.cold.encode_workers < 0:
        raise ConfigError("cold.encode_workers must be >= 0 (0: one per core)")
    if cfg.cold.codec not in COLD_CODECS:
        raise ConfigError(f"cold.codec must be one of {', '.join(COLD_CODECS)}, not {cfg.cold.codec!r}")
    if cfg.cold.bundle_by not in ("series", "study"):
        raise ConfigError("cold.bundle_by must be 'series' or 'study'")
    if min(cfg.cold.redundancy, cfg.cold.s3.redundancy, *(s3.redundancy for s3 in cfg.hot.s3)) < 1:
        raise ConfigError("cold.redundancy, cold.s3.redundancy and hot.s3[].redundancy must be >= 1")
    if cfg.cold.backend == "s3" and cfg.cold.redundancy != 1:
        raise ConfigError("cold.redundancy is the filesystem cold directory's: set cold.s3.redundancy for S3")
    if cfg.lifecycle.age_basis not in ("ingest", "study_date", "last_access"):
        raise ConfigError("lifecycle.age_basis must be 'ingest', 'study_date' or 'last_access'")
    _validate_lifecycle(cfg.lifecycle)
    ic = cfg.integrity
    if ic.verify_level not in VERIFY_LEVELS:
        raise ConfigError(f"integrity.verify_level must be one of {', '.join(VERIFY_LEVELS)}")
    if ic.objects_per_second < 0 or ic.bytes_per_second < 0:
        raise ConfigError("integrity.objects_per_second and integrity.bytes_per_second must be >= 0 (0: unlimited)")
    if ic.orphan_grace_seconds < 0 or ic.stale_pending_seconds < 0:
        raise ConfigError("integrity.orphan_grace_seconds and integrity.stale_pending_seconds must be >= 0")
    if ic.scrub_interval_seconds <= 0 or ic.repair_interval_seconds <= 0:
        raise ConfigError("integrity.scrub_interval_seconds and integrity.repair_interval_seconds must be > 0")
    if ic.batch_limit < 1:
        raise ConfigError("integrity.batch_limit must be >= 1")
    _validate_grpc(cfg.grpc)
    _validate_web(cfg.web, cfg.grpc)
    if not 0 <= cfg.health.port < 65536:
        raise ConfigError("health.port must be between 0 (off) and 65535")
    _validate_observability(cfg.audit, cfg.telemetry)
    _validate_federation(cfg.archive.site_id, cfg.federation)
    _validate_migrate(cfg.migrate)
    issuers = {s.ae_title.strip(): s.issuer_of_patient_id for s in cfg.dicom.sender if s.issuer_of_patient_id}
    for i, src in enumerate(cfg.migrate.source):
        issuer = src.issuer_of_patient_id
        if issuer and issuers.get(src.ae_title.strip(), issuer) != issuer:
            raise ConfigError(f"migrate.source[{i}].issuer_of_patient_id differs from the [[dicom.sender]] entry "
                              f"of the same AE title ({src.ae_title}): one AE, one issuer")


def _validate_replica_paths(cfg: Config) -> None:
    """Two hot replicas (or a replica and the cold directory) in one directory, or one inside another, are one copy."""
    places = [(f"hot.replicas[{i}]", r, Path(cfg.resolve(r)).resolve()) for i, r in enumerate(cfg.hot.replicas)]
    if cfg.cold.backend == "filesystem":
        places.append(("cold.path", cfg.cold.path, Path(cfg.resolve(cfg.cold.path)).resolve()))
    for i, (name, value, path) in enumerate(places):
        for other, other_value, other_path in places[:i]:
            if path == other_path or path.is_relative_to(other_path) or other_path.is_relative_to(path):
                raise ConfigError(f"{name} {value!r} and {other} {other_value!r} are the same directory or one "
                                  f"holds the other ({path}): give each replica its own directory")


def _ae_ok(ae: str) -> bool:
    return bool(ae.strip()) and len(ae) <= 16 and "\\" not in ae and ae.isprintable()


def _validate_dicom_peers(d: DicomConfig) -> None:
    for i, ae in enumerate(d.allowed_calling_aes):
        if not _ae_ok(ae):
            raise ConfigError(f"dicom.allowed_calling_aes[{i}] {ae!r} is not an AE title (1-16 printable characters)")
    titles: set[str] = set()
    for i, r in enumerate(d.remote):
        if not _ae_ok(r.ae_title):
            raise ConfigError(f"dicom.remote[{i}].ae_title {r.ae_title!r} is not an AE title "
                              "(1-16 printable characters)")
        if r.ae_title.strip() in titles:
            raise ConfigError(f"dicom.remote[{i}].ae_title {r.ae_title!r} is listed twice")
        if not r.host:
            raise ConfigError(f"dicom.remote[{i}].host must be set ({r.ae_title})")
        if not 0 < r.port < 65536:
            raise ConfigError(f"dicom.remote[{i}].port must be between 1 and 65535, not {r.port} ({r.ae_title})")
        titles.add(r.ae_title.strip())
    senders: set[str] = set()
    for i, snd in enumerate(d.sender):
        if not _ae_ok(snd.ae_title) or snd.ae_title.strip() in senders:
            raise ConfigError(f"dicom.sender[{i}].ae_title {snd.ae_title!r} must be an AE title, listed once")
        _check_issuer(snd.issuer_of_patient_id, f"dicom.sender[{i}].issuer_of_patient_id")
        senders.add(snd.ae_title.strip())


def _check_issuer(issuer: str, where: str) -> None:
    """An IssuerOfPatientID value (LO: at most 64 characters, no backslash or control character)."""
    if len(issuer) > 64 or "\\" in issuer or not issuer.isprintable():
        raise ConfigError(f"{where} {issuer!r} is not an IssuerOfPatientID (LO: 1-64 printable characters, no \\)")


def _validate_lifecycle(lc: LifecycleConfig) -> None:
    if lc.min_age_days < 0 or lc.cache_ttl_days < 0:
        raise ConfigError("lifecycle.min_age_days and lifecycle.cache_ttl_days must be >= 0, "
                          f"not {lc.min_age_days} and {lc.cache_ttl_days}")
    if lc.interval_seconds <= 0 or lc.lease_seconds <= 0:
        raise ConfigError("lifecycle.interval_seconds and lifecycle.lease_seconds must be > 0")
    if lc.batch_limit < 1:
        raise ConfigError("lifecycle.batch_limit must be >= 1")


def _site_id_ok(site_id: str) -> bool:
    return bool(site_id) and len(site_id) <= 32 and all(c.isalnum() or c in "-_." for c in site_id)


def _validate_federation(own: str, f: FederationConfig) -> None:
    from vna.domain import validate_uid
    from vna.errors import InvalidUID

    if not _site_id_ok(own):
        raise ConfigError("archive.site_id must be 1-32 letters, digits, '-', '_' or '.'")
    ids: set[str] = set()
    for i, s in enumerate(f.site):
        if not _site_id_ok(s.id):
            raise ConfigError(f"federation.site[{i}].id must be 1-32 letters, digits, '-', '_' or '.'")
        if s.id == own or s.id in ids:
            raise ConfigError(f"federation.site[{i}].id {s.id!r} is this site's id or listed twice")
        if own == "local":
            raise ConfigError("federation.site needs archive.site_id set to this site's id (not 'local')")
        host, sep, port = s.grpc_endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"federation.site[{i}].grpc_endpoint must be host:port, not {s.grpc_endpoint!r}")
        if len(s.token) < 16 or not s.token.isprintable() or " " in s.token:
            raise ConfigError(f"federation.site[{i}].token must be at least 16 printable characters without spaces")
        ids.add(s.id)
    for i, rule in enumerate(f.copy):
        if rule.from_site not in ids:
            raise ConfigError(f"federation.copy[{i}].from_site {rule.from_site!r} is not a [[federation.site]]")
        if rule.min_age_days < 0:
            raise ConfigError(f"federation.copy[{i}].min_age_days must be >= 0")
        for uid in rule.study_uids:
            try:
                validate_uid(uid, f"federation.copy[{i}].study_uids")
            except InvalidUID as exc:
                raise ConfigError(str(exc)) from None
    if f.health_timeout <= 0 or f.retrieve_timeout <= 0 or f.health_cache_seconds < 0:
        raise ConfigError("federation.health_timeout and retrieve_timeout must be > 0, health_cache_seconds >= 0")
    if f.copy_interval_seconds <= 0 or f.copy_batch_limit < 1:
        raise ConfigError("federation.copy_interval_seconds must be > 0 and copy_batch_limit >= 1")


def _validate_migrate(m: MigrateConfig) -> None:
    import re

    titles: set[str] = set()
    for i, s in enumerate(m.source):
        if not _ae_ok(s.ae_title) or s.ae_title in titles:
            raise ConfigError(f"migrate.source[{i}].ae_title {s.ae_title!r} must be an AE title, listed once")
        if not s.host or not 0 < s.port < 65536:
            raise ConfigError(f"migrate.source[{i}] needs host and a port between 1 and 65535 ({s.ae_title})")
        if s.method not in ("move", "get"):
            raise ConfigError(f"migrate.source[{i}].method must be 'move' or 'get' ({s.ae_title})")
        if s.max_associations < 1 or s.find_limit < 0 or s.timeout <= 0:
            raise ConfigError(f"migrate.source[{i}]: max_associations >= 1, find_limit >= 0, timeout > 0")
        if s.instances_per_second < 0 or s.mb_per_second < 0:
            raise ConfigError(f"migrate.source[{i}]: rate limits must be >= 0 (0: unlimited)")
        _check_issuer(s.issuer_of_patient_id, f"migrate.source[{i}].issuer_of_patient_id")
        for w in s.windows:
            if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d", w):
                raise ConfigError(f"migrate.source[{i}].windows: {w!r} is not HH:MM-HH:MM")
        titles.add(s.ae_title)
    if m.interval_seconds <= 0 or m.lease_seconds <= 0 or m.retry_seconds < 0:
        raise ConfigError("migrate.interval_seconds and migrate.lease_seconds must be > 0, retry_seconds >= 0")
    if m.batch_limit < 1 or m.max_attempts < 1:
        raise ConfigError("migrate.batch_limit and migrate.max_attempts must be >= 1")


def _validate_dicom_tls(d: DicomConfig) -> None:
    if not 0 <= d.tls_port < 65536 or (d.tls_port and d.tls_port == d.port):
        raise ConfigError("dicom.tls_port must be 0 (off) or a port other than dicom.port")
    if d.tls_port and not (d.tls_cert and d.tls_key):
        raise ConfigError("dicom.tls_port needs dicom.tls_cert and dicom.tls_key")
    if bool(d.tls_cert) != bool(d.tls_key):
        raise ConfigError("dicom.tls_cert and dicom.tls_key must be set together")
    if d.tls_client_ca and not d.tls_port:
        raise ConfigError("dicom.tls_client_ca (mutual TLS) needs dicom.tls_port")


def _validate_grpc(g: GrpcConfig) -> None:
    if not 0 < g.port < 65536:
        raise ConfigError("grpc.port must be between 1 and 65535")
    if bool(g.tls_cert) != bool(g.tls_key):
        raise ConfigError("grpc.tls_cert and grpc.tls_key must be set together")
    if g.client_ca and not g.tls_cert:
        raise ConfigError("grpc.client_ca (mutual TLS) needs grpc.tls_cert and grpc.tls_key")
    if g.max_message_bytes < 65536:
        raise ConfigError("grpc.max_message_bytes must be >= 65536")
    if g.max_workers < 1:
        raise ConfigError("grpc.max_workers must be >= 1")
    names: set[str] = set()
    secrets: set[str] = set()
    for i, t in enumerate(g.token):
        if not t.name or t.name in names:
            raise ConfigError(f"grpc.token[{i}].name must be set and unique")
        if t.role not in GRPC_ROLES:
            raise ConfigError(f"grpc.token[{i}].role must be one of {', '.join(GRPC_ROLES)}")
        if len(t.token) < 16 or not t.token.isprintable() or " " in t.token:
            raise ConfigError(f"grpc.token[{i}].token must be at least 16 printable characters without spaces")
        if t.token in secrets:
            raise ConfigError(f"grpc.token[{i}].token is used by another token")
        names.add(t.name)
        secrets.add(t.token)
    if g.enabled and not g.token:
        raise ConfigError("grpc.enabled needs at least one [[grpc.token]] (every call is authenticated)")


def _validate_web(w: WebConfig, g: GrpcConfig) -> None:
    if not 0 <= w.port < 65536:
        raise ConfigError("web.port must be between 0 (off) and 65535")
    if bool(w.tls_cert) != bool(w.tls_key):
        raise ConfigError("web.tls_cert and web.tls_key must be set together")
    if w.max_body_bytes < 1024 * 1024:
        raise ConfigError("web.max_body_bytes must be >= 1048576")
    if w.port and not is_loopback(w.host) and not g.token:
        raise ConfigError(f"web.host = {w.host}: DICOMweb bound to a non-loopback address needs bearer tokens: "
                          "configure [[grpc.token]] (the same tokens and roles) or set web.host = 127.0.0.1")


def is_loopback(host: str) -> bool:
    """True if ``host`` names only this machine (``localhost``, 127.0.0.0/8, ::1)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate_observability(a: AuditConfig, t: TelemetryConfig) -> None:
    if a.on_failure not in AUDIT_FAILURE_POLICIES:
        raise ConfigError(f"audit.on_failure must be one of {', '.join(AUDIT_FAILURE_POLICIES)}")
    if a.buffer_max < 1:
        raise ConfigError("audit.buffer_max must be >= 1")
    if a.transfer_flush_interval <= 0:
        raise ConfigError("audit.transfer_flush_interval must be > 0")
    if a.fsync_interval < 0 or a.min_free_mb < 0:
        raise ConfigError("audit.fsync_interval and audit.min_free_mb must be >= 0")
    if not a.path:
        raise ConfigError("audit.path must be set")
    if a.syslog_protocol not in ("udp", "tcp"):
        raise ConfigError("audit.syslog_protocol must be 'udp' or 'tcp'")
    if a.syslog_host and not 0 < a.syslog_port < 65536:
        raise ConfigError("audit.syslog_port must be between 1 and 65535")
    if not 0 <= t.prometheus_port < 65536:
        raise ConfigError("telemetry.prometheus_port must be between 0 (off) and 65535")
    if t.stats_interval_seconds < 0:
        raise ConfigError("telemetry.stats_interval_seconds must be >= 0 (0: off)")
    if not 0.0 <= t.trace_sample_ratio <= 1.0:
        raise ConfigError("telemetry.trace_sample_ratio must be between 0 and 1")
    if t.export_interval_seconds <= 0:
        raise ConfigError("telemetry.export_interval_seconds must be > 0")
    if not t.service_name:
        raise ConfigError("telemetry.service_name must be set")
