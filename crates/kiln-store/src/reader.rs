//! The hot reads: one job's status, as every status poll asks for it, and its whole view, read
//! synchronously on the calling thread.
//!
//! sqlx runs each SQLite connection on a thread of its own, so every query is two thread
//! hand-offs on top of a point lookup that takes microseconds; for status polls those hand-offs
//! were most of the cost of the request. These connections are read-only and used inline: WAL
//! readers never wait for the writer, and a query that would wait (a checkpoint's rare lock)
//! gives up at once with `Busy`, and the caller takes the ordinary sqlx path instead, so no
//! async thread is ever held for long.

use crate::record::{JobRow, JobViewRow, StatusRow};
use kiln_core::store::StoreError;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A few read-only connections; a caller takes whichever is free.
pub(crate) struct Readers {
    connections: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

/// Why an inline read did not answer.
pub(crate) enum ReadError {
    /// The database was locked for a moment: ask through the pool instead.
    Busy,
    Failed(StoreError),
}

impl Readers {
    pub(crate) fn open(path: &Path, count: usize) -> Result<Self, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connections = (0..count.max(1))
            .map(|_| {
                let conn = Connection::open_with_flags(path, flags).map_err(failed)?;
                // Never wait: a locked database sends the caller to the pool.
                conn.busy_timeout(Duration::ZERO).map_err(failed)?;
                Ok(Mutex::new(conn))
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Self {
            connections,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `sql` with `params` on a free connection and maps its one row, if any, with `map`
    /// ([`job_view`] or [`status`]).
    pub(crate) fn one_row<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        map: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>, ReadError> {
        let conn = self.take();
        let mut statement = conn.prepare_cached(sql).map_err(classify)?;
        statement
            .query_row(params, map)
            .optional()
            .map_err(classify)
    }

    /// The first connection nobody holds, else the next in turn.
    fn take(&self) -> std::sync::MutexGuard<'_, Connection> {
        for conn in &self.connections {
            if let Ok(guard) = conn.try_lock() {
                return guard;
            }
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        self.connections[i]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A job row's columns ([`crate::record::JOB_COLUMNS`]) followed by its queue position.
pub(crate) fn job_view(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobViewRow> {
    Ok(JobViewRow {
        job: job_row(row)?,
        queue_position: row.get(19)?,
    })
}

/// The columns of [`crate::record::STATUS_COLUMNS`] followed by the queue position.
pub(crate) fn status(row: &rusqlite::Row<'_>) -> rusqlite::Result<StatusRow> {
    Ok(StatusRow {
        id: row.get(0)?,
        state: row.get(1)?,
        expires_at: row.get(2)?,
        progress_step: row.get(3)?,
        progress_total: row.get(4)?,
        preview_key: row.get(5)?,
        preview_step: row.get(6)?,
        queue_position: row.get(7)?,
    })
}

/// The columns of [`crate::record::JOB_COLUMNS`], in order.
fn job_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: row.get(0)?,
        owner: row.get(1)?,
        route: row.get(2)?,
        params: row.get(3)?,
        state: row.get(4)?,
        created_at: row.get(5)?,
        started_at: row.get(6)?,
        finished_at: row.get(7)?,
        expires_at: row.get(8)?,
        progress_step: row.get(9)?,
        progress_total: row.get(10)?,
        output: row.get(11)?,
        error: row.get(12)?,
        attempts: row.get(13)?,
        fencing_token: row.get(14)?,
        webhook_url: row.get(15)?,
        preview_key: row.get(16)?,
        preview_step: row.get(17)?,
        cancel_requested: row.get(18)?,
    })
}

fn failed(e: rusqlite::Error) -> StoreError {
    StoreError::backend("sqlite", e)
}

fn classify(e: rusqlite::Error) -> ReadError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            ReadError::Busy
        }
        _ => ReadError::Failed(failed(e)),
    }
}
