//! The CLI edge (the only place that uses anyhow): the clap model, one file per group
//! of commands (one job, the queue, images, VMs, serve), and how a command exits.

mod dispatch;
mod exit;
mod image;
mod job;
mod model;
mod notify;
mod queue;
mod remote;
mod serve;
mod shell;
mod vm;

pub(crate) use dispatch::main;
