//! Artifacts: what a job keeps from its guest. The transports (the guest tools' agent
//! port, qemu-ga as the fallback) feed one `Receiver`, which writes each file under a
//! temporary name, checks it, counts it against the job's `Budget`, and keeps it only
//! when complete (docs/guest-agent.md, docs/security.md). The agent port also carries
//! shells into the guest (`shell`), on the connection the collection uses (`link`).

mod agent_port;
mod budget;
mod collect;
mod link;
mod names;
mod receive;
mod shell;
mod store;

pub use agent_port::{AgentClient, AgentError};
pub use budget::Budget;
pub use collect::{ArtifactSources, Collection, collect_artifacts};
pub use link::{AgentLink, LinkGuard};
pub use receive::{ReceiveError, Received, Receiver};
pub use shell::{
    MAX_SHELLS, MAX_TERMINAL, Shell, ShellEvent, ShellExit, ShellOpener, ShellRequest,
};
