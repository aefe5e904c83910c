//! VM images: the archive format and its checks, single-pass unpacking, packing, fetching
//! with verification, the content-addressed cache and per-job overlays.

pub mod build;
mod cache;
mod contents;
mod disk;
mod fetch;
mod inspect;
mod member;
mod pack;
mod qemu_img;
mod stream;
mod unpack;

pub use cache::{
    CacheError, CacheSettings, CachedImage, ImageCache, ImageError, ImageLease, ImageRequest,
};
pub use contents::{
    DiskLayout, DiskSummary, ImageContents, ImageLimits, MAX_MACHINE_JSON_BYTES, check_image_dir,
};
pub use disk::{BootDisk, DiskFormat, DiskLayer, KernelFiles};
pub(crate) use fetch::install_crypto_provider;
pub use fetch::{FetchError, FetchPolicy, Fetcher, HttpOutcome, Progress, Validators};
pub use inspect::inspect_archive;
pub use member::{ImageProblem, Member};
pub use pack::{PackError, pack_image};
pub use qemu_img::{QemuImgError, flatten_to_raw};
pub use unpack::{UnpackError, Unpacked, unpack_archive};
