//! An in-process S3-compatible server (written next).
