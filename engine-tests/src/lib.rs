//! Harness for the engine conformance suite (`engine-tests/tests/`): real guests from the
//! test image, driven through the public engine API and CLI. The cases arrive with the
//! job lifecycle; this crate holds the helpers they share.

use std::time::{Duration, Instant};

/// A condition that did not become true in time.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {waited:?} waiting for {what}")]
pub struct WaitTimeout {
    pub what: String,
    pub waited: Duration,
}

/// Polls `check` every `interval` until it returns `Some`, or fails after `timeout`
/// naming `what` was awaited. Tests never sleep for a fixed time: they wait for a state.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, WaitTimeout> {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if start.elapsed() >= timeout {
            return Err(WaitTimeout {
                what: what.to_owned(),
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_the_first_value() {
        let mut calls = 0;
        let value = wait_until("third call", Duration::from_secs(5), Duration::ZERO, || {
            calls += 1;
            (calls == 3).then_some(calls)
        })
        .expect("reached");
        assert_eq!(value, 3);
    }

    #[test]
    fn wait_until_names_what_timed_out() {
        let err = wait_until(
            "a state that never comes",
            Duration::from_millis(30),
            Duration::from_millis(5),
            || None::<()>,
        )
        .expect_err("times out");
        assert!(
            err.to_string().contains("a state that never comes"),
            "{err}"
        );
        assert!(err.waited >= Duration::from_millis(30));
    }
}
