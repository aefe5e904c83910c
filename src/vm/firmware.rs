//! UEFI firmware (machine `firmware: uefi`): OVMF's code, mapped read-only from the host
//! into every UEFI VM, and a variable store of the VM's own in its run dir, copied from
//! OVMF's template when the VM boots and from its boot snapshot's store when it resumes
//! one. QEMU writes the guest's variable changes (boot entries, `BootNext`) through to
//! that file, so they never reach another VM, and they go with the run dir.

use std::path::{Path, PathBuf};

use super::run_dir::RunDir;
use crate::config::FirmwareConfig;

/// Why a UEFI VM's firmware cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error(
        "the UEFI firmware file {} does not exist: install Debian's `ovmf` package \
         (apt-get install ovmf), or set worker.yml `firmware.{key}` to where OVMF is",
        path.display()
    )]
    Missing { path: PathBuf, key: &'static str },
    #[error("cannot copy the UEFI variable store {} into the run directory", from.display())]
    Copy {
        from: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks that OVMF's code is where worker.yml says, before anything is started from it
/// (a boot snapshot of a UEFI machine needs it as much as a boot).
pub(crate) fn check_code(firmware: &FirmwareConfig) -> Result<(), FirmwareError> {
    if firmware.ovmf_code.is_file() {
        Ok(())
    } else {
        Err(FirmwareError::Missing {
            path: firmware.ovmf_code.clone(),
            key: "ovmfCode",
        })
    }
}

/// Gives a booting VM a fresh variable store: a copy of OVMF's template.
pub(crate) async fn install_template_vars(
    firmware: &FirmwareConfig,
    run_dir: &RunDir,
) -> Result<(), FirmwareError> {
    copy_vars(&firmware.ovmf_vars, run_dir)
        .await
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => FirmwareError::Missing {
                path: firmware.ovmf_vars.clone(),
                key: "ovmfVars",
            },
            _ => FirmwareError::Copy {
                from: firmware.ovmf_vars.clone(),
                source,
            },
        })
}

/// Copies `from` into the run dir as the VM's variable store, replacing one a failed
/// resume left. The copy is the VM's alone to write, whatever the template's mode.
pub(crate) async fn copy_vars(from: &Path, run_dir: &RunDir) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let to = PathBuf::from(run_dir.uefi_vars());
    match tokio::fs::remove_file(&to).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    tokio::fs::copy(from, &to).await?;
    tokio::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn firmware(dir: &Path) -> FirmwareConfig {
        FirmwareConfig {
            ovmf_code: dir.join("CODE.fd"),
            ovmf_vars: dir.join("VARS.fd"),
        }
    }

    #[tokio::test]
    async fn a_missing_ovmf_file_names_its_path_key_and_package() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run_dir = RunDir::new(&dir.path().join("run")).expect("run dir");
        std::fs::create_dir(run_dir.path()).expect("run dir");
        let firmware = firmware(dir.path());
        let missing = check_code(&firmware).expect_err("no code");
        assert_eq!(
            missing.to_string(),
            format!(
                "the UEFI firmware file {} does not exist: install Debian's `ovmf` package \
                 (apt-get install ovmf), or set worker.yml `firmware.ovmfCode` to where OVMF is",
                firmware.ovmf_code.display()
            )
        );
        let missing = install_template_vars(&firmware, &run_dir)
            .await
            .expect_err("no template");
        assert!(
            matches!(&missing, FirmwareError::Missing { key: "ovmfVars", path } if *path == firmware.ovmf_vars),
            "{missing:?}"
        );
        assert!(!Path::new(&run_dir.uefi_vars()).exists());
    }

    #[tokio::test]
    async fn each_vm_gets_a_writable_copy_of_a_read_only_template() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let run_dir = RunDir::new(&dir.path().join("run")).expect("run dir");
        std::fs::create_dir(run_dir.path()).expect("run dir");
        let firmware = firmware(dir.path());
        std::fs::write(&firmware.ovmf_code, b"code").expect("code");
        std::fs::write(&firmware.ovmf_vars, b"template").expect("vars");
        std::fs::set_permissions(&firmware.ovmf_vars, std::fs::Permissions::from_mode(0o444))
            .expect("chmod");
        check_code(&firmware).expect("code is there");
        // A store left by a resume that failed is replaced.
        std::fs::write(run_dir.uefi_vars(), b"left over").expect("left over");
        install_template_vars(&firmware, &run_dir)
            .await
            .expect("copied");
        assert_eq!(
            std::fs::read(run_dir.uefi_vars()).expect("copy"),
            b"template"
        );
        let mode = std::fs::metadata(run_dir.uefi_vars())
            .expect("copy")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
