"""DICOM over TLS (PS3.15 Annex B, BCP 195): SSL contexts for the DIMSE listener and outgoing associations."""

from __future__ import annotations

import ssl

from vna.config import Config, DicomConfig
from vna.errors import ConfigError

__all__ = ["server_context", "client_context", "client_files"]


def _paths(cfg: Config) -> tuple[str, str]:
    return str(cfg.resolve(cfg.dicom.tls_cert)), str(cfg.resolve(cfg.dicom.tls_key))


def server_context(cfg: Config) -> ssl.SSLContext:
    """The TLS listener's context: TLS 1.2+, our certificate, client certificates required if ``tls_client_ca``.

    Raises ConfigError when a file cannot be loaded (at start-up, not at the first association).
    """
    d: DicomConfig = cfg.dicom
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(*_paths(cfg))
        if d.tls_client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(cfg.resolve(d.tls_client_ca)))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"dicom TLS: cannot load certificate/key/CA: {exc}") from exc
    return ctx


def client_context(cfg: Config) -> ssl.SSLContext:
    """The context for associations we request from a ``tls = true`` remote AE.

    The peer's certificate is verified against ``dicom.tls_ca`` (else the
    system's CAs) and its host name; ours is presented when configured.
    """
    d = cfg.dicom
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.resolve(d.tls_ca)) if d.tls_ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if d.tls_cert and d.tls_key:
        try:
            ctx.load_cert_chain(*_paths(cfg))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"dicom TLS: cannot load certificate/key: {exc}") from exc
    return ctx


def client_files(cfg: Config) -> tuple[str | None, tuple[str, str] | None]:
    """What :func:`client_context` loads, for the native requestor: the CA bundle (None: the system's CAs)
    and our (certificate, key), or None when we present none."""
    d = cfg.dicom
    ca = str(cfg.resolve(d.tls_ca)) if d.tls_ca else None
    return ca, (_paths(cfg) if d.tls_cert and d.tls_key else None)
