//! How a command ends: its exit status, and the error it prints.

use std::io::Write;

/// Exit status for bad usage and malformed payloads (DESIGN §4).
pub(super) const EXIT_USAGE: u8 = 2;
/// Exit status for every other failure of the worker itself.
pub(super) const EXIT_OTHER: u8 = 3;

/// An error with the exit status it maps to.
pub(super) struct Failure {
    pub(super) error: anyhow::Error,
    pub(super) exit_code: u8,
}

impl Failure {
    pub(super) fn new(exit_code: u8, error: anyhow::Error) -> Self {
        Self { error, exit_code }
    }
}

pub(super) trait ExitWith<T> {
    fn exit_with(self, exit_code: u8) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> ExitWith<T> for Result<T, E> {
    fn exit_with(self, exit_code: u8) -> Result<T, Failure> {
        self.map_err(|e| Failure {
            error: e.into(),
            exit_code,
        })
    }
}

/// Writes `text` to standard output.
pub(super) fn print(text: &str) -> Result<(), Failure> {
    std::io::stdout()
        .write_all(text.as_bytes())
        .exit_with(EXIT_OTHER)
}
