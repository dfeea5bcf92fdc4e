-- Live requests (issue 16): where a job's end is announced, the latest preview of a running job,
-- and a forced cancel waiting for the worker's next step boundary.
ALTER TABLE jobs ADD COLUMN webhook_url TEXT;
ALTER TABLE jobs ADD COLUMN preview_key TEXT;
ALTER TABLE jobs ADD COLUMN preview_step BIGINT;
ALTER TABLE jobs ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT false;
-- blob_is_live looks a preview up by its key on every preview download.
CREATE INDEX jobs_by_preview ON jobs (preview_key) WHERE preview_key IS NOT NULL;

-- The webhook outbox: one row per request that ended with a webhook named, written in the
-- transaction of the terminal transition. `due_at` is when the next attempt may start (NULL once
-- delivered or failed); a claim moves it forward by the claim's length and bumps `claim_token`,
-- which recording an attempt must name. `attempts` is the JSON list of attempts so far.
-- Rows die with their job (purge).
CREATE TABLE webhook_deliveries (
    request_id   TEXT    PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    owner        TEXT    NOT NULL,
    url          TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    due_at       BIGINT,
    claim_token  BIGINT  NOT NULL DEFAULT 0,
    attempts     TEXT    NOT NULL DEFAULT '[]',
    created_at   BIGINT  NOT NULL
);
CREATE INDEX webhook_deliveries_by_due ON webhook_deliveries (due_at);

-- A new preview and a forced cancel's request are events too: stream watchers re-read the job.
-- (The payload is unchanged; the event's readers take the preview from the record.)
DROP TRIGGER jobs_notify_update ON jobs;
CREATE TRIGGER jobs_notify_update AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state
          OR OLD.fencing_token IS DISTINCT FROM NEW.fencing_token
          OR OLD.progress_step IS DISTINCT FROM NEW.progress_step
          OR OLD.progress_total IS DISTINCT FROM NEW.progress_total
          OR OLD.preview_key IS DISTINCT FROM NEW.preview_key
          OR OLD.cancel_requested IS DISTINCT FROM NEW.cancel_requested)
    EXECUTE FUNCTION kiln_notify_job();
