-- vna SQLite index, schema version 2: access times and legal holds for the lifecycle manager
ALTER TABLE studies ADD COLUMN last_access REAL;
CREATE TABLE IF NOT EXISTS holds (
    study_uid TEXT PRIMARY KEY,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS placements_study_key ON placements(tier, state);
