use std::collections::HashSet;

use super::receive::ReceiveError;
use crate::config::ArtifactStoreConfig;
use crate::job::{ArtifactKind, artifact_name_problem};

/// The names of one artifact's files: each checked against the artifact name rules and
/// the length and depth caps, used once, and never both a file and a folder.
#[derive(Debug)]
pub(super) struct ArtifactNames {
    /// The artifact's name (e.g. `public/logs`).
    label: String,
    kind: ArtifactKind,
    used: HashSet<String>,
    /// Folders above the files received, to tell a name used as both.
    folders: HashSet<String>,
}

impl ArtifactNames {
    pub(super) fn new(label: &str, kind: ArtifactKind) -> Self {
        Self {
            label: label.to_owned(),
            kind,
            used: HashSet::new(),
            folders: HashSet::new(),
        }
    }

    pub(super) fn label(&self) -> &str {
        &self.label
    }

    /// How many names were taken.
    pub(super) fn count(&self) -> u64 {
        self.used.len() as u64
    }

    /// The name checks of a folder's files: the artifact name rules, the length and
    /// depth caps. Returns the stored name (`label/name`).
    pub(super) fn check(
        &self,
        name: &str,
        limits: &ArtifactStoreConfig,
    ) -> Result<String, ReceiveError> {
        let unsafe_name = |problem: String| ReceiveError::UnsafeName {
            name: name.chars().take(256).collect(),
            problem,
        };
        match self.kind {
            ArtifactKind::File if name.is_empty() => return Ok(self.label.clone()),
            ArtifactKind::File => {
                return Err(ReceiveError::Protocol(
                    "a named file in a single-file answer".into(),
                ));
            }
            ArtifactKind::Directory => {}
        }
        if name.len() as u64 > limits.max_name_length {
            return Err(unsafe_name(format!(
                "{} bytes long, over the limit of {} (artifacts.maxNameLength)",
                name.len(),
                limits.max_name_length
            )));
        }
        let depth = name.split('/').count() as u64;
        if depth > limits.max_depth {
            return Err(unsafe_name(format!(
                "{depth} levels deep, over the limit of {} (artifacts.maxDepth)",
                limits.max_depth
            )));
        }
        if let Some(problem) = artifact_name_problem(name) {
            return Err(unsafe_name(problem));
        }
        Ok(format!("{}/{name}", self.label))
    }

    /// Takes the checked `name` (stored as `full`) for a file: refused if it was sent
    /// before, or if it or a folder above it is also used the other way.
    pub(super) fn claim(&mut self, name: &str, full: String) -> Result<String, ReceiveError> {
        if self.used.contains(name) {
            return Err(ReceiveError::Duplicate { name: full });
        }
        let mut ancestors = name.match_indices('/').map(|(at, _)| &name[..at]);
        if self.folders.contains(name) || ancestors.any(|a| self.used.contains(a)) {
            return Err(ReceiveError::FileAndFolder { name: full });
        }
        self.used.insert(name.to_owned());
        for (at, _) in name.match_indices('/') {
            self.folders.insert(name[..at].to_owned());
        }
        Ok(full)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn limits() -> ArtifactStoreConfig {
        ArtifactStoreConfig {
            max_name_length: 12,
            max_depth: 2,
            ..ArtifactStoreConfig::default()
        }
    }

    /// Names a hostile guest sends to escape or confuse the store.
    pub(in crate::artifacts) const HOSTILE_NAMES: [&str; 8] = [
        "../x",
        "/etc/passwd",
        "a/../../x",
        "",
        "a//b",
        ".",
        "a/./b",
        "a\\b",
    ];

    #[test]
    fn hostile_names_are_refused() {
        let names = ArtifactNames::new("dir", ArtifactKind::Directory);
        for bad in HOSTILE_NAMES {
            let error = names.check(bad, &limits()).expect_err(bad);
            assert!(
                matches!(error, ReceiveError::UnsafeName { .. }),
                "{bad:?}: {error}"
            );
        }
        let long = names
            .check("abcdefghijklm", &limits())
            .expect_err("13 bytes");
        assert!(
            long.to_string().contains("artifacts.maxNameLength"),
            "{long}"
        );
        let deep = names.check("a/b/c", &limits()).expect_err("depth 3");
        assert!(deep.to_string().contains("artifacts.maxDepth"), "{deep}");
        assert_eq!(names.check("a/b", &limits()).expect("fine"), "dir/a/b");
    }

    #[test]
    fn a_name_is_sent_once_as_a_file_or_a_folder() {
        let mut names = ArtifactNames::new("d", ArtifactKind::Directory);
        names.claim("a", "d/a".into()).expect("a file");
        let twice = names.claim("a", "d/a".into()).expect_err("twice");
        assert!(matches!(twice, ReceiveError::Duplicate { .. }), "{twice}");
        let under = names
            .claim("a/b", "d/a/b".into())
            .expect_err("a as a folder");
        assert!(
            matches!(under, ReceiveError::FileAndFolder { .. }),
            "{under}"
        );
        names.claim("x/y", "d/x/y".into()).expect("x as a folder");
        let over = names.claim("x", "d/x".into()).expect_err("x as a file");
        assert!(matches!(over, ReceiveError::FileAndFolder { .. }), "{over}");
        assert_eq!(names.count(), 2);
    }
}
