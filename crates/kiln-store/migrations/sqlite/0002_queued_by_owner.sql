-- Each submit batch counts the submitting keys' waiting jobs (limits.max_queued_per_key): with
-- the owner in an index beside the state, that count reads the index alone instead of every
-- queued job's row.
CREATE INDEX jobs_by_state_owner ON jobs (state, owner);
