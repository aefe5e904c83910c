//! The job lifecycle: one owner drives each job from its payload to its resolution
//! (validate, fetch, machine and limits, network and metadata, start, wait with
//! maxRunTime, collect, resolve, tear down). The CLI and, later, the queue loop drive
//! the same engine.

mod run;
mod serve;

pub use run::{Engine, JobRun};
pub use serve::{Worker, cleanup_orphans};
