//! Artifacts: what a job keeps from its guest. The transports (the guest tools' agent
//! port, qemu-ga as the fallback) feed one `Receiver`, which writes each file under a
//! temporary name, checks it, counts it against the job's `Budget`, and keeps it only
//! when complete (docs/guest-agent.md, docs/security.md).

mod agent_port;
mod budget;
mod collect;
mod names;
mod receive;
mod store;

pub use agent_port::{AgentClient, AgentError};
pub use budget::Budget;
pub use collect::{ArtifactSources, Collection, collect_artifacts};
pub use receive::{ReceiveError, Received, Receiver};
