//! qemu-worker: a CI worker engine that runs each job in an isolated QEMU VM.
//!
//! The modules follow the data flow of a job: `config` (worker.yml) and `job`
//! (payload, machine definition, limits, resolution) are validated through `schema`,
//! and `vm` turns a resolved machine into a QEMU command line.

pub mod api;
pub mod artifacts;
pub mod cloud_init;
pub mod config;
pub mod engine;
pub mod error_chain;
pub mod host_path;
pub mod image;
pub mod job;
pub mod metadata;
pub mod qemu;
pub mod queue;
pub mod schema;
pub mod vm;
