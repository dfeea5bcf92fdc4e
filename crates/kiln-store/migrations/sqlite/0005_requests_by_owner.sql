-- GET /v1/requests lists one key's jobs newest first, a page at a time after a cursor (a job's
-- seq): with the owner and seq in one index, a page is a backwards range scan of it from the
-- cursor, however many jobs other keys have.
CREATE INDEX jobs_by_owner_seq ON jobs (owner, seq);
