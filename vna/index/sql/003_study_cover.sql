-- vna SQLite index, schema version 3: the STUDY-level computed keys (series and
-- instance counts, availability) read a study's instances from one covering
-- index instead of one table row per instance. It replaces instances_study (its prefix).
CREATE INDEX IF NOT EXISTS instances_study_cover ON instances(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, version);
DROP INDEX IF EXISTS instances_study
