"""Deterministic generator of realistic DICOM corpora (seeded; same seed, same bytes).

Kinds: ``ct`` (512x512 16-bit CT with smooth anatomy-like content plus noise),
``mr`` (256x256 16-bit), ``small`` (64x64 8-bit secondary capture: per-instance
overhead). Used by the benchmarks and by the tests.

    python -m benchmarks.corpus --out /tmp/corpus --kind ct --count 100
"""

from __future__ import annotations

import argparse
import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, UID

__all__ = ["StudySpec", "make_study", "write_corpus", "uid"]

_ROOT = "1.2.826.0.1.3680043.10.1137"  # vna test-data UID root
SOP_CLASS = {
    "ct": UID("1.2.840.10008.5.1.4.1.1.2"),
    "mr": UID("1.2.840.10008.5.1.4.1.1.4"),
    "small": UID("1.2.840.10008.5.1.4.1.1.7"),
}
_KIND_NO = {"ct": 1, "mr": 2, "small": 3}
SHAPE = {"ct": (512, 512, 16), "mr": (256, 256, 16), "small": (64, 64, 8)}


def uid(*parts: int) -> str:
    """A deterministic UID under the vna test root."""
    return _ROOT + "." + ".".join(str(p) for p in parts)


@dataclass(frozen=True)
class StudySpec:
    """What one generated study looks like."""

    kind: str = "ct"
    instances: int = 10
    seed: int = 1
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    accession: str = ""
    transfer_syntax: str = ExplicitVRLittleEndian


def _pixels(kind: str, rng: np.random.Generator, index: int) -> np.ndarray:
    rows, cols, bits = SHAPE[kind]
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    r = np.sqrt(((y - cy) / (rows * 0.42)) ** 2 + ((x - cx) / (cols * 0.36)) ** 2)
    body = (r < 1.0).astype(np.float32)
    organs = np.zeros_like(body)
    for k in range(5):
        oy = cy + rows * 0.2 * np.sin(k * 1.3 + index * 0.05)
        ox = cx + cols * 0.2 * np.cos(k * 1.7)
        rad = rows * (0.05 + 0.02 * k)
        organs += ((y - oy) ** 2 + (x - ox) ** 2 < rad**2) * (40.0 * (k + 1))
    if bits == 16:
        img = -1000 + body * (1040 + organs) + rng.normal(0, 12, (rows, cols)) * body
        return np.clip(img + 1024, 0, 4095).astype(np.uint16)
    img = body * (80 + organs) + rng.normal(0, 3, (rows, cols))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_study(spec: StudySpec, study_no: int) -> list[Dataset]:
    """The instances of one study (one series), fully deterministic in (spec, study_no)."""
    rng = np.random.default_rng(spec.seed * 1_000_003 + study_no)
    kind = spec.kind
    rows, cols, bits = SHAPE[kind]
    k = _KIND_NO[kind]
    study_uid = uid(k, spec.seed, study_no)
    series_uid = uid(k, spec.seed, study_no, 1)
    date = spec.study_date or (_dt.date(2015, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 3650)))).strftime("%Y%m%d")
    out = []
    for i in range(spec.instances):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = SOP_CLASS[kind]
        ds.file_meta.MediaStorageSOPInstanceUID = uid(k, spec.seed, study_no, 1, i + 1)
        ds.file_meta.TransferSyntaxUID = UID(spec.transfer_syntax)
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = SOP_CLASS[kind]
        ds.SOPInstanceUID = uid(k, spec.seed, study_no, 1, i + 1)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientName = spec.patient_name or f"TEST^PATIENT{study_no:04d}"
        ds.PatientID = spec.patient_id or f"PID{spec.seed:03d}{study_no:05d}"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = date
        ds.StudyTime = "101500"
        ds.AccessionNumber = spec.accession or f"ACC{spec.seed:03d}{study_no:05d}"
        ds.StudyID = str(study_no)
        ds.StudyDescription = f"{kind.upper()} test study"
        ds.ReferringPhysicianName = "REF^DOCTOR"
        ds.Modality = {"ct": "CT", "mr": "MR", "small": "OT"}[kind]
        ds.SeriesNumber = 1
        ds.SeriesDescription = "generated"
        ds.InstanceNumber = i + 1
        if kind == "small":
            ds.ConversionType = "WSD"
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.SliceThickness = 1.0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = bits
        ds.BitsStored = 12 if bits == 16 else 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        if kind == "ct":
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
        ds.PixelData = _pixels(kind, rng, i).tobytes()
        out.append(ds)
    return out


def write_corpus(out_dir: Path, kind: str = "ct", studies: int = 1, per_study: int = 10, seed: int = 1,
                 transfer_syntax: str = ExplicitVRLittleEndian) -> list[Path]:
    """Write ``studies`` x ``per_study`` Part 10 files; returns their paths in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    spec = StudySpec(kind=kind, instances=per_study, seed=seed, transfer_syntax=transfer_syntax)
    implicit = UID(transfer_syntax) == ImplicitVRLittleEndian
    for s in range(studies):
        for i, ds in enumerate(make_study(spec, s)):
            p = out_dir / f"{kind}-{seed}-{s:04d}-{i:04d}.dcm"
            ds.save_as(p, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
            paths.append(p)
    return paths


def main() -> None:
    """CLI: write a corpus to a directory."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--kind", choices=sorted(SHAPE), default="ct")
    ap.add_argument("--studies", type=int, default=1)
    ap.add_argument("--count", type=int, default=10, help="instances per study")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    paths = write_corpus(args.out, args.kind, args.studies, args.count, args.seed)
    print(f"wrote {len(paths)} files to {args.out}")


if __name__ == "__main__":
    main()
