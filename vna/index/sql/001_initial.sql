-- vna SQLite index, schema version 1
CREATE TABLE IF NOT EXISTS studies (
    StudyInstanceUID TEXT PRIMARY KEY,
    PatientID TEXT NOT NULL DEFAULT '',
    PatientName TEXT NOT NULL DEFAULT '',
    IssuerOfPatientID TEXT NOT NULL DEFAULT '',
    PatientBirthDate TEXT NOT NULL DEFAULT '',
    PatientSex TEXT NOT NULL DEFAULT '',
    StudyDate TEXT NOT NULL DEFAULT '',
    StudyTime TEXT NOT NULL DEFAULT '',
    AccessionNumber TEXT NOT NULL DEFAULT '',
    StudyID TEXT NOT NULL DEFAULT '',
    StudyDescription TEXT NOT NULL DEFAULT '',
    ReferringPhysicianName TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_patient ON studies(PatientID);
CREATE INDEX IF NOT EXISTS studies_accession ON studies(AccessionNumber);
CREATE INDEX IF NOT EXISTS studies_date ON studies(StudyDate);
CREATE INDEX IF NOT EXISTS studies_name ON studies(PatientName COLLATE NOCASE);

CREATE TABLE IF NOT EXISTS series (
    SeriesInstanceUID TEXT PRIMARY KEY,
    StudyInstanceUID TEXT NOT NULL,
    Modality TEXT NOT NULL DEFAULT '',
    SeriesNumber TEXT NOT NULL DEFAULT '',
    SeriesDescription TEXT NOT NULL DEFAULT '',
    BodyPartExamined TEXT NOT NULL DEFAULT '',
    SeriesDate TEXT NOT NULL DEFAULT '',
    SeriesTime TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS series_study ON series(StudyInstanceUID, Modality);

CREATE TABLE IF NOT EXISTS instances (
    SOPInstanceUID TEXT PRIMARY KEY,
    SeriesInstanceUID TEXT NOT NULL,
    StudyInstanceUID TEXT NOT NULL,
    version INTEGER NOT NULL,
    SOPClassUID TEXT NOT NULL DEFAULT '',
    InstanceNumber TEXT NOT NULL DEFAULT '',
    ContentDate TEXT NOT NULL DEFAULT '',
    ContentTime TEXT NOT NULL DEFAULT '',
    NumberOfFrames TEXT NOT NULL DEFAULT '',
    Rows TEXT NOT NULL DEFAULT '',
    Columns TEXT NOT NULL DEFAULT '',
    TransferSyntaxUID TEXT NOT NULL DEFAULT '',
    content_sha256 TEXT NOT NULL,
    content_size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    source_ae TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(SeriesInstanceUID);
CREATE INDEX IF NOT EXISTS instances_study ON instances(StudyInstanceUID);

CREATE TABLE IF NOT EXISTS instance_versions (
    sop_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    content_size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    source_ae TEXT NOT NULL DEFAULT '',
    attrs TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (sop_uid, version)
);

CREATE TABLE IF NOT EXISTS placements (
    sop_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    store_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    blob_key TEXT NOT NULL,
    codec TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    content_size INTEGER NOT NULL,
    stored_sha256 TEXT NOT NULL,
    stored_size INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    verified_at REAL,
    "offset" INTEGER,
    length INTEGER,
    PRIMARY KEY (sop_uid, version, store_id)
);
CREATE INDEX IF NOT EXISTS placements_state ON placements(state);
CREATE INDEX IF NOT EXISTS placements_verified ON placements(store_id, verified_at);

CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
);
