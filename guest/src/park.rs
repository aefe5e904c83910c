//! The guest's half of the boot snapshot handshake (`qemu_worker_protocol::snapshot`).
//! The main thread holds still after the `202`; the agent port's thread answers the
//! host's `PARK` for it and wakes it on `RESUME`. Nothing here touches the console.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not asked to park (or done with it).
    Running,
    /// The main thread got the `202`, closed its connection and waits.
    Holding,
    /// The host sent `RESUME`.
    Resumed,
}

static STAGE: Mutex<Stage> = Mutex::new(Stage::Running);
static CHANGED: Condvar = Condvar::new();

/// How long a `PARK` waits for the main thread to take the `202` it answers: the host
/// sends it as soon as the service wrote the answer, which the guest may not have read.
const TAKE_ANSWER: Duration = Duration::from_secs(10);

fn wait_until(until: impl Fn(Stage) -> bool, limit: Duration) -> Stage {
    let deadline = Instant::now() + limit;
    let mut stage = STAGE.lock().unwrap_or_else(|e| e.into_inner());
    while !until(*stage) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stage = CHANGED
            .wait_timeout(stage, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    *stage
}

fn set(stage: Stage) {
    *STAGE.lock().unwrap_or_else(|e| e.into_inner()) = stage;
    CHANGED.notify_all();
}

/// Main thread, after the `202` (its connection closed): holds still until the host
/// sends `RESUME`, or `limit` passes. Whether `RESUME` came.
pub fn hold(limit: Duration) -> bool {
    set(Stage::Holding);
    let resumed = wait_until(|s| s == Stage::Resumed, limit) == Stage::Resumed;
    set(Stage::Running);
    resumed
}

/// Agent thread, on `PARK`: whether the main thread holds still (after waiting a little
/// for it to take the `202`).
pub fn parked() -> bool {
    wait_until(|s| s == Stage::Holding, TAKE_ANSWER) == Stage::Holding
}

/// Agent thread, on `RESUME`: wakes the main thread; whether it was holding.
pub fn resume() -> bool {
    let mut stage = STAGE.lock().unwrap_or_else(|e| e.into_inner());
    let holding = *stage == Stage::Holding;
    if holding {
        *stage = Stage::Resumed;
        CHANGED.notify_all();
    }
    holding
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the stage is process-wide.
    #[test]
    fn park_then_resume_wakes_the_holder_and_a_stray_resume_is_refused() {
        assert!(!resume(), "nobody holds: RESUME is refused");
        let holder = std::thread::spawn(|| hold(Duration::from_secs(30)));
        assert!(parked(), "PARK waits for the holder");
        assert!(resume());
        assert!(holder.join().expect("the holder"), "the holder saw RESUME");
        assert!(!resume(), "after the hold RESUME is refused again");
        assert!(
            !hold(Duration::from_millis(10)),
            "a hold without RESUME times out"
        );
    }
}
