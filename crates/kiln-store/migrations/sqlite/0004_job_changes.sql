-- Job changes as a log, so that other processes on the same file hear them (a `kiln worker`
-- beside a `kiln serve --workers 0`): each process's connections add their writes here through
-- TEMP triggers naming the writing store (see src/sqlite/changes.rs), and each store reads the
-- others' rows back as events. Pruned to the last few thousand rows.
CREATE TABLE job_changes (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    writer          TEXT    NOT NULL,
    id              TEXT    NOT NULL,
    owner           TEXT    NOT NULL,
    route           TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    progress_step   INTEGER,
    progress_total  INTEGER
);
