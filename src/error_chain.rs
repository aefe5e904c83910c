//! An error with its causes, printed once and whole (nextest's `DisplayErrorChain`):
//! every module's error says only its own part and keeps the cause in `#[source]`; the
//! place that shows it to a person prints the chain.

use std::error::Error;
use std::fmt;

/// Displays `error: cause: cause's cause …`.
#[derive(Debug, Clone, Copy)]
pub struct DisplayChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// The chain as a string (for messages built across an `.await`).
pub fn display_chain(error: &(dyn Error + 'static)) -> String {
    DisplayChain(error).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot write public/big.bin")]
    struct Write(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause_once() {
        let error = Write(std::io::Error::from_raw_os_error(28));
        assert_eq!(
            DisplayChain(&error).to_string(),
            "cannot write public/big.bin: No space left on device (os error 28)"
        );
    }
}
