"""The one module that imports the native pixel coder (``vna_native.gray_*``, crate vna-codec).

Greyscale 8/16-bit samples are coded by a weighted blend of predictors, a
bias-corrected context model and adaptive binary arithmetic coding (px2), or by
a per-strip predictor and static per-context rANS (px3; see crates/vna-codec). Errors of the extension become :class:`~vna.errors.IntegrityError`
(a damaged stream) here; :func:`available` tells whether the extension is installed.
"""

from __future__ import annotations

from types import ModuleType

from vna.errors import IntegrityError

__all__ = ["available", "gray3_decode", "gray3_encode", "gray_decode", "gray_encode"]

_native: ModuleType | None
try:
    import vna_native as _native
except ImportError:  # the extension is optional: px2 encoding falls back to px1 without it
    _native = None


def available() -> bool:
    """Whether the native extension (and so ``dicom-px2`` and ``dicom-px3`` pixel coding) is installed."""
    return _native is not None and hasattr(_native, "gray3_encode")


def _module() -> ModuleType:
    if _native is None or not hasattr(_native, "gray3_encode"):
        raise IntegrityError("dicom-px2/px3 pixel stream: the native extension vna_native is not installed "
                             "(or is older than px3)")
    return _native


def gray_encode(pixels: bytes | memoryview, *, rows: int, cols: int, frames: int, bits: int, signed: bool,
                threads: int = 1) -> bytes:
    """Code little-endian greyscale samples; raises ValueError if the size does not match the geometry."""
    out: bytes = _module().gray_encode(bytes(pixels), rows=rows, cols=cols, frames=frames, bits=bits,
                                       signed=signed, threads=threads)
    return out


def gray_decode(stream: bytes | memoryview, *, rows: int, cols: int, frames: int, bits: int, signed: bool,
                threads: int = 1) -> bytes:
    """Restore what :func:`gray_encode` coded; raises IntegrityError if the stream is damaged."""
    try:
        out: bytes = _module().gray_decode(bytes(stream), rows=rows, cols=cols, frames=frames, bits=bits,
                                           signed=signed, threads=threads)
    except ValueError as exc:
        raise IntegrityError(f"dicom-px2 pixel stream: {exc}") from exc
    return out


def gray3_encode(pixels: bytes | memoryview, *, rows: int, cols: int, frames: int, bits: int, signed: bool,
                 threads: int = 1) -> bytes:
    """Code little-endian greyscale samples as a px3 stream; raises ValueError if the size does not match."""
    out: bytes = _module().gray3_encode(bytes(pixels), rows=rows, cols=cols, frames=frames, bits=bits,
                                        signed=signed, threads=threads)
    return out


def gray3_decode(stream: bytes | memoryview, *, rows: int, cols: int, frames: int, bits: int, signed: bool,
                 threads: int = 1) -> bytes:
    """Restore what :func:`gray3_encode` coded; raises IntegrityError if the stream is damaged."""
    try:
        out: bytes = _module().gray3_decode(bytes(stream), rows=rows, cols=cols, frames=frames, bits=bits,
                                            signed=signed, threads=threads)
    except ValueError as exc:
        raise IntegrityError(f"dicom-px3 pixel stream: {exc}") from exc
    return out
