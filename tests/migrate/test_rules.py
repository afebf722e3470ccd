"""Pure rules of the migration: time windows, rate limit, config validation."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from vna.config import load_config
from vna.errors import ConfigError
from vna.migrate.runner import Throttle, in_window
from vna.migrate.source import PID_CHARS, Window


def at(hhmm: str) -> dt.datetime:
    return dt.datetime(2026, 1, 1, int(hhmm[:2]), int(hhmm[3:]))


def test_time_windows_including_over_midnight() -> None:
    assert in_window((), at("12:00"))
    assert in_window(("22:00-06:00",), at("23:30")) and in_window(("22:00-06:00",), at("05:59"))
    assert not in_window(("22:00-06:00",), at("06:00")) and not in_window(("22:00-06:00",), at("12:00"))
    assert in_window(("08:00-09:00", "12:00-13:00"), at("12:30"))


def test_throttle_holds_back_after_a_burst() -> None:
    t = Throttle(instances_per_second=1.0, mb_per_second=0.0)
    assert t.delay() == 0.0
    t.add(1000, 0)
    assert t.delay() > 900
    unlimited = Throttle(0.0, 0.0)
    unlimited.add(10**6, 10**12)
    assert unlimited.delay() == 0.0


def test_window_split_covers_date_then_time_then_patient_id() -> None:
    w = Window(dt.date(2020, 1, 1), dt.date(2020, 1, 4))
    a, b = w.split() or []
    assert (a.start, a.end, b.start, b.end) == (dt.date(2020, 1, 1), dt.date(2020, 1, 2), dt.date(2020, 1, 3),
                                                dt.date(2020, 1, 4))
    day = Window(dt.date(2020, 1, 1), dt.date(2020, 1, 1))
    am, pm = day.split() or []
    assert (am.keys()[1], pm.keys()[1]) == ("000000-115959", "120000-235959")
    minute = Window(dt.date(2020, 1, 1), dt.date(2020, 1, 1), 600, 600)
    by_pid = minute.split() or []
    assert [w.keys()[2] for w in by_pid] == [f"{c}*" for c in PID_CHARS]
    deeper = by_pid[0].split() or []
    assert deeper[0].keys()[2] == PID_CHARS[0] and deeper[0].split() is None   # exact ID: cannot split further


@pytest.mark.parametrize("body, message", [
    ('[[migrate.source]]\nae_title = "A"\nhost = "h"\nport = 104\nmethod = "push"\n', "method"),
    ('[[migrate.source]]\nae_title = "A"\nhost = "h"\nport = 0\n', "port"),
    ('[[migrate.source]]\nae_title = "A"\nhost = "h"\nport = 104\nwindows = ["25:00-06:00"]\n', "windows"),
    ('[[migrate.source]]\nae_title = "A"\nhost = "h"\nport = 104\n[[migrate.source]]\nae_title = "A"\n'
     'host = "h"\nport = 105\n', "listed once"),
    ('[migrate]\nmax_attempts = 0\n', "max_attempts"),
])
def test_bad_migrate_settings_are_config_errors(tmp_path: Path, body: str, message: str) -> None:
    f = tmp_path / "vna.toml"
    f.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_config(f)


def test_migrate_sources_load(tmp_path: Path) -> None:
    f = tmp_path / "vna.toml"
    f.write_text('[[migrate.source]]\nae_title = "OLD"\nhost = "10.0.0.5"\nport = 104\nmethod = "get"\n'
                 'windows = ["22:00-06:00"]\n')
    cfg = load_config(f)
    src = cfg.migrate.find_source("OLD")
    assert src is not None and src.method == "get" and src.windows == ("22:00-06:00",)
    assert cfg.migrate.find_source("NEW") is None
