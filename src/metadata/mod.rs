//! The per-VM metadata service the guest tools talk to at 169.254.169.254:80: fetch the
//! task, stream the log, report the result; and a cloud-init datasource (NoCloud, EC2
//! with IMDSv2) that serves the guest tools to stock cloud images. One instance per VM, listening on a unix
//! socket in that VM's run dir; the guest reaches it only through that VM's own
//! user-mode network forward (or its own network namespace), so every request is bound
//! to one VM by construction.

mod datasource;
mod log;
mod openapi;
mod service;
mod splice;

// The wire types are shared with the guest tools (one definition for both ends).
pub use datasource::{Datasource, TOKEN_PATH};
pub use log::{LogSink, LogWriterError};
pub use openapi::openapi_document;
pub use qemu_worker_protocol::metadata::{ApiError, LogReceipt, Ping, Task, TaskReply, TaskResult};
pub use service::{
    MetadataHandle, MetadataLimits, MetadataUsage, Offer, Park, start_metadata_service,
    start_metadata_service_tcp,
};
pub use splice::splice_stdio_to_socket;
