-- The same tables, columns and column types as the SQLite schema (text, and BIGINT for counts and
-- Unix-millisecond instants), so that one row mapping (kiln-store's record.rs) serves both.

-- Jobs: the queue and the records are one table. `seq` orders the queue (FIFO; submits take it
-- under one lock, so in commit order); `fencing_token` grows with every claim so that a stale
-- worker's writes no longer match.
CREATE TABLE jobs (
    seq               BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                TEXT    NOT NULL UNIQUE,
    owner             TEXT    NOT NULL,
    route             TEXT    NOT NULL,
    params            TEXT    NOT NULL,
    state             TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    created_at        BIGINT  NOT NULL,
    started_at        BIGINT,
    finished_at       BIGINT,
    expires_at        BIGINT  NOT NULL,
    progress_step     BIGINT,
    progress_total    BIGINT,
    output            TEXT,
    error             TEXT,
    attempts          BIGINT  NOT NULL DEFAULT 0,
    fencing_token     BIGINT  NOT NULL DEFAULT 0,
    worker            TEXT,
    lease_expires_at  BIGINT
);
CREATE INDEX jobs_by_state_seq ON jobs (state, seq);
CREATE INDEX jobs_by_state_owner ON jobs (state, owner);
CREATE INDEX jobs_by_expiry ON jobs (expires_at);

-- The files a job references; capability URLs check this to die with the record.
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
    created_at   BIGINT  NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX idempotency_keys_by_job ON idempotency_keys (job_id);

CREATE TABLE api_keys (
    id          TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    token_hash  TEXT    NOT NULL UNIQUE,
    prefix      TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    revoked_at  BIGINT
);

-- Job events: every submit, state change, re-claim (a new fencing token) and change of progress
-- is announced on the channel `kiln_jobs` by the writing transaction itself, so listeners hear
-- of it only once it commits, whichever node wrote it. The payload is small (well under
-- NOTIFY's 8000 bytes): the job's id, owner, route, state and progress.
CREATE FUNCTION kiln_notify_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kiln_jobs', json_build_object(
        'id', NEW.id, 'owner', NEW.owner, 'route', NEW.route, 'state', NEW.state,
        'step', NEW.progress_step, 'total', NEW.progress_total)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION kiln_notify_job();

-- A heartbeat that only extends the lease is not an event.
CREATE TRIGGER jobs_notify_update AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state
          OR OLD.fencing_token IS DISTINCT FROM NEW.fencing_token
          OR OLD.progress_step IS DISTINCT FROM NEW.progress_step
          OR OLD.progress_total IS DISTINCT FROM NEW.progress_total)
    EXECUTE FUNCTION kiln_notify_job();
