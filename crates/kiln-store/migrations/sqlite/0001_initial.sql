-- Jobs: the queue and the records are one table. `seq` orders the queue (FIFO);
-- `fencing_token` grows with every claim so that a stale worker's writes no longer match.
-- Instants are Unix milliseconds.
CREATE TABLE jobs (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT    NOT NULL UNIQUE,
    owner             TEXT    NOT NULL,
    route             TEXT    NOT NULL,
    params            TEXT    NOT NULL,
    state             TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    finished_at       INTEGER,
    expires_at        INTEGER NOT NULL,
    progress_step     INTEGER,
    progress_total    INTEGER,
    output            TEXT,
    error             TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    fencing_token     INTEGER NOT NULL DEFAULT 0,
    worker            TEXT,
    lease_expires_at  INTEGER
);
CREATE INDEX jobs_by_state_seq ON jobs (state, seq);
CREATE INDEX jobs_by_expiry ON jobs (expires_at);

-- The files a finished job references; capability URLs check this to die with the record.
CREATE TABLE job_blobs (
    blob_key  TEXT PRIMARY KEY,
    job_id    TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE
);
CREATE INDEX job_blobs_by_job ON job_blobs (job_id);

-- A client's Idempotency-Key, scoped to its token.
CREATE TABLE idempotency_keys (
    owner        TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    fingerprint  TEXT    NOT NULL,
    job_id       TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (owner, key)
);

CREATE TABLE api_keys (
    id          TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    token_hash  TEXT    NOT NULL UNIQUE,
    prefix      TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
