//! Writing an error for the log with every cause it keeps.

use std::error::Error;
use std::fmt;

/// Displays an error and each of its causes, outermost first:
/// "the sqlite store failed: database is locked". Errors keep their cause as a `source`
/// (never folded into their message), so a log line needs this to show the whole story.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut previous = self.0.to_string();
        f.write_str(&previous)?;
        let mut next = self.0.source();
        while let Some(cause) = next {
            let text = cause.to_string();
            // Some libraries (sqlx among them) write their cause into their own message as
            // well: said once is enough.
            if !previous.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            previous = text;
            next = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn every_cause_is_written_after_the_error() {
        let error = StoreError::backend("sqlite", std::io::Error::other("disk I/O error"));
        assert_eq!(
            Chain(&error).to_string(),
            "the sqlite store failed: disk I/O error"
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error("error communicating with database: {0}")]
    struct SaysItsCause(#[source] std::io::Error);

    #[test]
    fn a_cause_already_in_its_error_is_not_repeated() {
        let cause = SaysItsCause(std::io::Error::other("connection refused"));
        let error = StoreError::backend("postgres", cause);
        assert_eq!(
            Chain(&error).to_string(),
            "the postgres store failed: error communicating with database: connection refused"
        );
    }
}
