//! A fresh PostgreSQL database per test, on the PostgreSQL the machine runs.
//!
//! [`fresh_database`] connects to the admin URL (`KILN_TEST_POSTGRES_URL`, default
//! [`DEFAULT_ADMIN_URL`]), creates a database of its own (`kiln_t_<uuid>`) and returns a
//! [`TestDatabase`] guard whose [`url`](TestDatabase::url) a store connects to. Dropping the guard
//! drops the database `WITH (FORCE)`, which ends whatever sessions the test left open.
//!
//! When PostgreSQL does not answer, a test skips (it prints `SKIPPED: <test>: …` to stderr and
//! gets `None`), except under CI (env `CI` set), where it fails: CI skips nothing. A server that
//! answers but refuses (authentication, permissions) always fails the test.

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};
use std::time::Duration;

/// Where the tests find PostgreSQL unless `KILN_TEST_POSTGRES_URL` says otherwise.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How long a connection attempt may take before PostgreSQL counts as not answering.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin URL the tests use: `KILN_TEST_POSTGRES_URL`, or [`DEFAULT_ADMIN_URL`].
pub fn admin_url() -> String {
    std::env::var("KILN_TEST_POSTGRES_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string())
}

/// A database created for one test, dropped (`WITH (FORCE)`) when this guard is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// The new database's URL (the admin URL with its database name replaced).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name (`kiln_t_<uuid>`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop cannot await, and may run on a Tokio worker thread (where blocking on the
        // test's own runtime would panic): the database is dropped from a thread of its own
        // with a small runtime, and this one waits for it.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("no runtime to drop it with: {e}"))?;
            runtime.block_on(async {
                let mut admin = connect(&admin_url).await?;
                admin
                    .execute(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#).as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = admin.close().await;
                Ok::<(), String>(())
            })
        })
        .join();
        let outcome = match dropped {
            Ok(outcome) => outcome,
            Err(_) => Err("the thread dropping it panicked".to_string()),
        };
        if let Err(why) = outcome {
            // A leftover database is not worth a second panic (this may run while unwinding).
            eprintln!(
                "kiln-testkit: could not drop test database {}: {why}",
                self.name
            );
        }
    }
}

async fn connect(url: &str) -> Result<PgConnection, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(url)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

/// Whether a connection error means nobody answered (as opposed to a server that refused).
fn not_answering(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_)
    )
}

/// A fresh, empty database for the calling test, or `None` (after printing why) when
/// PostgreSQL does not answer and this is not CI. The test's name in the message is the
/// current thread's name, which the test harness sets to it.
pub async fn fresh_database() -> Option<TestDatabase> {
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    fresh_database_for(&test).await
}

/// [`fresh_database`] with the test's name given (for callers off the test's thread).
pub async fn fresh_database_for(test: &str) -> Option<TestDatabase> {
    let admin_url = admin_url();
    let attempt = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(&admin_url)).await;
    let mut admin = match attempt {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) if !not_answering(&e) => panic!(
            "{test}: PostgreSQL at {admin_url} answered but refused the connection: {e} \
             (set KILN_TEST_POSTGRES_URL to an admin URL it accepts)"
        ),
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {CONNECT_TIMEOUT:?}"),
            };
            if std::env::var_os("CI").is_some() {
                panic!(
                    "{test}: PostgreSQL at {admin_url} does not answer ({why}); under CI \
                     nothing is skipped: start it (.ci/run does) or set KILN_TEST_POSTGRES_URL"
                );
            }
            eprintln!("SKIPPED: {test}: PostgreSQL at {admin_url} does not answer ({why})");
            return None;
        }
    };
    let name = format!("kiln_t_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
        .await
        .unwrap_or_else(|e| panic!("{test}: could not create database {name} at {admin_url}: {e}"));
    let _ = admin.close().await;
    let url = with_database(&admin_url, &name);
    Some(TestDatabase {
        admin_url,
        name,
        url,
    })
}

/// `url` naming the database `name` instead of its own (query parameters kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_replaced_and_the_rest_kept() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "kiln_t_1"),
            "postgres://postgres@127.0.0.1:5432/kiln_t_1"
        );
        assert_eq!(
            with_database("postgres://u:p@db:5433", "kiln_t_2"),
            "postgres://u:p@db:5433/kiln_t_2"
        );
        assert_eq!(
            with_database("postgresql://u@h/admin?sslmode=disable", "kiln_t_3"),
            "postgresql://u@h/kiln_t_3?sslmode=disable"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fresh_database_exists_until_its_guard_is_dropped() {
        let Some(db) = fresh_database().await else {
            return;
        };
        let name = db.name().to_string();
        let mut conn = PgConnection::connect(db.url()).await.unwrap();
        let current: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(current, name);
        // Left open on purpose: the drop must end it (WITH (FORCE)).
        drop(db);
        let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert_eq!(left, 0, "the database is dropped with its guard");
        drop(conn);
    }
}
