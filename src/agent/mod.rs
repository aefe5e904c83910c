//! The host side of the guest agent port (docs/guest-agent.md): the bulk channel over
//! the virtio-serial port `org.qemu-worker.agent.0`, for artifacts.

mod client;

pub use client::{AgentClient, AgentError, FetchedFile, FetchedTree, SkippedEntry};
