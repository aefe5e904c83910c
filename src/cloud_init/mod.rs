//! What a VM's cloud-init reads from its metadata service (docs/metadata.md): the seed
//! (meta-data, network-config), the user-data (the worker's part that starts the guest
//! tools, merged with the payload's own), and the guest tools binary itself.

mod guest_tools;
mod seed;
mod user_data;

pub use guest_tools::{GuestTools, GuestToolsError};
pub use seed::{NOCLOUD_PREFIX, Seed, SeedNetwork, smbios_serial};
pub use user_data::{MAX_USER_DATA, UserData, user_data_problem};
