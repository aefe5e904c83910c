//! What the root crate's component tests and benchmarks share with the engine-tests
//! suite, none of it specific to qemu-worker (so both crates can depend on it):
//!
//! - [`host`]: checks of the test host (a program is installed, processes left under a
//!   directory, a process's resident memory);
//! - [`postgres`]: a real PostgreSQL server per test;
//! - [`archive`]: hand-made tar archives, including ones `tar` refuses to write;
//! - [`figure`]: one benchmark figure as `bench/run` collects it;
//! - [`http`]: a plain HTTP/1.1 client over loopback TCP.

pub mod archive;
pub mod figure;
pub mod host;
pub mod http;
pub mod postgres;

pub use host::{processes_under, require, require_file, rss_kib};
