"""The one module that imports the native DIMSE core (``vna_native``, built from crates/).

Everything else in vna reaches the extension through :func:`load`.
"""

from __future__ import annotations

from types import ModuleType

from vna.errors import ConfigError

__all__ = ["BUILD_HINT", "available", "load"]

BUILD_HINT = ("build it with `make install` (needs the Rust toolchain: cargo from rustup) "
              "or `pip install ./crates/vna-python` into vna's environment")


def load(needed_by: str = 'dicom.receiver = "native"') -> ModuleType:
    """The ``vna_native`` module; raises ConfigError (naming ``needed_by`` and how to build it) when it is
    not installed."""
    try:
        import vna_native
    except ImportError as exc:
        raise ConfigError(f"{needed_by} needs the native extension vna_native ({exc}): "
                          f"{BUILD_HINT}") from None
    return vna_native


def available() -> bool:
    """True when the extension imports."""
    try:
        load()
    except ConfigError:
        return False
    return True
