-- Live requests (issue 16): where a job's end is announced, the latest preview of a running job,
-- and a forced cancel waiting for the worker's next step boundary.
ALTER TABLE jobs ADD COLUMN webhook_url TEXT;
ALTER TABLE jobs ADD COLUMN preview_key TEXT;
ALTER TABLE jobs ADD COLUMN preview_step INTEGER;
ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
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
    due_at       INTEGER,
    claim_token  INTEGER NOT NULL DEFAULT 0,
    attempts     TEXT    NOT NULL DEFAULT '[]',
    created_at   INTEGER NOT NULL
);
CREATE INDEX webhook_deliveries_by_due ON webhook_deliveries (due_at);
