//! Writing an error for the log with every cause it keeps.

use std::error::Error;
use std::fmt;

/// Displays an error and each of its causes, outermost first:
/// "the sqlite store failed: database is locked". Errors keep their cause as a `source`
/// (never folded into their message), so a log line needs this to show the whole story.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(cause) = next {
            write!(f, ": {cause}")?;
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
}
