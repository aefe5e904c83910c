//! The boot snapshot handshake. It rides on channels the worker owns, never on console
//! text, so it works whatever an image's init does with the guest tools' output:
//!
//! 1. the guest tools ask for the task with [`crate::metadata::PARK_QUERY`]; a worker that
//!    wants a snapshot answers `202` and closes the connection;
//! 2. the worker sends [`crate::agent::PARK`] on the agent port; the tools echo it once
//!    they hold no connection and nothing of theirs is in flight (or refuse);
//! 3. the worker stops the VM, saves it, lets it go on, and sends
//!    [`crate::agent::RESUME`] on the agent port, as it does in every VM later resumed
//!    from the snapshot; the tools echo it and ask for the task again.

use std::time::Duration;

/// How long the guest tools hold still for a `RESUME` before they ask for the task
/// anyway (a worker that gave up on the save, or lost the agent port). Longer than the
/// worker's own limits on a save (its migration timeout).
pub const HOLD_LIMIT: Duration = Duration::from_secs(180);
