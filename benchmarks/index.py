"""Index scale benchmark: registration rate and C-FIND latency vs catalogue size, SQLite vs Cassandra.

A deterministic (seeded) synthetic catalogue -- ~10 instances per study in 1-3
series, patients with several studies, names from a list, study dates over 10
years, a modality mix -- is generated directly as InstanceRecord + 2 OK hot
Placements per instance and registered through the public ``Index.register``
(what ingest calls), optionally from a thread pool. Each backend gets the same
catalogue. After reaching every checkpoint size, a fixed STUDY-level query mix
runs through ``Index.find`` with conditions from ``make_condition``, parameters
drawn from studies already registered:

    patient_id     PatientID = <id>
    accession      AccessionNumber = <number>
    date_month     StudyDate = <first>-<last day of a month>
    name_prefix    PatientName = <FAMILY>^<given initial>*
    modality_date  ModalitiesInStudy = <modality>, StudyDate = <one month>

Every result is read to the end (a C-FIND returns all matches); latency is
measured from ``find()`` until the iterator is exhausted.

    .venv/bin/python -m benchmarks.index                                 # both backends, 10k,100k,1M
    .venv/bin/python -m benchmarks.index --sizes 10000 --backends sqlite --json /tmp/index.json
    .venv/bin/python -m benchmarks.index --cassandra 127.0.0.1:9042 --max-seconds 600

The time budget (``--max-seconds``) bounds each backend's registration time (sum
over increments); when it runs out before a size is reached, the query mix runs
at the size actually reached, which is printed as such (never extrapolated).

``--bulk-after N`` reaches large sizes sooner: from N instances on, each backend's
bulk loader writes the rows ``register()`` would leave (SQLite: ``register()``
in 5,000-instance transactions; Cassandra: the committed rows as plain writes,
no Paxos). Those increments' rates are marked ``b`` and are not ingest rates;
the registration rate of the ingest path is the one measured below N.

    .venv/bin/python -m benchmarks.index --sizes 10000,100000,1000000 --bulk-after 100000
"""

from __future__ import annotations

import argparse
import bisect
import calendar
import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

from benchmarks.servers import free_port, fs_type, load_cassandra_launcher
from vna.config import CassandraConfig
from vna.domain import InstanceRecord, Placement, PlacementState, QueryLevel, Tier
from vna.errors import VnaError
from vna.index.base import Index
from vna.index.query import Condition, make_condition

ROOT = Path(__file__).resolve().parent.parent
UID_ROOT = "1.2.826.0.1.3680043.10.1137.9"  # vna test-data root, .9 = index benchmark
BACKENDS = ("sqlite", "cassandra")
QUERY_TYPES = ("patient_id", "accession", "date_month", "name_prefix", "modality_date")
SELECTIVE = ("patient_id", "accession", "name_prefix")  # small, size-independent result sets
HOT_STORES = ("hot-a", "hot-b")

# --------------------------------------------------------------------------- catalogue

FAMILY_NAMES = (
    "SMITH JOHNSON WILLIAMS BROWN JONES GARCIA MILLER DAVIS RODRIGUEZ MARTINEZ HERNANDEZ LOPEZ GONZALEZ "
    "WILSON ANDERSON THOMAS TAYLOR MOORE JACKSON MARTIN LEE PEREZ THOMPSON WHITE HARRIS SANCHEZ CLARK "
    "RAMIREZ LEWIS ROBINSON WALKER YOUNG ALLEN KING WRIGHT SCOTT TORRES NGUYEN HILL FLORES GREEN ADAMS "
    "NELSON BAKER HALL RIVERA CAMPBELL MITCHELL CARTER ROBERTS MUELLER SCHMIDT SCHNEIDER FISCHER WEBER "
    "MEYER WAGNER BECKER SCHULZ HOFFMANN KOCH RICHTER KLEIN WOLF SCHROEDER NEUMANN SCHWARZ ZIMMERMANN "
    "BRAUN KRUEGER HOFMANN HARTMANN LANGE SCHMITT WERNER KRAUSE MEIER LEHMANN MARTIN BERNARD DUBOIS "
    "THOMAS ROBERT RICHARD PETIT DURAND LEROY MOREAU SIMON LAURENT LEFEBVRE MICHEL DAVID BERTRAND ROUX "
    "VINCENT FOURNIER MOREL GIRARD ANDRE MERCIER DUPONT LAMBERT BONNET FRANCOIS MARTINEZ ROSSI RUSSO "
    "FERRARI ESPOSITO BIANCHI ROMANO COLOMBO RICCI MARINO GRECO BRUNO GALLO CONTI DELUCA MANCINI COSTA "
    "GIORDANO RIZZO LOMBARDI MORETTI JANSEN DEJONG DEVRIES VANDENBERG VANDIJK BAKKER VISSER SMIT MEIJER "
    "DEBOER MULDER DEGROOT BOS VOS PETERS HENDRIKS NOWAK KOWALSKI WISNIEWSKI WOJCIK KOWALCZYK KAMINSKI "
    "LEWANDOWSKI ZIELINSKI SZYMANSKI WOZNIAK DABROWSKI KOZLOWSKI JANKOWSKI MAZUR KWIATKOWSKI KRAWCZYK "
    "NIELSEN JENSEN HANSEN PEDERSEN ANDERSEN CHRISTENSEN LARSEN SORENSEN RASMUSSEN JORGENSEN PETERSEN "
    "JOHANSSON KARLSSON NILSSON ERIKSSON LARSSON OLSSON PERSSON SVENSSON GUSTAFSSON PETTERSSON SILVA "
    "SANTOS FERREIRA PEREIRA OLIVEIRA COSTA RODRIGUES MARTINS JESUS SOUSA FERNANDES GONCALVES GOMES "
    "LOPES MARQUES ALVES ALMEIDA RIBEIRO PINTO CARVALHO TEIXEIRA MOREIRA CORREIA MENDES NUNES SOARES "
    "MURPHY KELLY OSULLIVAN WALSH BYRNE RYAN OBRIEN OCONNOR ONEILL DOYLE MCCARTHY GALLAGHER DOHERTY "
    "KENNEDY LYNCH MURRAY QUINN MOORE MCLAUGHLIN CARROLL CONNOLLY DALY CONNELL WANG LI ZHANG LIU CHEN "
    "YANG HUANG ZHAO WU ZHOU XU SUN MA ZHU HU GUO HE GAO LIN LUO SATO SUZUKI TAKAHASHI TANAKA WATANABE "
    "ITO YAMAMOTO NAKAMURA KOBAYASHI KATO YOSHIDA YAMADA SASAKI YAMAGUCHI MATSUMOTO INOUE KIMURA KIM "
    "PARK CHOI JUNG KANG CHO YOON JANG LIM HAN OH SEO SHIN KWON HWANG AHN SONG YOO HONG JEON KHAN ALI "
    "AHMED HUSSAIN SHAH PATEL SINGH KUMAR SHARMA GUPTA DAS BOSE IYER NAIR REDDY RAO MEHTA JOSHI DESAI"
).split()
GIVEN_NAMES = {
    "F": ("MARY PATRICIA JENNIFER LINDA ELIZABETH BARBARA SUSAN JESSICA SARAH KAREN NANCY LISA ANNA "
          "MARIA SOPHIE EMMA LAURA JULIA CLAIRE ISABELLE CHIARA GIULIA EVA HANNA INGRID KATARZYNA "
          "AGNIESZKA YUKI MEI HANA FATIMA PRIYA AISHA OLIVIA AMELIA GRACE CHLOE ZOE").split(),
    "M": ("JAMES JOHN ROBERT MICHAEL WILLIAM DAVID RICHARD JOSEPH THOMAS CHARLES DANIEL PAUL MARK "
          "PETER HANS KLAUS JEAN PIERRE LUCA MARCO JAN PIOTR LARS ERIK JOAO PEDRO LIAM SEAN WEI HIROSHI "
          "MIN RAJ OMAR AHMED NOAH LUKAS FELIX").split(),
}
REFERRING = ("WELBY^MARCUS", "HOUSE^GREGORY", "GREY^MEREDITH", "KILDARE^JAMES", "QUINN^MICHAELA",
             "ROSS^DOUG", "CARTER^JOHN", "", "")

SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4", "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1", "US": "1.2.840.10008.5.1.4.1.1.6.1", "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    "PT": "1.2.840.10008.5.1.4.1.1.128", "NM": "1.2.840.10008.5.1.4.1.1.20", "XA": "1.2.840.10008.5.1.4.1.1.12.1",
    "SR": "1.2.840.10008.5.1.4.1.1.88.67", "KO": "1.2.840.10008.5.1.4.1.1.88.59",
}
TRANSFER_SYNTAX = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90")
SIZE_KB = {"CT": 520, "MR": 130, "CR": 8000, "DX": 9000, "US": 600, "MG": 25000, "PT": 70, "NM": 300,
           "XA": 4000, "SR": 20, "KO": 4}

# (weight, study description, body parts, series modalities for 1/2/3 series)
STUDY_KINDS: tuple[tuple[float, str, tuple[str, ...], tuple[tuple[str, ...], ...]], ...] = (
    (0.27, "CT", ("CHEST", "ABDOMEN", "HEAD", "PELVIS"), (("CT",), ("CT", "CT"), ("CT", "CT", "SR"))),
    (0.18, "MR", ("BRAIN", "KNEE", "SPINE", "PELVIS"), (("MR",), ("MR", "MR"), ("MR", "MR", "MR"))),
    (0.14, "CR", ("CHEST", "HAND", "FOOT"), (("CR",), ("CR", "CR"), ("CR", "CR", "KO"))),
    (0.12, "DX", ("CHEST", "KNEE", "SPINE"), (("DX",), ("DX", "DX"), ("DX", "DX", "DX"))),
    (0.10, "US", ("ABDOMEN", "THYROID", "PELVIS"), (("US",), ("US", "US"), ("US", "US", "SR"))),
    (0.08, "MG", ("BREAST",), (("MG",), ("MG", "MG"), ("MG", "MG", "KO"))),
    (0.04, "PT/CT", ("WHOLEBODY",), (("PT",), ("PT", "CT"), ("PT", "CT", "CT"))),
    (0.04, "NM", ("BONE", "HEART"), (("NM",), ("NM", "NM"), ("NM", "NM", "CT"))),
    (0.03, "XA", ("HEART",), (("XA",), ("XA", "XA"), ("XA", "XA", "XA"))),
)
ACTIVE_PATIENTS = 250
FIRST_DAY = _dt.date(2015, 1, 1)
DAYS = (_dt.date(2024, 12, 31) - FIRST_DAY).days + 1  # 10 years


@dataclass(frozen=True)
class StudyMeta:
    """What the query mix draws its parameters from."""

    uid: str
    patient_id: str
    patient_name: str
    accession: str
    date: str
    modalities: tuple[str, ...]


class Catalogue:
    """Deterministic stream of (InstanceRecord, placements); ``studies`` lists every study started so far.

    Same seed, same stream, whatever the sizes: study i's content depends only on
    the seed and what came before it. A study has 1-3 series and 2-18 instances
    (~10 on average); a new study belongs to a new patient with probability 1/4,
    otherwise to one of the ACTIVE_PATIENTS most recent patients (so ~4 studies per
    patient, stationary from ~1,000 studies on).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.studies: list[StudyMeta] = []
        self.patients: list[tuple[str, str, str, str]] = []  # (id, name, birth date, sex)
        self.instances = 0
        self._weights = list(_cumulative([k[0] for k in STUDY_KINDS]))
        self._it = self._stream()

    def __iter__(self) -> Iterator[tuple[InstanceRecord, list[Placement]]]:
        return self._it

    def __next__(self) -> tuple[InstanceRecord, list[Placement]]:
        return next(self._it)

    def _patient(self) -> tuple[str, str, str, str]:
        rng = self.rng
        if not self.patients or rng.random() < 0.25:
            sex = rng.choice("FM")
            name = f"{rng.choice(FAMILY_NAMES)}^{rng.choice(GIVEN_NAMES[sex])}"
            birth = FIRST_DAY - _dt.timedelta(days=rng.randrange(0, 90 * 365))
            self.patients.append((f"P{len(self.patients) + 1:08d}", name, birth.strftime("%Y%m%d"), sex))
            return self.patients[-1]
        # a returning patient: one of the ACTIVE_PATIENTS most recent ones, so studies per patient
        # (~4) do not grow with the catalogue (uniform over all patients would favour the oldest)
        lo = max(0, len(self.patients) - ACTIVE_PATIENTS)
        return self.patients[rng.randrange(lo, len(self.patients))]

    def _stream(self) -> Iterator[tuple[InstanceRecord, list[Placement]]]:
        rng = self.rng
        study_no = 0
        while True:
            study_no += 1
            pid, pname, birth, sex = self._patient()
            _w, desc, parts, layouts = STUDY_KINDS[bisect.bisect(self._weights, rng.random() * self._weights[-1])]
            n_series = rng.choices((1, 2, 3), weights=(40, 35, 25))[0]
            mods = layouts[n_series - 1]
            n_inst = max(n_series, 2 + rng.randrange(17))  # 2..18, mean ~10
            split = sorted(rng.sample(range(1, n_inst), n_series - 1)) if n_series > 1 else []
            counts = [b - a for a, b in zip([0, *split], [*split, n_inst])]
            day = FIRST_DAY + _dt.timedelta(days=rng.randrange(DAYS))
            date = day.strftime("%Y%m%d")
            stime = f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
            study_uid = f"{UID_ROOT}.{self.seed}.{study_no}"
            part = rng.choice(parts)
            accession = f"A{self.seed % 100:02d}{study_no:09d}"
            study_attrs = {
                "PatientName": pname, "PatientID": pid, "IssuerOfPatientID": "HOSPITAL_A",
                "PatientBirthDate": birth, "PatientSex": sex, "StudyInstanceUID": study_uid,
                "StudyDate": date, "StudyTime": stime, "AccessionNumber": accession, "StudyID": str(study_no % 100000),
                "StudyDescription": f"{desc} {part}", "ReferringPhysicianName": rng.choice(REFERRING),
            }
            self.studies.append(StudyMeta(study_uid, pid, pname, accession, date, tuple(sorted(set(mods)))))
            ts = rng.choice(TRANSFER_SYNTAX)
            for s_no, (modality, count) in enumerate(zip(mods, counts), start=1):
                series_uid = f"{study_uid}.{s_no}"
                series_attrs = {
                    "SeriesInstanceUID": series_uid, "Modality": modality, "SeriesNumber": str(s_no),
                    "SeriesDescription": f"{modality} {part} {s_no}", "BodyPartExamined": part,
                    "SeriesDate": date, "SeriesTime": stime,
                }
                base = study_attrs | series_attrs
                for i_no in range(1, count + 1):
                    yield self._instance(base, study_uid, series_uid, modality, i_no, ts, date, stime)

    def _instance(self, base: dict[str, str], study_uid: str, series_uid: str, modality: str, i_no: int,
                  ts: str, date: str, stime: str) -> tuple[InstanceRecord, list[Placement]]:
        self.instances += 1
        sop_uid = f"{series_uid}.{i_no}"
        size = int(SIZE_KB[modality] * 1024 * (0.8 + 0.4 * self.rng.random()))
        sha = hashlib.sha256(sop_uid.encode()).hexdigest()
        attrs = base | {
            "SOPInstanceUID": sop_uid, "SOPClassUID": SOP_CLASS[modality], "InstanceNumber": str(i_no),
            "ContentDate": date, "ContentTime": stime, "Rows": "512", "Columns": "512",
        }
        received = 1_700_000_000.0 + self.instances * 0.05  # deterministic, increasing
        record = InstanceRecord(
            sop_uid=sop_uid, series_uid=series_uid, study_uid=study_uid, sop_class_uid=SOP_CLASS[modality],
            transfer_syntax_uid=ts, version=1, content_sha256=sha, content_size=size, received_at=received,
            source_ae="MODALITY1", attrs=attrs)
        placements = [
            Placement(sop_uid=sop_uid, version=1, tier=Tier.HOT, store_id=store,
                      blob_key=f"{study_uid}/{series_uid}/{sop_uid}.v1.dcm", codec="identity",
                      content_sha256=sha, content_size=size, stored_sha256=sha, stored_size=size,
                      state=PlacementState.OK, created_at=received, verified_at=received)
            for store in HOT_STORES
        ]
        return record, placements


def _cumulative(values: Sequence[float]) -> Iterator[float]:
    total = 0.0
    for v in values:
        total += v
        yield total


# --------------------------------------------------------------------------- query mix


def _month(date: str) -> str:
    y, m = int(date[:4]), int(date[4:6])
    return f"{y:04d}{m:02d}01-{y:04d}{m:02d}{calendar.monthrange(y, m)[1]:02d}"


def query_params(kind: str, s: StudyMeta, rng: random.Random) -> list[tuple[str, str]]:
    """(keyword, raw value) pairs of one query of ``kind`` built from study ``s`` (which must match)."""
    if kind == "patient_id":
        return [("PatientID", s.patient_id)]
    if kind == "accession":
        return [("AccessionNumber", s.accession)]
    if kind == "date_month":
        return [("StudyDate", _month(s.date))]
    if kind == "name_prefix":
        family, _, given = s.patient_name.partition("^")
        return [("PatientName", f"{family}^{given[:1]}*")]
    if kind == "modality_date":
        return [("ModalitiesInStudy", rng.choice(s.modalities)), ("StudyDate", _month(s.date))]
    raise ValueError(kind)


def conditions(params: list[tuple[str, str]]) -> list[Condition]:
    out = []
    for kw, raw in params:
        c = make_condition(kw, raw)
        if c is not None:
            out.append(c)
    return out


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank-with-interpolation percentile (statistics.quantiles 'inclusive')."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class QueryStats:
    """Latencies (ms) and result sizes of one query type at one checkpoint."""

    n: int = 0
    p50: float = float("nan")
    p95: float = float("nan")
    p99: float = float("nan")
    mean: float = float("nan")
    rows_median: float = float("nan")
    first_row_p50: float = float("nan")
    misses: int = 0  # queries whose source study was not in the result (a correctness failure)
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


def run_queries(index: Index, studies: Sequence[StudyMeta], size: int, seed: int, count: int,
                budget: float, warmup: int) -> dict[str, QueryStats]:
    """Each query type ``count`` times (or until ``budget`` seconds), parameters from ``studies``."""
    out: dict[str, QueryStats] = {}
    for kind in QUERY_TYPES:
        rng = random.Random(f"{seed}/{size}/{kind}")  # same parameters on every backend at this size
        st = QueryStats()
        firsts: list[float] = []
        deadline = None
        for i in range(warmup + count):
            s = studies[rng.randrange(len(studies))]
            conds = conditions(query_params(kind, s, rng))
            t0 = time.perf_counter()
            first = None
            n = 0
            found = False
            try:
                for row in index.find(QueryLevel.STUDY, conds):
                    if first is None:
                        first = time.perf_counter() - t0
                    n += 1
                    found = found or row.get("StudyInstanceUID") == s.uid
            except VnaError as exc:
                st.errors += 1
                print(f"  ! {kind}: {type(exc).__name__}: {exc}", file=sys.stderr)
                if st.errors >= 5:
                    break
                continue
            dt = time.perf_counter() - t0
            if i < warmup:
                continue
            if deadline is None:
                deadline = time.monotonic() + budget - dt
            st.latencies_ms.append(round(dt * 1e3, 3))
            st.rows.append(n)
            firsts.append((first if first is not None else dt) * 1e3)
            st.misses += 0 if found else 1
            if time.monotonic() >= deadline:
                break
        lat = st.latencies_ms
        if lat:
            st.n = len(lat)
            st.p50, st.p95, st.p99 = (round(percentile(lat, p), 2) for p in (50, 95, 99))
            st.mean = round(statistics.fmean(lat), 2)
            st.rows_median = statistics.median(st.rows)
            st.first_row_p50 = round(percentile(firsts, 50), 2)
        out[kind] = st
        print(f"    {kind:14s} n={st.n:3d} p50={st.p50:9.2f} p95={st.p95:9.2f} p99={st.p99:9.2f} ms  "
              f"rows~{st.rows_median:g}{'  MISSES ' + str(st.misses) if st.misses else ''}",
              file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------- registration


@dataclass
class RegStats:
    """One registration increment."""

    registered: int = 0
    seconds: float = 0.0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""


def register_until(index: Index | BulkLoader, cat: Catalogue, target: int, already: int, concurrency: int,
                   deadline: float, label: str) -> RegStats:
    """Register instances from ``cat`` until ``target`` are registered or ``deadline`` passes."""
    st = RegStats()
    lock = threading.Lock()
    state = {"done": already, "taken": already, "abort": False}
    t0 = time.monotonic()
    last_report = [t0]

    def take() -> tuple[InstanceRecord, list[Placement]] | None:
        with lock:
            if state["abort"] or state["taken"] >= target or time.monotonic() >= deadline:
                return None
            state["taken"] += 1
            return next(cat)

    def worker() -> None:
        while (item := take()) is not None:
            record, placements = item
            a = time.perf_counter()
            try:
                index.register(record, placements)
            except VnaError as exc:
                with lock:
                    st.errors += 1
                    st.first_error = st.first_error or f"{type(exc).__name__}: {exc}"
                    if st.errors >= 100:
                        state["abort"] = True
                continue
            dt = time.perf_counter() - a
            with lock:
                st.latencies.append(dt)
                state["done"] += 1
                now = time.monotonic()
                if now - last_report[0] >= 15:
                    last_report[0] = now
                    n = state["done"] - already
                    print(f"    [{label}] {state['done']:,} registered ({n / (now - t0):.0f} inst/s)",
                          file=sys.stderr, flush=True)

    if concurrency <= 1:
        worker()
    else:
        threads = [threading.Thread(target=worker, name=f"reg-{i}", daemon=True) for i in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    st.seconds = time.monotonic() - t0
    st.registered = state["done"] - already
    if st.errors:
        print(f"  ! {label}: {st.errors} registration errors, first: {st.first_error}", file=sys.stderr)
    return st


# --------------------------------------------------------------------------- backends


class BulkLoader:
    """Writes the rows ``Index.register`` would leave, faster, for reaching large sizes (--bulk-after).

    Only the query measurements at the sizes it reaches are meaningful; its rate is
    not the ingest path's and is labelled "bulk".
    """

    concurrency = 1

    def register(self, record: InstanceRecord, placements: Sequence[Placement]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SqliteBulk(BulkLoader):
    """``SqliteIndex.register`` itself, but 5,000 instances per transaction instead of one."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.conn = index._conn()
        self.n = 0
        self.conn.execute("BEGIN IMMEDIATE")

        @contextlib.contextmanager
        def inline() -> Iterator[Any]:
            yield self.conn

        index._write = inline  # an instance attribute shadows the method for this loader only

    def register(self, record: InstanceRecord, placements: Sequence[Placement]) -> None:
        self.index.register(record, placements)
        self.n += 1
        if self.n % 5000 == 0:
            self.conn.execute("COMMIT")
            self.conn.execute("BEGIN IMMEDIATE")

    def close(self) -> None:
        self.conn.execute("COMMIT")
        del self.index._write


class CassandraBulk(BulkLoader):
    """The committed end state of ``CassandraIndex.register`` with plain writes, no Paxos rounds:
    the instance_versions row complete, the placements (one unlogged single-partition batch)
    and the catalogue batch, concurrently; at ``close`` the study summaries (schema v4),
    aggregated in memory (the catalogue has one version per instance), as valid.

    The studies of the first ``concurrency`` calls may have instances registered before
    the bulk load: their summaries are invalidated and recomputed by the index instead."""

    def __init__(self, index: Any, concurrency: int) -> None:
        from cassandra.query import BatchStatement, BatchType

        from vna.index import cassandra as cq

        self.index, self.concurrency = index, concurrency
        self._batch_type: Any = BatchStatement
        self._unlogged: Any = BatchType.UNLOGGED
        cols = cq._VERSION_COLS
        self.version = index._prep(
            f"INSERT INTO {index._t('instance_versions')} ({', '.join(cols)}, complete, claim_id, claimed_at) "
            f"VALUES ({', '.join('?' for _ in cols)}, true, ?, ?)")
        self.placement = index._prep(
            f"INSERT INTO {index._t('placements')} ({', '.join(cq._PLACEMENT_COLS)}) "
            f"VALUES ({', '.join('?' for _ in cq._PLACEMENT_COLS)})")
        self._cq = cq
        self._lock = threading.Lock()
        self._studies: dict[str, tuple[list[Any], dict[str, dict[str, str]]]] = {}  # uid -> (_Inst, series)
        self._edge: set[str] = set()  # studies that may hold instances registered before the bulk load
        self._calls = 0

    def register(self, record: InstanceRecord, placements: Sequence[Placement]) -> None:
        ix = self.index
        batch = self._batch_type(batch_type=self._unlogged)
        for p in placements:
            batch.add(self.placement, (
                p.sop_uid, p.version, p.store_id, p.tier.value, p.blob_key, p.codec, p.content_sha256,
                p.content_size, p.stored_sha256, p.stored_size, p.state.value, p.created_at, p.verified_at,
                p.offset, p.length))
        futures = [ix._session.execute_async(batch)] if placements else []
        futures.append(ix._session.execute_async(self.version, (
            record.sop_uid, record.version, record.series_uid, record.study_uid, record.sop_class_uid,
            record.transfer_syntax_uid, record.content_sha256, record.content_size, record.received_at,
            record.source_ae, json.dumps(record.attrs), uuid.uuid4(), time.time())))
        try:
            ix._write_catalogue(record)
            for f in futures:
                f.result()
        except Exception as exc:  # noqa: BLE001 - counted like a registration error
            raise VnaError(f"bulk load: {type(exc).__name__}: {exc}") from exc
        online = any(self._cq._flags(p.state, p.tier)[0] for p in placements)
        nearline = any(self._cq._flags(p.state, p.tier)[1] for p in placements)
        with self._lock:
            self._calls += 1
            if self._calls <= self.concurrency:
                self._edge.add(record.study_uid)
            insts, series = self._studies.setdefault(record.study_uid, ([], {}))
            insts.append(self._cq._Inst({"series_uid": record.series_uid}, online, nearline))
            series[record.series_uid] = {"Modality": record.attrs.get("Modality", "")}

    def close(self) -> None:
        from cassandra.concurrent import execute_concurrent_with_args

        ix, cq = self.index, self._cq
        stmt = ix._prep(f"UPDATE {ix._t('studies')} SET sum_of = ?, sum_instances = ?, "
                        "sum_series = ?, sum_modalities = ?, sum_availability = ? WHERE study_uid = ?")
        params = []
        for uid, (insts, series) in self._studies.items():
            if uid in self._edge:
                continue
            c = cq._study_computed(insts, series)
            params.append((uuid.uuid1(), int(c["NumberOfStudyRelatedInstances"]), int(c["NumberOfStudyRelatedSeries"]),
                           c["ModalitiesInStudy"], c["InstanceAvailability"], uid))
        execute_concurrent_with_args(ix._session, stmt, params, concurrency=self.concurrency,
                                     raise_on_first_error=True)
        for uid in self._edge:
            ix._exec(f"UPDATE {ix._t('studies')} SET sum_of = null WHERE study_uid = ?", (uid,))
        ix._refresh(sorted(self._edge))


class Backend:
    """One index under test: open, migrate, close and clean up."""

    name = ""
    concurrency = 1

    def open(self) -> Index:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}

    def bulk_loader(self, index: Index) -> BulkLoader:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SqliteBackend(Backend):
    name = "sqlite"

    def __init__(self, root: Path, concurrency: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sqlite-", dir=root))
        self.path = self.dir / "index.sqlite"
        self.concurrency = concurrency
        self.index: Any = None

    def open(self) -> Index:
        from vna.index.sqlite import SqliteIndex

        self.index = SqliteIndex(self.path)
        self.index.migrate()
        return self.index  # type: ignore[no-any-return]

    def bulk_loader(self, index: Index) -> BulkLoader:
        return SqliteBulk(index)

    def describe(self) -> dict[str, Any]:
        size = sum(p.stat().st_size for p in self.dir.glob("index.sqlite*") if p.is_file())
        return {"path": str(self.path), "file_bytes": size, "sqlite_version": sqlite3.sqlite_version,
                "synchronous": "FULL", "journal_mode": "WAL", "fs": fs_type(self.dir)}

    def close(self) -> None:
        if self.index is not None:
            self.index.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class CassandraBackend(Backend):
    name = "cassandra"

    def __init__(self, root: Path, concurrency: int, endpoint: str | None, start_timeout: float) -> None:
        self.concurrency = concurrency
        self.home: Path | None = None
        self.launcher: ModuleType | None = None
        self.index: Any = None
        self.keyspace = f"vna_bench_{uuid.uuid4().hex[:8]}"
        self.external = endpoint is not None
        if endpoint is not None:
            host, _, port_text = endpoint.rpartition(":")
            self.host, self.port = host or "127.0.0.1", int(port_text)
        else:
            self.launcher = load_cassandra_launcher()
            self.home = Path(tempfile.mkdtemp(prefix="cassandra-", dir=root))
            port = free_port()
            print(f"  starting Cassandra in {self.home} on 127.0.0.1:{port} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            nodes = self.launcher.start(self.home, port=port, storage_port=free_port(), wait=start_timeout)
            self.host, self.port = nodes[0].address, nodes[0].native_port
            self.boot_seconds = time.monotonic() - t0

    def open(self) -> Index:
        from vna.index.cassandra import CassandraIndex

        cfg = CassandraConfig(contact_points=(self.host,), port=self.port, local_dc="dc1",
                              keyspace=self.keyspace, replication='{"dc1": 1}', request_timeout=60.0)
        self.index = CassandraIndex(cfg)
        self.index.migrate()
        return self.index  # type: ignore[no-any-return]

    def bulk_loader(self, index: Index) -> BulkLoader:
        return CassandraBulk(index, self.concurrency)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"endpoint": f"{self.host}:{self.port}", "keyspace": self.keyspace,
                             "started_here": not self.external, "consistency": "LOCAL_QUORUM / LOCAL_SERIAL",
                             "replication": "dc1: 1 (single node)"}
        if self.launcher is not None:
            d["version"] = self.launcher.CASSANDRA_VERSION
            d["heap"] = "1g"
        if self.home is not None:
            d["data_bytes"] = sum(p.stat().st_size for p in self.home.rglob("*") if p.is_file())
            d["fs"] = fs_type(self.home)
        return d

    def close(self) -> None:
        if self.index is not None:
            if self.external:
                try:
                    self.index._session.execute(f"DROP KEYSPACE IF EXISTS {self.keyspace}")
                except Exception as exc:  # noqa: BLE001 - best effort
                    print(f"  ! could not drop keyspace {self.keyspace}: {exc}", file=sys.stderr)
            self.index.close()
        if self.launcher is not None and self.home is not None:
            self.launcher.stop(self.home, log=True)
            shutil.rmtree(self.home, ignore_errors=True)


# --------------------------------------------------------------------------- driver


@dataclass
class Checkpoint:
    """The state of one backend at one size."""

    backend: str
    target: int
    size: int
    studies: int
    reached: bool
    reg_seconds: float  # this increment
    rate: float  # inst/s over this increment
    reg_p50_ms: float
    reg_p99_ms: float
    reg_errors: int
    concurrency: int
    bulk: bool  # this increment was bulk-loaded (--bulk-after): no registration rate of the ingest path
    loadavg: float
    queries: dict[str, QueryStats]
    stats_p50_ms: float = float("nan")  # Index.stats() (Cassandra: the maintained counters)
    recount_ms: float = float("nan")  # Index.recount(): the full scan stats() was before schema v6
    stats_exact: bool = True  # stats() equalled the recount


def time_stats(index: Index, count: int = 9) -> tuple[float, float, bool]:
    """(p50 ms of stats(), ms of one recount, whether they agreed). The recount runs last (it repairs)."""
    lat = []
    for _ in range(count):
        t = time.perf_counter()
        index.stats()
        lat.append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    maintained, recounted = index.recount()
    return percentile(lat, 50), (time.perf_counter() - t) * 1e3, maintained == recounted


def run_backend(backend: Backend, args: argparse.Namespace) -> list[Checkpoint]:
    """Register up to each size, query at each checkpoint; stop early when the time budget is spent."""
    index = backend.open()
    cat = Catalogue(args.seed)
    out: list[Checkpoint] = []
    spent = 0.0
    size = 0
    for target in args.sizes:
        left = args.max_seconds[backend.name] - spent
        if left <= 0:
            break
        print(f"  [{backend.name}] registering {size:,} -> {target:,} (concurrency {backend.concurrency}, "
              f"budget left {left:.0f} s)", file=sys.stderr, flush=True)
        bulk = args.bulk_after is not None and size >= args.bulk_after
        if bulk:
            print(f"  [{backend.name}] BULK LOAD from {size:,} (--bulk-after {args.bulk_after:,}): rows as register() "
                  "leaves them, without its per-instance protocol", file=sys.stderr, flush=True)
            loader = backend.bulk_loader(index)
            try:
                rs = register_until(loader, cat, target, size, loader.concurrency, time.monotonic() + left,
                                    backend.name + " bulk")
            finally:
                loader.close()
        else:
            rs = register_until(index, cat, target, size, backend.concurrency, time.monotonic() + left, backend.name)
        spent += rs.seconds
        size += rs.registered
        if rs.errors >= 100:
            print(f"  ! {backend.name}: too many registration errors; stopping", file=sys.stderr)
        reached = size >= target
        rate = rs.registered / rs.seconds if rs.seconds > 0 else float("nan")
        lat = [x * 1e3 for x in rs.latencies]
        visible = len(cat.studies)  # studies with an instance taken (the stream is study by study)
        print(f"  [{backend.name}] {size:,} instances / {visible:,} studies {'' if reached else '(BUDGET SPENT) '}"
              f"after {rs.seconds:.1f} s: {rate:.0f} inst/s", file=sys.stderr, flush=True)
        queries = run_queries(index, cat.studies[:visible], size, args.seed, args.queries,
                              args.query_seconds, args.warmup)
        if bulk:  # bulk rows bypass register(), hence the counters: count them once (untimed)
            index.recount()
        stats_ms, recount_ms, exact = time_stats(index)
        print(f"  [{backend.name}] stats() p50 {stats_ms:.1f} ms, recount {recount_ms:.0f} ms"
              + ("" if exact else " (MAINTAINED != RECOUNT)"), file=sys.stderr, flush=True)
        out.append(Checkpoint(
            backend=backend.name, target=target, size=size, studies=visible, reached=reached,
            reg_seconds=round(rs.seconds, 2), rate=round(rate, 1),
            reg_p50_ms=round(percentile(lat, 50), 2), reg_p99_ms=round(percentile(lat, 99), 2),
            reg_errors=rs.errors, concurrency=backend.concurrency, bulk=bulk, loadavg=round(os.getloadavg()[0], 2),
            queries=queries, stats_p50_ms=round(stats_ms, 2), recount_ms=round(recount_ms, 1), stats_exact=exact))
        if not reached or rs.errors >= 100:
            break
        remaining = [t for t in args.sizes if t > size]
        if remaining and rate > 0:
            est = ", ".join(f"{t:,} in ~{(t - size) / rate:.0f} s" for t in remaining)
            print(f"  [{backend.name}] at {rate:.0f} inst/s: {est} more (budget left "
                  f"{args.max_seconds[backend.name] - spent:.0f} s)", file=sys.stderr, flush=True)
    return out


def fmt(x: float, width: int = 8, digits: int = 1) -> str:
    return f"{'-':>{width}s}" if x != x else f"{x:{width}.{digits}f}"


def table(results: list[Checkpoint]) -> str:
    """One line per (backend, size, query type); registration figures on the first line of a size."""
    head = (f"{'backend':9s} {'size':>9s} {'studies':>8s} {'reg inst/s':>10s} {'conc':>4s}  {'query':14s} "
            f"{'n':>3s} {'rows':>6s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'ms/row':>7s}")
    lines = [head, "-" * len(head)]
    for cp in results:
        for i, kind in enumerate(QUERY_TYPES):
            q = cp.queries[kind]
            size = f"{cp.size:,}" + ("" if cp.reached else "*")
            rate = f"{cp.rate:.0f}" + ("b" if cp.bulk else "")
            left = (f"{cp.backend:9s} {size:>9s} {cp.studies:8,d} {rate:>10s} {cp.concurrency:4d}" if i == 0
                    else f"{'':9s} {'':>9s} {'':>8s} {'':>10s} {'':>4s}")
            per_row = q.p50 / q.rows_median if q.rows_median == q.rows_median and q.rows_median else float("nan")
            lines.append(f"{left}  {kind:14s} {q.n:3d} {q.rows_median:6g} {fmt(q.p50)} {fmt(q.p95)} "
                         f"{fmt(q.p99)} {fmt(per_row, 7, 2)}"
                         + (f"  MISSES {q.misses}" if q.misses else "") + (f"  ERRORS {q.errors}" if q.errors else ""))
    if any(cp.bulk for cp in results):
        lines.append("b: bulk-loaded increment (--bulk-after): load rate, not the registration rate of Index.register")
    if any(not cp.reached for cp in results):
        lines.append("* time budget (--max-seconds) spent before the target size: measured at the size reached")
    return "\n".join(lines)


def peer_table(results: list[Checkpoint]) -> str:
    """cassandra/sqlite ratios at every size both backends reached exactly."""
    by = {(cp.backend, cp.size): cp for cp in results}
    sizes = sorted({cp.size for cp in results if ("sqlite", cp.size) in by and ("cassandra", cp.size) in by})
    if not sizes:
        return "no size reached by both backends: no peer comparison"
    head = f"{'size':>9s} {'reg rate':>9s}  " + " ".join(f"{k:>14s}" for k in QUERY_TYPES)
    lines = ["cassandra / sqlite (registration: rate ratio; queries: p50 ratio, p95 ratio in parentheses)",
             head, "-" * len(head)]
    for size in sizes:
        c, s = by[("cassandra", size)], by[("sqlite", size)]
        cells = []
        for k in QUERY_TYPES:
            cq, sq = c.queries[k], s.queries[k]
            if cq.n and sq.n and sq.p50 > 0 and sq.p95 > 0:
                cells.append(f"{cq.p50 / sq.p50:6.1f} ({cq.p95 / sq.p95:5.1f})")
            else:
                cells.append(f"{'-':>14s}")
        rr = c.rate / s.rate if s.rate else float("nan")
        lines.append(f"{size:9,d} {rr:9.2f}  " + " ".join(f"{x:>14s}" for x in cells))
        rows_differ = [k for k in QUERY_TYPES if c.queries[k].rows != s.queries[k].rows[:len(c.queries[k].rows)]
                       and s.queries[k].rows != c.queries[k].rows[:len(s.queries[k].rows)]]
        if rows_differ:
            lines.append(f"          ! result sizes differ between backends for: {', '.join(rows_differ)}")
    return "\n".join(lines)


def growth_table(results: list[Checkpoint]) -> str:
    """p50 at each size relative to the smallest size, per backend and query type."""
    lines = ["p50 growth relative to the first checkpoint (size ratio in brackets)"]
    for name in BACKENDS:
        cps = [cp for cp in results if cp.backend == name]
        if len(cps) < 2:
            continue
        base = cps[0]
        for cp in cps[1:]:
            cells = []
            for k in QUERY_TYPES:
                a, b = base.queries[k].p50, cp.queries[k].p50
                cells.append(f"{k}={b / a:.1f}x" if a and a == a and b == b else f"{k}=-")
            lines.append(f"  {name:9s} {base.size:,} -> {cp.size:,} [{cp.size / base.size:.0f}x]: " + " ".join(cells))
    return "\n".join(lines) if len(lines) > 1 else ""


def target_check(results: list[Checkpoint]) -> str:
    """The issue's target: p50 < 20 ms for the selective queries at the largest size reached."""
    lines = []
    for name in BACKENDS:
        cps = [cp for cp in results if cp.backend == name]
        if not cps:
            continue
        cp = cps[-1]
        parts = []
        for k in SELECTIVE:
            q = cp.queries[k]
            ok = q.n and q.p50 < 20.0
            parts.append(f"{k} {q.p50:.1f} ms {'ok' if ok else 'OVER'}")
        note = "" if cp.size >= 1_000_000 else f" (NOT 1M: largest size reached is {cp.size:,})"
        lines.append(f"  {name:9s} at {cp.size:,}{note}: " + "; ".join(parts))
    return "target p50 < 20 ms on the selective queries:\n" + "\n".join(lines)


def stats_table(results: list[Checkpoint]) -> str:
    """Index.stats() (maintained counters on Cassandra) against the full recount (the scan it was before)."""
    head = f"{'backend':9s} {'size':>9s} {'stats p50 ms':>12s} {'recount ms':>11s} {'recount/stats':>13s}  exact"
    lines = ["vna index stats: stats() p50 (ours) vs a full recount (the scan stats() did before schema v6)",
             head, "-" * len(head)]
    for cp in results:
        ratio = cp.recount_ms / cp.stats_p50_ms if cp.stats_p50_ms > 0 else float("nan")
        lines.append(f"{cp.backend:9s} {cp.size:>9,d} {fmt(cp.stats_p50_ms, 12, 2)} {fmt(cp.recount_ms, 11, 0)} "
                     f"{fmt(ratio, 13, 1)}  {'yes' if cp.stats_exact else 'NO'}")
    return "\n".join(lines)


def _budgets(text: str) -> dict[str, float]:
    """``600`` (every backend) or ``sqlite=300,cassandra=900``."""
    if "=" not in text:
        return {name: float(text) for name in BACKENDS}
    out = {name: 900.0 for name in BACKENDS}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in BACKENDS:
            raise argparse.ArgumentTypeError(f"unknown backend {name!r}")
        out[name.strip()] = float(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", type=lambda s: [b.strip() for b in s.split(",") if b.strip()],
                    default=list(BACKENDS), help="comma-separated subset of sqlite,cassandra (run in this order)")
    ap.add_argument("--sizes", type=lambda s: sorted({int(x.replace("_", "")) for x in s.split(",")}),
                    default=[10_000, 100_000, 1_000_000], help="checkpoint sizes in instances")
    ap.add_argument("--queries", type=int, default=50, help="timed queries per type per checkpoint")
    ap.add_argument("--warmup", type=int, default=2, help="untimed queries per type before timing")
    ap.add_argument("--query-seconds", type=float, default=20.0,
                    help="stop a query type after this many seconds of timed queries (n is reported)")
    ap.add_argument("--max-seconds", type=_budgets, default=_budgets("900"), metavar="S|sqlite=S,cassandra=S",
                    help="registration time budget per backend, sum over increments (default 900 s each)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sqlite-concurrency", type=int, default=1,
                    help="registering threads for SQLite (writes serialise on BEGIN IMMEDIATE)")
    ap.add_argument("--cassandra-concurrency", type=int, default=64,
                    help="registering threads for Cassandra (LWT round trips: throughput grows up to ~64)")
    ap.add_argument("--cassandra", default=None, metavar="HOST:PORT",
                    help="use this node (a throwaway keyspace is created and dropped) instead of starting one")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for Cassandra to boot")
    ap.add_argument("--tmp-dir", type=Path, default=None, help="where the SQLite file and Cassandra node go")
    ap.add_argument("--bulk-after", type=lambda s: int(s.replace("_", "")), default=None, metavar="N",
                    help="from N instances on, bulk-load (the rows register() leaves, without its per-instance "
                         "transaction / Paxos protocol) to reach large sizes for the query figures; those "
                         "increments' rates are labelled bulk, not the ingest path's")
    ap.add_argument("--json", type=Path, default=None, help="write every measurement as JSON here")
    args = ap.parse_args(argv)
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad:
        ap.error(f"unknown backends: {bad}")
    if not args.sizes or args.sizes[0] <= 0:
        ap.error("--sizes must be positive integers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)  # so the Cassandra node and temp dirs are cleaned up
    root = Path(tempfile.mkdtemp(prefix="vna-bench-index-", dir=args.tmp_dir))
    results: list[Checkpoint] = []
    backends_info: dict[str, dict[str, Any]] = {}
    t_start = time.monotonic()
    load0 = os.getloadavg()
    print(f"index benchmark: backends {','.join(args.backends)}, sizes {args.sizes}, seed {args.seed}, "
          f"{os.cpu_count()} CPUs, load {load0[0]:.2f}, tmp {root} ({fs_type(root)})", file=sys.stderr, flush=True)
    try:
        for name in args.backends:
            t0 = time.monotonic()
            backend: Backend = (SqliteBackend(root, args.sqlite_concurrency) if name == "sqlite" else
                                CassandraBackend(root, args.cassandra_concurrency, args.cassandra, args.start_timeout))
            try:
                results.extend(run_backend(backend, args))
                backends_info[name] = backend.describe() | {"wall_seconds": round(time.monotonic() - t0, 1)}
                if isinstance(backend, CassandraBackend) and hasattr(backend, "boot_seconds"):
                    backends_info[name]["boot_seconds"] = round(backend.boot_seconds, 1)
            finally:
                backend.close()
    except KeyboardInterrupt:
        print("interrupted: results so far follow", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = time.monotonic() - t_start
    print()
    print(f"STUDY-level C-FIND through Index.find; latency = find() until the last row; seed {args.seed}; "
          f"{os.cpu_count()} CPUs; load avg {load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"{total:.0f} s total")
    for name, info in backends_info.items():
        print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(table(results))
    print()
    print(peer_table(results))
    g = growth_table(results)
    if g:
        print()
        print(g)
    print()
    print(stats_table(results))
    print()
    print(target_check(results))
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "loadavg_start": load0, "loadavg_end": os.getloadavg()},
            "backends": backends_info,
            "checkpoints": [asdict(cp) for cp in results],
            "total_seconds": round(total, 1),
        }, indent=1, default=str) + "\n")
        print(f"\nJSON written to {args.json}")
    sizes_reached = {name: max((cp.size for cp in results if cp.backend == name), default=0) for name in args.backends}
    return 0 if all(sizes_reached.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
