//! `qemu-worker image build RECIPE OUT.tar.zst` (docs/image-recipes.md): a base (a
//! Debian root tree from mmdebstrap with the recipe's `copy` and `run` steps applied,
//! made into a kernel-boot image; or an existing image), then the recipe's `boot` steps,
//! each a job on the worker's own engine whose disk becomes the image's, then the output
//! boot mode (a UEFI disk is laid out from a kernel-boot image), packed as `image pack`
//! packs. Disks are made without loop devices or mounts. Reproducible where its inputs
//! are: every time stamp is fixed, and so are the file systems' and GPT's identifiers.

mod assemble;
mod boot;
mod recipe;
mod root;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use boot::BuildWorker;
pub use recipe::{
    Base, BaseKind, BootMode, BootStep, CheckedRecipe, CopyStep, DebianBase, Output, Package,
    Recipe, Step, StepKind, Variant, check_recipe,
};

use super::contents::ImageContents;
use super::pack::{PackError, pack_image};
use crate::job::{Firmware, MachineDefinition};

/// Why a build failed; nothing is left at the output path.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{program} is missing: install it with `apt-get install {package}`")]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    #[error("{what} failed ({status}){}", tail(.output))]
    Command {
        what: String,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("{what}: {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the image tree has {found} where it must have exactly one {what}")]
    BootFiles { what: &'static str, found: String },
    #[error(
        "{} is not one ext4 file system: a UEFI disk is laid out from a kernel-boot image, \
         whose disk is its root file system",
        path.display()
    )]
    NotRootFs { path: PathBuf },
    #[error(
        "the kernel, initramfs and boot loader take {bytes} bytes; the EFI system partition holds {room}"
    )]
    EspFull { bytes: u64, room: u64 },
    #[error("output.boot `{wanted}` cannot be made from this base: {why}")]
    Shape {
        wanted: &'static str,
        why: &'static str,
    },
    #[error("the base image's location `{location}` is not usable")]
    BaseLocation {
        location: String,
        #[source]
        source: crate::job::ImageLocationError,
    },
    #[error("the base image is not available")]
    Base(#[source] super::ImageError),
    #[error("the image cache for the build cannot be opened")]
    Cache(#[source] super::CacheError),
    #[error("boot step {step} ({script}): {outcome}{}", tail(.log))]
    BootStep {
        step: usize,
        script: String,
        outcome: String,
        log: String,
    },
    #[error("the build was stopped ({0})")]
    Stopped(crate::job::ExceptionReason),
    #[error("packing the image")]
    Pack(#[source] PackError),
}

fn tail(output: &str) -> String {
    let lines: Vec<&str> = output.lines().rev().take(15).collect();
    if lines.is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = lines.into_iter().rev().collect();
    format!(":\n{}", lines.join("\n"))
}

/// The base stage of a Debian base alone (mmdebstrap and its clean-up) into `tree`:
/// the baseline `bench/run` measures `image build` against.
pub fn debian_tree(base: &DebianBase, tree: &Path) -> Result<(), BuildError> {
    root::debian(base, tree)
}

/// Progress lines (a TTY shows them; the CLI decides).
pub type Report = Arc<dyn Fn(&str) + Send + Sync>;

/// Runs blocking build work (child processes, file I/O) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, BuildError> + Send + 'static,
) -> Result<T, BuildError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Builds the image `checked` describes into `out`. Everything is made in a scratch
/// directory beside `out` (removed whatever happens), and `out` appears only once the
/// image is packed and checked.
pub async fn build_image(
    checked: &CheckedRecipe,
    out: &Path,
    worker: &BuildWorker,
    report: Report,
) -> Result<ImageContents, BuildError> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let work = tempfile::Builder::new()
        .prefix(".image-build.")
        .tempdir_in(parent)
        .map_err(|source| BuildError::Io {
            what: "cannot make a scratch directory beside the output",
            path: parent.to_path_buf(),
            source,
        })?;
    let work_dir = std::path::absolute(work.path()).map_err(|source| BuildError::Io {
        what: "cannot resolve",
        path: work.path().to_path_buf(),
        source,
    })?;
    let recipe = &checked.recipe;
    let output = &recipe.output;
    let boots: Vec<(usize, &BootStep)> = recipe
        .steps
        .iter()
        .enumerate()
        .filter_map(|(n, step)| match step.kind() {
            StepKind::Boot(boot) => Some((n, boot)),
            _ => None,
        })
        .collect();
    // The worker's engine is needed for an image base and for boot steps only.
    let engine = match (recipe.base.kind(), boots.is_empty()) {
        (BaseKind::Debian(_), true) => None,
        _ => Some(worker.engine(&work_dir, checked).await?),
    };

    // The staged image: a directory in the base's shape, with its definition.
    let (mut staged, machine, mut location, _base_lease) = match recipe.base.kind() {
        BaseKind::Debian(base) => {
            report(&format!(
                "base: mmdebstrap {} ({} packages)",
                base.suite,
                base.packages.len()
            ));
            let tree = work_dir.join("root");
            let staged = work_dir.join("staged");
            let machine = output.machine.clone().unwrap_or_default();
            let (base, steps, dir) = (base.clone(), recipe.steps.clone(), checked.clone());
            let root_size = match (output.boot, output.disk_size) {
                (Some(BootMode::Uefi | BootMode::Bios), Some(size)) => {
                    (size.bytes() - assemble::GPT_OVERHEAD) / (1 << 20) * (1 << 20)
                }
                (_, Some(size)) => size.bytes(),
                // check_recipe requires the size of a Debian base.
                (_, None) => unreachable!("a Debian base has a disk size"),
            };
            let (report, to, staged_machine) = (report.clone(), staged.clone(), machine.clone());
            let extra = output.cmdline.clone();
            let machine = blocking(move || {
                root::debian(&base, &tree)?;
                for (n, step) in steps.iter().enumerate() {
                    match step.kind() {
                        StepKind::Copy(copy) => {
                            report(&format!("step {n}: copy {} to {}", copy.from, copy.to));
                            root::copy(&dir.host_path(&copy.from), &tree, copy)?;
                        }
                        StepKind::Run(command) => {
                            report(&format!("step {n}: run {}", first_line(command)));
                            root::run(command, &tree)?;
                        }
                        StepKind::Boot(_) => {}
                    }
                }
                report("making the root file system");
                let made = assemble::kernel_image(
                    &tree,
                    root_size,
                    &staged_machine,
                    extra.as_deref(),
                    &to,
                );
                let _ = std::fs::remove_dir_all(&tree);
                made
            })
            .await?;
            (staged, machine, None, None)
        }
        BaseKind::Image(reference) => {
            let engine = engine
                .as_ref()
                .unwrap_or_else(|| unreachable!("made above"));
            report(&format!("base: image {}", reference.location()));
            let lease = boot::acquire(engine, reference, &checked.dir).await?;
            let dir = lease.contents().dir.clone();
            let mut machine = lease.contents().machine.clone();
            if let Some(replaced) = &output.machine {
                machine = MachineDefinition {
                    kernel: machine.kernel,
                    initrd: machine.initrd,
                    cmdline: machine.cmdline,
                    ..replaced.clone()
                };
            }
            if let (Some(extra), Some(cmdline)) = (&output.cmdline, &mut machine.cmdline) {
                cmdline.push(' ');
                cmdline.push_str(extra);
            }
            let location = boot::absolute_location(reference, &checked.dir);
            (dir, machine, Some(location), Some(lease))
        }
    };

    // Ctrl-C stops a build between its stages (a stage's own children get the signal).
    let stopped = || match *worker.cancel.borrow() {
        Some(reason) => Err(BuildError::Stopped(reason)),
        None => Ok(()),
    };
    stopped()?;
    for (n, step) in &boots {
        let engine = engine
            .as_ref()
            .unwrap_or_else(|| unreachable!("made above"));
        let source = match location.take() {
            Some(location) => location,
            None => {
                report(&format!("step {n}: packing the image to boot"));
                let archive = work_dir.join(format!("boot-{n}.tar.zst"));
                let dir = work_dir.join(format!("boot-{n}"));
                let (from, m, to) = (staged.clone(), machine.clone(), archive.clone());
                let limits = worker.limits();
                blocking(move || {
                    link_members(&from, &dir)?;
                    assemble::write_machine(&m, &dir)?;
                    pack_image(&dir, &to, limits).map_err(BuildError::Pack)?;
                    let _ = std::fs::remove_dir_all(&dir);
                    Ok(())
                })
                .await?;
                archive.display().to_string()
            }
        };
        report(&format!("step {n}: boot {}", first_line(&step.script)));
        let booted = work_dir.join(format!("booted-{n}"));
        std::fs::create_dir_all(&booted).map_err(|source| BuildError::Io {
            what: "cannot make",
            path: booted.clone(),
            source,
        })?;
        boot::run_step(engine, worker, *n, step, &source, &booted.join("disk.img")).await?;
        // The booted disk replaces the staged one; the other members stay.
        let (from, to) = (staged.clone(), booted.clone());
        blocking(move || link_members_but_disk(&from, &to)).await?;
        staged = booted;
    }

    stopped()?;
    report("making the output");
    let image = work_dir.join("image");
    let wanted = output.boot;
    let (from, to) = (staged.clone(), image.clone());
    blocking(move || shape_output(&from, &machine, wanted, &to)).await?;
    stopped()?;
    report("packing");
    let partial = work_dir.join("image.tar.zst");
    let limits = worker.limits();
    let (from, to) = (image.clone(), partial.clone());
    let contents =
        blocking(move || pack_image(&from, &to, limits).map_err(BuildError::Pack)).await?;
    std::fs::rename(&partial, out).map_err(|source| BuildError::Io {
        what: "cannot move the image into place",
        path: out.to_path_buf(),
        source,
    })?;
    drop(engine);
    Ok(contents)
}

/// The staged image (defined by `machine`) in the shape `wanted` asks for, in `image`.
fn shape_output(
    staged: &Path,
    machine: &MachineDefinition,
    wanted: Option<BootMode>,
    image: &Path,
) -> Result<(), BuildError> {
    let has_kernel = staged.join(super::Member::Kernel.name()).is_file();
    let raw = staged.join(super::Member::DiskImg.name()).is_file()
        && !staged.join(super::Member::LayerQcow2.name()).exists();
    let firmware = machine.firmware.unwrap_or(Firmware::Bios);
    match wanted {
        Some(mode @ (BootMode::Uefi | BootMode::Bios)) if has_kernel && !raw => {
            Err(BuildError::Shape {
                wanted: mode.as_str(),
                why: "the base's disk is qcow2 or layered; a GPT disk is laid out from a raw disk.img",
            })
        }
        Some(BootMode::Uefi) if has_kernel => {
            assemble::disk_image(staged, machine, Firmware::Uefi, image)
        }
        Some(BootMode::Bios) if has_kernel => {
            assemble::disk_image(staged, machine, Firmware::Bios, image)
        }
        Some(mode @ (BootMode::Uefi | BootMode::Bios))
            if (mode == BootMode::Uefi) != (firmware == Firmware::Uefi) =>
        {
            Err(BuildError::Shape {
                wanted: mode.as_str(),
                why: "the base boots from its disk with the other firmware, and has no kernel member to lay out a disk with",
            })
        }
        Some(BootMode::Kernel) if !has_kernel => Err(BuildError::Shape {
            wanted: "kernel",
            why: "the base boots from its disk: it has no kernel member",
        }),
        _ => {
            link_members(staged, image)?;
            assemble::write_machine(machine, image)
        }
    }
}

/// Hard links (or copies) every member but `machine.json` of image directory `from`
/// into `to`.
fn link_members(from: &Path, to: &Path) -> Result<(), BuildError> {
    link_some(from, to, &["machine.json"])
}

/// As `link_members`, leaving out the boot disk as well (a booted one replaces it).
fn link_members_but_disk(from: &Path, to: &Path) -> Result<(), BuildError> {
    link_some(from, to, &["disk.img", "disk.qcow2", "layer.qcow2"])
}

fn link_some(from: &Path, to: &Path, except: &[&str]) -> Result<(), BuildError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| BuildError::Io { what, path, source }
    };
    std::fs::create_dir_all(to).map_err(io("cannot make", to))?;
    for entry in std::fs::read_dir(from).map_err(io("cannot read", from))? {
        let entry = entry.map_err(io("cannot read", from))?;
        let name = entry.file_name();
        if except.iter().any(|e| name == *e) {
            continue;
        }
        let target = to.join(&name);
        if std::fs::hard_link(entry.path(), &target).is_err() {
            std::fs::copy(entry.path(), &target).map_err(io("cannot copy", &entry.path()))?;
        }
    }
    Ok(())
}

fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    let short: String = line.chars().take(72).collect();
    if short.len() < text.len() {
        format!("{short}…")
    } else {
        short
    }
}
