//! Events between processes on one SQLite file.
//!
//! A store's own writes are published in-process the moment they commit. Another process on the
//! same file (a `kiln worker` beside a `kiln serve --workers 0`) cannot reach those subscribers,
//! so every writing connection also logs its changes of a job's state, progress, preview or
//! pending cancel into `job_changes`, through TEMP triggers (they fire for that connection's
//! writes only) that name the writing store. One task per store reads the rows other stores
//! wrote since its last look, a few times a second, and publishes them as events: one indexed
//! range read per tick whatever the number of subscribers, an empty one when nothing changed.

use crate::common::{event_key, Events};
use kiln_core::job::{JobState, Progress};
use kiln_core::report::Chain;
use kiln_core::store::JobNotice;
use sqlx::{Executor, SqliteConnection, SqlitePool};
use std::sync::Weak;
use std::time::Duration;

/// How often the log is read: other processes' changes reach subscribers within this.
const TICK: Duration = Duration::from_millis(100);
/// Rows kept: far more than a tick's worth; a reader that fell further behind resyncs.
const KEPT: i64 = 10_000;
/// How many ticks between prunes.
const PRUNE_EVERY: u32 = 600;

/// The TEMP triggers that log `writer`'s changes (run on each of its writing connections).
pub(crate) async fn install_triggers(
    conn: &mut SqliteConnection,
    writer: &str,
) -> Result<(), sqlx::Error> {
    // `writer` is a UUID made by this process: safe to write into the statement.
    let log = |new_row: &str| {
        format!(
            "INSERT INTO job_changes (writer, id, owner, route, state, progress_step, progress_total) \
             VALUES ('{writer}', {new_row}.id, {new_row}.owner, {new_row}.route, {new_row}.state, \
             {new_row}.progress_step, {new_row}.progress_total);"
        )
    };
    let statements = format!(
        "CREATE TEMP TRIGGER IF NOT EXISTS kiln_log_insert AFTER INSERT ON main.jobs BEGIN {} END;
         CREATE TEMP TRIGGER IF NOT EXISTS kiln_log_update AFTER UPDATE ON main.jobs
           WHEN OLD.state IS NOT NEW.state OR OLD.progress_step IS NOT NEW.progress_step
             OR OLD.preview_key IS NOT NEW.preview_key OR OLD.cancel_requested IS NOT NEW.cancel_requested
           BEGIN {} END;",
        log("NEW"),
        log("NEW")
    );
    conn.execute(statements.as_str()).await?;
    Ok(())
}

type ChangeRow = (
    i64,
    String,
    String,
    String,
    String,
    Option<i64>,
    Option<i64>,
);

/// Publishes other stores' changes until `alive` is gone (the store was dropped).
pub(crate) async fn follow_others(
    pool: SqlitePool,
    writer: String,
    events: Events,
    alive: Weak<()>,
) {
    let mut last: i64 = match sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM job_changes")
        .fetch_one(&pool)
        .await
    {
        Ok(seq) => seq,
        Err(e) => {
            return tracing::warn!(error = %Chain(&e), "cannot read job_changes; other processes' events will not be heard")
        }
    };
    let mut ticks = 0u32;
    while alive.strong_count() > 0 {
        tokio::time::sleep(TICK).await;
        match read_since(&pool, &writer, last).await {
            Ok((rows, newest)) => {
                if newest - last > KEPT {
                    events.send(JobNotice::Resync);
                }
                for row in rows {
                    publish(&events, row);
                }
                last = last.max(newest);
            }
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "reading other processes' job changes failed; resyncing");
                events.send(JobNotice::Resync);
            }
        }
        ticks += 1;
        if ticks.is_multiple_of(PRUNE_EVERY) {
            let pruned = sqlx::query(
                "DELETE FROM job_changes WHERE seq <= (SELECT MAX(seq) FROM job_changes) - ?1",
            )
            .bind(KEPT)
            .execute(&pool)
            .await;
            if let Err(e) = pruned {
                tracing::warn!(error = %Chain(&e), "could not prune job_changes");
            }
        }
    }
}

/// The rows other writers added after `after`, and the newest seq seen (of any writer).
async fn read_since(
    pool: &SqlitePool,
    writer: &str,
    after: i64,
) -> Result<(Vec<ChangeRow>, i64), sqlx::Error> {
    let newest: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM job_changes")
        .fetch_one(pool)
        .await?;
    if newest <= after {
        return Ok((Vec::new(), after));
    }
    let rows = sqlx::query_as(
        "SELECT seq, id, owner, route, state, progress_step, progress_total FROM job_changes \
         WHERE seq > ?1 AND seq <= ?2 AND writer <> ?3 ORDER BY seq",
    )
    .bind(after)
    .bind(newest)
    .bind(writer)
    .fetch_all(pool)
    .await?;
    Ok((rows, newest))
}

fn publish(events: &Events, (_, id, owner, route, state, step, total): ChangeRow) {
    let (Ok(key), Some(state)) = (event_key(&(id, owner, route)), JobState::parse(&state)) else {
        // A row this version cannot read: whoever follows the job reads it again.
        return events.send(JobNotice::Resync);
    };
    let progress = match (step, total) {
        (Some(step), Some(total)) => Some(Progress {
            step: step as u32,
            total: total as u32,
        }),
        _ => None,
    };
    events.changed(key, state, progress);
}
