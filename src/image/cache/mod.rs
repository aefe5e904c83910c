//! The content-addressed image cache: the handle jobs hold (`handle`), what they ask
//! for (`request`) and get (`lease`), the task that owns the cache (`actor`) and the
//! index and objects on disk it keeps (`state`).

mod actor;
mod error;
mod handle;
mod lease;
mod request;
mod state;

pub use error::{CacheError, ImageError};
pub use handle::{CacheCounters, CacheSettings, CachedImage, ImageCache};
pub use lease::ImageLease;
pub use request::ImageRequest;
