//! Both ends of every wire between qemu-worker and its guest tools, defined once
//! (STYLE rule 17): the worker and `qemu-worker-guest` import these types and
//! constants, so neither can drift alone.
//!
//! - [`metadata`]: the per-VM metadata service's HTTP API (docs/metadata.md);
//! - [`agent`]: the agent port's name, frames and their JSON (docs/guest-agent.md);
//! - [`snapshot`]: the console lines of the boot snapshot handshake (docs/snapshots.md).

pub mod agent;
pub mod metadata;
pub mod snapshot;
