-- vna SQLite index, schema version 4: patient identity domains (docs/patient-identity.md).
-- A study's Other Patient IDs (encoded by vna.index.query.encode_other_ids), and every
-- identity of every study -- its primary (PatientID, IssuerOfPatientID) and its other
-- ones -- indexed by identity, so a query by PatientID (+ issuer) reads the few studies
-- that carry it. Exactly the studies' current identities (rewritten when they change).
ALTER TABLE studies ADD COLUMN other_patient_ids TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS patient_ids (
    PatientID TEXT NOT NULL,
    IssuerOfPatientID TEXT NOT NULL,
    StudyInstanceUID TEXT NOT NULL,
    PRIMARY KEY (PatientID, IssuerOfPatientID, StudyInstanceUID)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS patient_ids_study ON patient_ids(StudyInstanceUID);
-- a query by IssuerOfPatientID without a PatientID (the primary key leads with PatientID)
CREATE INDEX IF NOT EXISTS patient_ids_issuer ON patient_ids(IssuerOfPatientID, PatientID);
-- the PATIENT-level counts of one (PatientID, IssuerOfPatientID); replaces studies_patient (its prefix)
CREATE INDEX IF NOT EXISTS studies_identity ON studies(PatientID, IssuerOfPatientID);
DROP INDEX IF EXISTS studies_patient;
INSERT OR IGNORE INTO patient_ids SELECT PatientID, IssuerOfPatientID, StudyInstanceUID FROM studies
