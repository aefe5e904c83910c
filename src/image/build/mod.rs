//! `qemu-worker image build RECIPE OUT.tar.zst` (docs/image-recipes.md): a Debian root
//! tree from mmdebstrap, the recipe's `copy` and `run` steps applied to it, then a disk
//! and boot members made from it without loop devices or mounts, packed as `image pack`
//! packs. Reproducible where its inputs are: every time stamp is fixed, and so are the
//! file system's UUID and hash seed.

mod assemble;
mod recipe;
mod root;

use std::path::{Path, PathBuf};

pub use recipe::{
    Base, BootMode, CheckedRecipe, CopyStep, DebianBase, Output, Package, Recipe, Step, StepKind,
    Variant, check_recipe,
};

use super::contents::{ImageContents, ImageLimits};
use super::pack::{PackError, pack_image};

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

/// Progress lines (a TTY shows them; the CLI decides).
pub type Report<'a> = &'a dyn Fn(&str);

/// Builds the image `checked` describes into `out` (blocking: minutes of child
/// processes and file I/O). Everything is made in a scratch directory beside `out`,
/// and `out` appears only once the image is packed and checked.
pub fn build_image(
    checked: &CheckedRecipe,
    out: &Path,
    limits: ImageLimits,
    report: Report<'_>,
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
    let tree = work.path().join("root");
    let Base::Debian(base) = &checked.recipe.base;
    report(&format!(
        "base: mmdebstrap {} ({} packages)",
        base.suite,
        base.packages.len()
    ));
    root::debian(base, &tree)?;
    for (n, step) in checked.recipe.steps.iter().enumerate() {
        match step.kind() {
            StepKind::Copy(copy) => {
                report(&format!("step {n}: copy {} to {}", copy.from, copy.to));
                root::copy(&checked.host_path(&copy.from), &tree, copy)?;
            }
            StepKind::Run(command) => {
                report(&format!("step {n}: run {}", first_line(command)));
                root::run(command, &tree)?;
            }
        }
    }
    report("making the disk");
    let image = work.path().join("image");
    assemble::kernel_boot(&tree, &checked.recipe.output, &image)?;
    report("packing");
    let partial = work.path().join("image.tar.zst");
    let contents = pack_image(&image, &partial, limits).map_err(BuildError::Pack)?;
    std::fs::rename(&partial, out).map_err(|source| BuildError::Io {
        what: "cannot move the image into place",
        path: out.to_path_buf(),
        source,
    })?;
    Ok(contents)
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
