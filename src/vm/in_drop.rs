use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs blocking clean-up from a destructor (a VM's resources, a network namespace),
/// which may run on the executor: on a multi-threaded runtime the worker thread hands
/// its other tasks to the rest of the pool while `f` runs; elsewhere (a current-thread
/// runtime, as in tests, or no runtime) `f` just runs.
pub(crate) fn blocking_in_drop<T>(f: impl FnOnce() -> T) -> T {
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
