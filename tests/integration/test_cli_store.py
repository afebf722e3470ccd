"""``vna store`` of a batch with bad entries (issue 20): each reported, the batch goes on, one summary."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT, VNA


def test_a_batch_with_missing_truncated_and_duplicate_files(tmp_path: Path, corpus: list[Path]) -> None:
    first, second = tmp_path / "first.dcm", tmp_path / "second.dcm"
    shutil.copy(corpus[0], first)
    shutil.copy(corpus[1], second)
    short = tmp_path / "short.dcm"
    short.write_bytes(corpus[2].read_bytes()[:100])  # cut inside the preamble
    text = tmp_path / "notes.dcm"
    text.write_text("not DICOM at all, but long enough to hold a preamble\n" * 4)
    missing = tmp_path / "missing.dcm"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNA_")}
    r = subprocess.run([*VNA, "store", "--data-dir", str(tmp_path / "data"),
                        str(first), str(missing), str(short), str(text), str(second), str(first)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    out, err = r.stdout, r.stderr
    assert r.returncode == 1, (out, err)
    assert "Traceback" not in err and "force=True" not in err and "Warning" not in err, err
    assert f"stored {first}" in out and f"stored {second}" in out  # the batch went on after the missing file
    assert f"duplicate {first}" in out
    failed = [ln for ln in err.splitlines() if ln.startswith("failed ")]
    assert len(failed) == 3, err
    assert f"failed {missing}: no such file" in err
    assert any(ln.startswith(f"failed {short}: ") and "truncated" in ln for ln in failed), failed
    assert any(ln.startswith(f"failed {text}: ") and "not a DICOM" in ln for ln in failed), failed
    summary = "2 stored, 1 duplicate, 3 failed"
    assert (out + err).count(summary) == 1 and out.rstrip().endswith(summary), (out, err)
