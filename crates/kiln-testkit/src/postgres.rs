//! A fresh PostgreSQL database per test (written next).
