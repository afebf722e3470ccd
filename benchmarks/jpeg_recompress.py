"""What a bit-exact lossless recompression of JPEG baseline/extended data could gain (issue 23).

JPEG-XL's JPEG transcoding (``imagecodecs.jpegxl_encode_jpeg``: the original JPEG
bytes come back exactly) on the encapsulated frames of pydicom's JPEG
baseline/extended test files, against zstd-9 (today's fallback for compressed
transfer syntaxes), CPU time, single-threaded. A measurement, not a codec.

    .venv/bin/python -m benchmarks.jpeg_recompress
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import imagecodecs
import pydicom
import zstandard
from pydicom.data import get_testdata_files
from pydicom.encaps import generate_frames

BASELINE_EXTENDED = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}


def jpeg_frames() -> list[tuple[str, bytes]]:
    """(file name, JPEG codestream) of every frame of pydicom's JPEG baseline/extended files."""
    out = []
    for p in sorted(Path(p) for p in get_testdata_files() if Path(p).is_file()):
        try:
            ds = pydicom.dcmread(p)
            if str(ds.file_meta.TransferSyntaxUID) not in BASELINE_EXTENDED:
                continue
            frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
        except Exception:  # not DICOM or no pixel data: not part of the corpus
            continue
        out += [(p.name, f) for f in frames]
    return out


def main() -> int:
    total = jxl = zs = done = 0
    enc_s = dec_s = 0.0
    skipped: set[str] = set()
    frames = jpeg_frames()
    for name, f in frames:
        try:
            t = time.process_time()
            j = imagecodecs.jpegxl_encode_jpeg(f)
            enc_s += time.process_time() - t
            t = time.process_time()
            back = imagecodecs.jpegxl_decode_jpeg(j)
            dec_s += time.process_time() - t
        except imagecodecs.JpegxlError:  # e.g. 12-bit extended: libjxl cannot transcode it
            skipped.add(name)
            continue
        if back != f:
            raise SystemExit(f"JPEG-XL transcode is not bit-exact on {name}")
        total += len(f)
        jxl += len(j)
        zs += len(zstandard.ZstdCompressor(level=9).compress(f))
        done += 1
    print(f"{done}/{len(frames)} JPEG frames, {total / 1e3:.0f} kB (skipped: {', '.join(sorted(skipped)) or '-'})")
    print(f"  JPEG-XL JPEG transcode {total / jxl:.3f}x ({100 * (1 - jxl / total):.1f} % smaller, bit-exact), "
          f"enc {total / enc_s / 1e6:.1f} MB/s, dec {total / dec_s / 1e6:.1f} MB/s")
    print(f"  zstd-9                 {total / zs:.3f}x   -> transcode vs zstd-9: {zs / jxl:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
