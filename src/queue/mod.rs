//! The job queue. The embedded backend is SQLite; PostgreSQL (for many hosts sharing
//! one queue) will implement the same operations and pass the same conformance suite
//! (`tests/queue.rs`).

mod model;
mod sqlite;

pub use model::{Claim, ExpiredRun, JobState, JobStatus, NewJob, QueueError};
pub use sqlite::SqliteQueue;
