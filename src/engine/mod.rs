//! The job lifecycle as named phases over one `JobContext` (DESIGN §1, STYLE rule 16):
//! *prepare* (validate, accelerator, image, machine and limits), *boot or resume* (the
//! network, the metadata service, QEMU; a boot snapshot that does not load falls back
//! to booting), *await task* and *await result* (maxRunTime, cancel), *collect*
//! (artifacts, screenshot), *tear down*; then `resolve`, a pure function of what
//! happened, writes the report. The CLI and the queue loop drive the same engine.

mod bare;
mod boot;
mod collect;
mod context;
mod error;
mod keep;
mod live;
mod prepare;
mod resolve;
mod run;
mod serve;
mod teardown;
mod wait;

pub use bare::BareVm;
pub use error::JobError;
pub use keep::{KeptVm, Released};
pub use live::LiveVms;
pub use run::{Engine, JobRun};
pub use serve::{Worker, cleanup_orphans};
