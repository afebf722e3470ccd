"""Cold-tier codec comparison: dicom-px3, dicom-px2 and dicom-px1 vs plain zstd vs JPEG-LS lossless, same run, same files.

Corpora: generated CT (512x512 16-bit) and MR (256x256 16-bit) from
``benchmarks.corpus`` (smooth synthetic anatomy + noise: ratios differ from real
data), and real CT / MR files: the uncompressed little-endian 16-bit images that
pydicom ships, plus pydicom-data's (``pip install pydicom-data``, or point
``--data-dir`` at its ``data_store/data`` folder) when present.

For every file and codec: encode and decode are each timed ``--repeat`` times
(best taken) in process CPU time, single-threaded (MB/s per core, of original
file bytes; CPU time keeps the numbers usable on a shared machine), and every
roundtrip is checked bit-exact. Ratio = original bytes / stored bytes over the
whole corpus. JPEG-LS (CharLS via ``imagecodecs``; skipped with a message when
missing) codes each frame's pixels (signed data biased to unsigned, as
dicom-px1 does); its stored size is the file with the pixel value replaced by
the codestreams, i.e. an uncompressed header, like a JPEG-LS transfer-syntax file.

    .venv/bin/python -m benchmarks.codec [--ct 20] [--mr 40] [--repeat 3] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydicom
import zstandard
from pydicom.data import get_testdata_files

from benchmarks.corpus import write_corpus
from vna import pixelcodec

NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}

imagecodecs: Any
try:
    import imagecodecs  # type: ignore[no-redef, unused-ignore]

    HAVE_JPEGLS = bool(imagecodecs.JPEGLS.available)
except ImportError:
    imagecodecs = None
    HAVE_JPEGLS = False


@dataclass
class Result:
    """Totals of one codec over one corpus."""

    original: int = 0
    stored: int = 0
    enc_s: float = 0.0
    dec_s: float = 0.0
    files: int = 0

    @property
    def ratio(self) -> float:
        return self.original / self.stored if self.stored else float("nan")


@dataclass
class Corpus:
    name: str
    files: list[bytes] = field(default_factory=list)
    note: str = ""


def best_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def _zstd_codec(level: int) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    def enc(data: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=level).compress(data)

    def dec(frame: bytes) -> bytes:
        return zstandard.ZstdDecompressor().decompress(frame)

    return enc, dec


def _px2_codec(level: int, threads: int = 1, version: int = pixelcodec.FORMAT_VERSION_PX2
               ) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    def enc(data: bytes) -> bytes:
        return pixelcodec.encode(data, level, version=version, threads=threads)

    return enc, pixelcodec.decode


def _px1_codec(level: int, pixel_level: int | None = None
               ) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    def enc(data: bytes) -> bytes:
        return pixelcodec.encode(data, level, pixel_level=pixel_level)

    return enc, pixelcodec.decode


def _native_pixels(data: bytes) -> tuple[np.ndarray, int, bool] | None:
    """(frames, rows, cols) uint16 pixels, pixel value length and signedness, for JPEG-LS."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        if str(ds.file_meta.TransferSyntaxUID) not in NATIVE_LE or ds.BitsAllocated != 16 or ds.SamplesPerPixel != 1:
            return None
    except Exception:  # not DICOM, or no pixel description: not a JPEG-LS candidate
        return None
    frames = int(ds.get("NumberOfFrames") or 1)
    n = ds.Rows * ds.Columns * frames
    if len(ds.PixelData) < 2 * n:  # truncated test files
        return None
    px = np.frombuffer(ds.PixelData, dtype="<u2")[:n].reshape(frames, ds.Rows, ds.Columns)
    signed = ds.PixelRepresentation == 1
    return (px ^ np.uint16(0x8000) if signed else px.copy()), len(ds.PixelData), signed


def run_jpegls(corpus: Corpus, repeat: int, jxl: bool = False) -> Result:
    """JPEG-LS (CharLS), or with ``jxl`` JPEG-XL lossless (libjxl's default effort), per frame."""
    assert imagecodecs is not None
    encode = (lambda f: imagecodecs.jpegxl_encode(f, lossless=True)) if jxl else imagecodecs.jpegls_encode
    decode = imagecodecs.jpegxl_decode if jxl else imagecodecs.jpegls_decode
    r = Result()
    for data in corpus.files:
        native = _native_pixels(data)
        if native is None:
            continue
        px, value_len, _ = native
        enc_s, streams = best_time(lambda: [encode(f) for f in px], repeat)
        dec_s, frames = best_time(lambda: [decode(s) for s in streams], repeat)
        if not all(np.array_equal(a, b) for a, b in zip(frames, px)):
            raise SystemExit(f"{'JPEG-XL' if jxl else 'JPEG-LS'} roundtrip mismatch in {corpus.name}")
        r.original += len(data)
        r.stored += len(data) - value_len + sum(len(s) + 8 for s in streams)  # +8: item header per frame
        r.enc_s += enc_s
        r.dec_s += dec_s
        r.files += 1
    return r


def run_codec(corpus: Corpus, enc: Callable[[bytes], bytes], dec: Callable[[bytes], bytes], repeat: int) -> Result:
    r = Result()
    for data in corpus.files:
        enc_s, frame = best_time(lambda: enc(data), repeat)
        dec_s, out = best_time(lambda: dec(frame), repeat)
        if out != data:
            raise SystemExit(f"roundtrip mismatch in {corpus.name}")
        r.original += len(data)
        r.stored += len(frame)
        r.enc_s += enc_s
        r.dec_s += dec_s
        r.files += 1
    return r


def real_corpora(extra_dirs: list[Path]) -> list[Corpus]:
    """Real uncompressed LE 16-bit greyscale CT and MR files (pydicom's, pydicom-data's, --data-dir)."""
    paths = [Path(p) for p in get_testdata_files() if Path(p).is_file()]
    for d in extra_dirs:
        paths += sorted(p for p in d.rglob("*") if p.is_file())
    seen: set[bytes] = set()
    groups = [(m, big) for m in ("CT", "MR") for big in (True, False)]
    by_mod = {g: Corpus(f"real {g[0]} {'>=256x256' if g[1] else '<256x256 (header-dominated)'}") for g in groups}
    names: dict[tuple[str, bool], list[str]] = {g: [] for g in groups}
    for p in paths:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # not DICOM (READMEs, json, ...): not part of the corpus
            continue
        mod = str(ds.get("Modality", ""))
        ts = str(getattr(ds.get("file_meta", None), "TransferSyntaxUID", ""))
        if mod not in ("CT", "MR") or ts not in NATIVE_LE or ds.get("BitsAllocated") != 16 or ds.get("SamplesPerPixel") != 1:
            continue
        data = p.read_bytes()
        if data in seen or _native_pixels(data) is None:
            continue
        seen.add(data)
        group = (mod, ds.Rows * ds.Columns >= 256 * 256)
        by_mod[group].files.append(data)
        frames = int(ds.get("NumberOfFrames") or 1)
        names[group].append(f"{p.name}({ds.Rows}x{ds.Columns}{f'x{frames}' if frames > 1 else ''})")
    for g, c in by_mod.items():
        shown = ", ".join(names[g][:5]) + (f" +{len(names[g]) - 5} more" if len(names[g]) > 5 else "")
        c.note = shown
    return [c for c in by_mod.values() if c.files]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ct", type=int, default=20, help="generated CT instances (512x512)")
    ap.add_argument("--mr", type=int, default=40, help="generated MR instances (256x256)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data-dir", type=Path, action="append", default=[],
                    help="extra folder of real DICOM files (e.g. pydicom-data's data_store/data)")
    ap.add_argument("--jxl", action="store_true", help="also JPEG-XL lossless (slow) on 16-bit greyscale")
    ap.add_argument("--only", default="", help="comma-separated name prefixes of our codecs to run (e.g. "
                    "'dicom-px3,dicom-px2,zstd-3'; default: all); JPEG-LS always runs when installed")
    args = ap.parse_args(argv)

    corpora: list[Corpus] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, count in (("ct", args.ct), ("mr", args.mr)):
            if count:
                paths = write_corpus(Path(tmp) / kind, kind, studies=1, per_study=count, seed=11)
                corpora.append(Corpus(f"generated {kind.upper()}", [p.read_bytes() for p in paths], "synthetic"))
    corpora += real_corpora(args.data_dir)
    every = sorted({Path(p).read_bytes() for p in get_testdata_files() if Path(p).is_file()})
    corpora.append(Corpus("pydicom test files, every kind", every,
                          "all syntaxes, colour, 8-bit; JPEG-LS: only its 16-bit greyscale native files"))

    codecs: list[tuple[str, Callable[[bytes], bytes], Callable[[bytes], bytes]]] = [
        ("dicom-px3 L3", *_px2_codec(3, version=pixelcodec.FORMAT_VERSION_PX3)),
        ("dicom-px2 L3", *_px2_codec(3)),
        ("dicom-px1 L1", *_px1_codec(1)),
        ("dicom-px1 L3", *_px1_codec(3)),
        ("dicom-px1 L9", *_px1_codec(9)),
        ("zstd-3", *_zstd_codec(3)),
        ("zstd-9", *_zstd_codec(9)),
    ]
    if args.only:
        wanted = tuple(p.strip() for p in args.only.split(",") if p.strip())
        codecs = [c for c in codecs if c[0].startswith(wanted)]
    if not HAVE_JPEGLS:
        print("NOTE: imagecodecs (JPEG-LS) is not installed: skipping that peer "
              "(.venv/bin/pip install imagecodecs)\n")
    print(f"single-threaded, best of {args.repeat} in CPU time; MB/s of original file bytes; ratio = original/stored; "
          f"'px3/x' = dicom-px3 ratio / this codec's ratio\n")
    for corpus in corpora:
        size = sum(len(f) for f in corpus.files)
        print(f"== {corpus.name}: {len(corpus.files)} files, {size / 1e6:.1f} MB  [{corpus.note}]")
        results: list[tuple[str, Result]] = [(name, run_codec(corpus, e, d, args.repeat)) for name, e, d in codecs]
        if HAVE_JPEGLS:
            results.append(("JPEG-LS (CharLS)", run_jpegls(corpus, args.repeat)))
            if args.jxl and bool(imagecodecs.JPEGXL.available):
                results.append(("JPEG-XL lossless", run_jpegls(corpus, args.repeat, jxl=True)))
        ours = results[0][1].ratio
        print(f"   {'codec':18s} {'ratio':>7s} {'enc MB/s':>9s} {'dec MB/s':>9s} {'px3/x':>8s}")
        for name, r in results:
            enc = r.original / r.enc_s / 1e6 if r.enc_s else float("nan")
            dec = r.original / r.dec_s / 1e6 if r.dec_s else float("nan")
            print(f"   {name:18s} {r.ratio:7.2f} {enc:9.1f} {dec:9.1f} {ours / r.ratio:8.2f}")
        print()
    print("issue 4's reference on real 16-bit CT/MR: MED+byte-planes+zstd-9 ~2.3x, zstd-3 ~1.7x, "
          "JPEG-LS ~2.4x at 80-100 MB/s per core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
