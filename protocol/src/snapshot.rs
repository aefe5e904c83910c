//! The boot snapshot handshake. The task fetch is answered `202` when the worker wants
//! to save the VM; the guest tools then print these lines on the serial console: the
//! first once they hold the park request, the second once the NIC's link went down and
//! nothing of theirs is in flight. The worker saves the VM after the second.

/// Printed once the guest tools took the park request.
pub const PARKING_LINE: &str = "parking for a boot snapshot";
/// Printed once the guest tools hold still; the worker saves the VM on it.
pub const PARKED_LINE: &str = "parked for a boot snapshot";
