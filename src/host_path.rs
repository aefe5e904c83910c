//! Programs on the worker's `PATH`.

use std::path::PathBuf;

/// The first `PATH` entry holding a file named `program`, as a shell would run it.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_is_found_on_path_and_a_missing_one_is_not() {
        assert!(find_on_path("sh").is_some_and(|p| p.ends_with("sh")));
        assert_eq!(find_on_path("no-such-program-qemu-worker"), None);
    }
}
