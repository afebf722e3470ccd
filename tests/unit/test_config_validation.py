"""Config validation through the real CLI (issue 20): exit 2 with one line naming the setting; env typos warned."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, VNA


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNA_")}
    return {**env, **extra}


def show(tmp_path: Path, toml: str = "", *flags: str, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    """``vna config show`` with this config file content, flags and extra environment."""
    config = tmp_path / "vna.toml"
    config.write_text(toml)
    return subprocess.run([*VNA, "config", "show", "--config", str(config), "--data-dir", str(tmp_path / "data"),
                           *flags], capture_output=True, text=True, cwd=ROOT, env=_env(env or {}), timeout=60)


def _config_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vna: configuration error: "), lines
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("replicas", [
    '["hot/r1", "hot/r1"]',
    '["hot/r1", "hot/./r1/"]',
    '["{data}/hot/r1", "hot/r1"]',
    '["hot", "hot/r2"]',
    '["cold", "hot/r2"]',
])
def test_replicas_in_one_place_are_refused(tmp_path: Path, replicas: str) -> None:
    toml = f"[hot]\nreplicas = {replicas.format(data=tmp_path / 'data')}\n"
    _config_error(show(tmp_path, toml), "hot.replicas[", "own directory")


def test_distinct_replicas_are_accepted(tmp_path: Path) -> None:
    r = show(tmp_path, '[hot]\nreplicas = ["hot/r1", "hot/r10", "/srv/other"]\n')
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("aes, where", [
    ('["PACS", "A_CALLING_AE_TITLE_TOO_LONG"]', "dicom.allowed_calling_aes[1]"),
    ('["  "]', "dicom.allowed_calling_aes[0]"),
    ('["BAD\\\\AE"]', "dicom.allowed_calling_aes[0]"),
])
def test_invalid_allowed_calling_aes_are_refused(tmp_path: Path, aes: str, where: str) -> None:
    _config_error(show(tmp_path, f"[dicom]\nallowed_calling_aes = {aes}\n"), where, "AE title")


def test_invalid_remote_ae_title_is_refused(tmp_path: Path) -> None:
    toml = '[[dicom.remote]]\nae_title = "A_REMOTE_AE_TITLE_TOO_LONG"\nhost = "127.0.0.1"\nport = 104\n'
    _config_error(show(tmp_path, toml), "dicom.remote[0].ae_title", "AE title")


def test_remote_port_0_is_refused(tmp_path: Path) -> None:
    toml = '[[dicom.remote]]\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 0\n'
    _config_error(show(tmp_path, toml), "dicom.remote[0].port", "PACS")


@pytest.mark.parametrize("key", ["min_age_days", "cache_ttl_days"])
def test_negative_ages_are_refused(tmp_path: Path, key: str) -> None:
    _config_error(show(tmp_path, f"[lifecycle]\n{key} = -1\n"), f"lifecycle.{key}")


def test_a_mistyped_vna_variable_is_warned_about(tmp_path: Path) -> None:
    r = show(tmp_path, env={"VNA_DICOM_PROT": "11113", "VNA_LOG_LEVEL": "INFO", "VNA_GRPC_TOKEN": "x" * 20,
                            "VNA_TEST_CASSANDRA": "127.0.0.1:19042"})
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1, r.stderr
    assert "VNA_DICOM_PROT" in warnings[0] and "did you mean VNA_DICOM_PORT" in warnings[0]


def test_an_error_in_a_value_from_the_environment_says_so(tmp_path: Path) -> None:
    line = _config_error(show(tmp_path, env={"VNA_DICOM_PORT": "0"}), "dicom.port", "VNA_DICOM_PORT")
    assert "environment" in line


def test_an_error_in_a_value_from_a_flag_says_so(tmp_path: Path) -> None:
    _config_error(show(tmp_path, "", "--dicom-port", "70000"), "dicom.port", "--dicom-port")


def test_an_error_in_a_value_from_the_file_names_no_variable(tmp_path: Path) -> None:
    line = _config_error(show(tmp_path, "[dicom]\nport = 70000\n"), "dicom.port")
    assert "VNA_" not in line and "--dicom-port" not in line


def test_prometheus_port_without_telemetry_is_warned_about(tmp_path: Path) -> None:
    r = show(tmp_path, "[telemetry]\nprometheus_port = 9464\n")
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1 and "telemetry.prometheus_port" in warnings[0], r.stderr
    assert "telemetry.enabled" in warnings[0]
    assert "WARNING" not in show(tmp_path, "[telemetry]\nenabled = true\nprometheus_port = 9464\n").stderr


@pytest.mark.parametrize("toml, needles", [
    ('[[dicom.sender]]\nae_title = "MOD_A"\nissuer_of_patient_id = "A\\\\B"\n', ("dicom.sender[0].issuer_of_patient_id",)),
    ('[[dicom.sender]]\nae_title = "MOD_A"\nissuer_of_patient_id = "' + "X" * 65 + '"\n',
     ("dicom.sender[0].issuer_of_patient_id",)),
    ('[[dicom.sender]]\nae_title = "MOD_A"\n[[dicom.sender]]\nae_title = "MOD_A"\n', ("dicom.sender[1].ae_title",)),
    ('[[dicom.sender]]\nae_title = "MOD_A"\nissuer_of_patient_id = "HOSP_A"\n'
     '[[migrate.source]]\nae_title = "MOD_A"\nhost = "h"\nport = 104\nissuer_of_patient_id = "HOSP_B"\n',
     ("migrate.source[0].issuer_of_patient_id", "MOD_A")),
    # AE titles compare stripped (as the assignment looks them up): one AE, one issuer
    ('[[dicom.sender]]\nae_title = "MOD_A"\nissuer_of_patient_id = "HOSP_A"\n'
     '[[migrate.source]]\nae_title = "MOD_A "\nhost = "h"\nport = 104\nissuer_of_patient_id = "HOSP_B"\n',
     ("migrate.source[0].issuer_of_patient_id", "MOD_A")),
    ('[[migrate.source]]\nae_title = "OLD"\nhost = "h"\nport = 104\nissuer_of_patient_id = "A\\nB"\n',
     ("migrate.source[0].issuer_of_patient_id",)),
])
def test_bad_issuer_assignments_are_refused(tmp_path: Path, toml: str, needles: tuple[str, ...]) -> None:
    _config_error(show(tmp_path, toml), *needles)


def test_issuer_assignments_are_accepted(tmp_path: Path) -> None:
    r = show(tmp_path, '[[dicom.sender]]\nae_title = "MOD_A"\nissuer_of_patient_id = "HOSP_A"\n'
                       '[[migrate.source]]\nae_title = "MOD_A"\nhost = "h"\nport = 104\nissuer_of_patient_id = "HOSP_A"\n')
    assert r.returncode == 0, r.stderr
    assert "HOSP_A" in r.stdout


@pytest.mark.parametrize("where", ["file", "environment"])
def test_retired_fast_store_is_accepted_with_a_warning_naming_its_replacement(tmp_path: Path, where: str) -> None:
    """An old config file (or environment) with ``dicom.fast_store`` still loads; one warning says what replaced it."""
    if where == "file":
        r = show(tmp_path, "[dicom]\nfast_store = false\nport = 11113\n")
    else:
        r = show(tmp_path, env={"VNA_DICOM_FAST_STORE": "true"})
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1, r.stderr
    assert "dicom.fast_store is retired and ignored" in warnings[0] and 'dicom.receiver = "native"' in warnings[0]
    assert "\"fast_store\"" not in r.stdout
    if where == "file":
        assert "11113" in r.stdout  # the rest of the [dicom] table still applies


def test_unknown_cold_codec_is_refused_and_known_ones_accepted(tmp_path: Path) -> None:
    _config_error(show(tmp_path, '[cold]\ncodec = "dicom-px9"\n'), "cold.codec", "dicom-px3")
    for codec in ("dicom-px1", "dicom-px2", "dicom-px3"):
        r = show(tmp_path, f'[cold]\ncodec = "{codec}"\n')
        assert r.returncode == 0 and codec in r.stdout, r.stderr


def test_negative_cold_encode_workers_is_refused(tmp_path: Path) -> None:
    _config_error(show(tmp_path, "[cold]\nencode_workers = -1\n"), "cold.encode_workers")
