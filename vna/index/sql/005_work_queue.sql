-- vna SQLite index, schema version 5: study work queues of the jobs (vna/index/base.py), so the
-- lifecycle job reads the studies that may hold a hot copy at its site, by due time, and the
-- cross-site copy job the studies a site's holdings changed in since it last looked, instead of
-- every study. The primary key is the reading order (queue, due, study): a job reads a range of it.
-- written_at: when the entry was last written (a job removes or moves an entry only if it was not
-- written again after the job read the study).
CREATE TABLE IF NOT EXISTS study_queue (
    queue TEXT NOT NULL,
    due REAL NOT NULL,
    study_uid TEXT NOT NULL,
    written_at REAL NOT NULL,
    PRIMARY KEY (queue, due, study_uid)
) WITHOUT ROWID;
-- existing studies: one entry per (site with a hot copy, study), due at the earliest queue key of its
-- instances (vna_site_of and vna_queue_due are vna.domain.site_of and vna.index.base.queue_due)
INSERT OR IGNORE INTO study_queue (queue, due, study_uid, written_at)
SELECT 'hot:' || vna_site_of(p.store_id), min(vna_queue_due(v.received_at, st.StudyDate)), v.study_uid, 0
FROM placements p JOIN instance_versions v ON v.sop_uid = p.sop_uid AND v.version = p.version
JOIN studies st ON st.StudyInstanceUID = v.study_uid
WHERE p.tier = 'hot' GROUP BY 1, 3;
-- existing studies in the copy log of every site holding a verified copy, due by their first reception
-- (vna_log_due is vna.index.base.log_due)
INSERT OR IGNORE INTO study_queue (queue, due, study_uid, written_at)
SELECT 'held:' || vna_site_of(p.store_id), vna_log_due(min(v.received_at)), v.study_uid, 0
FROM placements p JOIN instance_versions v ON v.sop_uid = p.sop_uid AND v.version = p.version
WHERE p.state = 'OK' GROUP BY 1, 3;
-- how far each job has read a queue (job_cursor)
CREATE TABLE IF NOT EXISTS job_cursors (
    name TEXT PRIMARY KEY,
    due REAL NOT NULL,
    study_uid TEXT NOT NULL,
    queue TEXT NOT NULL
)
