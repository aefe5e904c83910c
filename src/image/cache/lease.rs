use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::actor::Msg;
use crate::image::contents::ImageContents;
use crate::image::disk::{BootDisk, DiskFormat, KernelFiles};
use crate::image::qemu_img::{self, QemuImgError};

/// A cached image held for one job; the image cannot be evicted while a lease lives.
#[derive(Debug)]
pub struct ImageLease {
    sha256: String,
    contents: Arc<ImageContents>,
    release: mpsc::UnboundedSender<Msg>,
}

impl ImageLease {
    /// A lease on a pinned image; dropping it sends the matching release to `release`.
    pub(super) fn new(
        sha256: String,
        contents: Arc<ImageContents>,
        release: mpsc::UnboundedSender<Msg>,
    ) -> Self {
        Self {
            sha256,
            contents,
            release,
        }
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn contents(&self) -> &ImageContents {
        &self.contents
    }

    /// Where the image's boot snapshots live (`<cache>/snapshots/<sha256>`); the cache
    /// removes them with the image.
    pub fn snapshot_dir(&self) -> PathBuf {
        let objects = self.contents.dir.parent().unwrap_or(&self.contents.dir);
        objects
            .parent()
            .unwrap_or(objects)
            .join("snapshots")
            .join(&self.sha256)
    }

    /// The files for direct kernel boot, when the image has a kernel.
    pub fn kernel_files(&self) -> Option<KernelFiles> {
        self.contents.kernel_files()
    }

    /// The boot chain with the job's overlay at `overlay` on top, without creating the
    /// overlay (what a boot snapshot's key is computed from).
    pub fn boot_chain(&self, overlay: &Path) -> BootDisk {
        BootDisk::stacked(self.contents.base_layers(), &[overlay])
    }

    /// Creates the job's writable qcow2 overlay at `path` over the cached base and
    /// returns the whole chain for QEMU. Its cost does not depend on the image size.
    pub async fn create_overlay(&self, path: &Path) -> Result<BootDisk, QemuImgError> {
        let base = self.contents.base_layers();
        let top = base
            .last()
            .unwrap_or_else(|| unreachable!("an image always has a boot disk"));
        qemu_img::create_overlay(path, Path::new(&top.path), top.format).await?;
        Ok(BootDisk::stacked(base, &[path]))
    }

    /// Creates the job's writable overlay at `path` over a boot snapshot's saved disk
    /// (a qcow2 overlay of this image's base) and returns the resume chain for QEMU:
    /// the base, the saved disk, the job's overlay.
    pub async fn create_resume_overlay(
        &self,
        path: &Path,
        saved_disk: &Path,
    ) -> Result<BootDisk, QemuImgError> {
        qemu_img::create_overlay(path, saved_disk, DiskFormat::Qcow2).await?;
        Ok(BootDisk::stacked(
            self.contents.base_layers(),
            &[saved_disk, path],
        ))
    }
}

impl Drop for ImageLease {
    fn drop(&mut self) {
        let _ = self.release.send(Msg::Release {
            sha256: self.sha256.clone(),
        });
    }
}
