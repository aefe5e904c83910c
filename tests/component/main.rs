//! The component tests: the worker against real programs without a guest (QEMU with no
//! disk, the host's qemu-ga, PostgreSQL, HTTP servers on loopback). Tests that boot the
//! test image are in engine-tests. One binary for all of them, as nextest's own
//! workspace does: one link, one process per test under nextest.

mod api;
mod cli;
mod datasource;
mod image_archive;
mod image_build;
mod image_cache;
mod metadata;
mod packaging;
mod qemu_argv;
mod qmp;
mod queue;
mod schemas;
mod uefi_firmware;
mod vm_runtime;
