//! The `vhost` crate's vhost-vdpa handle, the address space it asks for, and
//! its errors in this crate's terms.
//!
//! # The address space
//!
//! `vhost::vhost_kern::vdpa::VhostKernVdpa<AS>` wants a `vm-memory` guest
//! address space. In vhost-vdpa it is used by nothing this transport calls:
//! the ring check (`VhostKernBackend::is_valid`) is overridden for vhost-vdpa
//! and does not look at it, and the inherent `VhostKernVdpa::set_vring_addr`
//! passes IOVAs through untranslated. Only the generic
//! `VhostBackend::set_vring_addr` (which translates guest-physical addresses
//! through it, the vhost-net/vsock model) and `set_mem_table` (which the
//! vhost-vdpa kernel driver does not implement) would, and this crate calls
//! neither. Device addresses here are IOVAs mapped through the vhost IOTLB,
//! so the honest address space is an empty one: [`NoGuestMemory`].

use std::sync::Arc;

use vhost::vhost_kern::vdpa::VhostKernVdpa;
use virtio_transport_api::{Cause, Error, Step};
use vm_memory::GuestMemoryMmap;

use crate::NAME;

/// The empty guest memory handed to the `vhost` crate: vhost-vdpa device
/// addresses are IOVAs, never guest-physical addresses (see the module docs).
pub(crate) type NoGuestMemory = Arc<GuestMemoryMmap<()>>;

/// The `vhost` crate's handle on a `/dev/vhost-vdpa-N`.
pub(crate) type Device = VhostKernVdpa<NoGuestMemory>;

/// A new empty address space.
pub(crate) fn no_guest_memory() -> NoGuestMemory {
    Arc::new(GuestMemoryMmap::new())
}

/// Backend feature bits (`VHOST_GET_BACKEND_FEATURES`, linux/vhost_types.h).
pub mod backend_features {
    /// `VHOST_BACKEND_F_IOTLB_MSG_V2`: IOTLB messages in `struct vhost_msg_v2`.
    pub const IOTLB_MSG_V2: u64 = 1 << 0x1;
    /// `VHOST_BACKEND_F_IOTLB_BATCH`: BATCH_BEGIN/BATCH_END around IOTLB updates.
    pub const IOTLB_BATCH: u64 = 1 << 0x2;
    /// `VHOST_BACKEND_F_IOTLB_PERSIST`: mappings survive a device reset.
    pub const IOTLB_PERSIST: u64 = 1 << 0x8;
    /// The backend features this transport takes when offered.
    pub const WANTED: u64 = IOTLB_MSG_V2 | IOTLB_BATCH | IOTLB_PERSIST;
}

/// A `vhost` crate error of `what` (the ioctl or message name) at `step`.
pub(crate) fn vhost_error(step: Step, what: &str, e: vhost::Error) -> Error {
    let err = match e {
        vhost::Error::VhostOpen(io) | vhost::Error::IoctlError(io) | vhost::Error::IOError(io) => {
            Error::os(NAME, step, io)
        }
        other => Error::new(NAME, step, Cause::Protocol(other.to_string())),
    };
    err.with_context(what.to_string())
}

/// Shorthand for `Err` of an invalid argument at `step`.
pub(crate) fn invalid(step: Step, msg: impl Into<String>) -> Error {
    Error::new(NAME, step, Cause::InvalidArgument(msg.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_keep_errno_and_name_the_ioctl() {
        let e = vhost_error(
            Step::Status,
            "VHOST_VDPA_SET_STATUS",
            vhost::Error::IoctlError(std::io::Error::from_raw_os_error(libc::EINVAL)),
        );
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(e.step(), Step::Status);
        assert!(e.to_string().starts_with("vdpa: device status (VHOST_VDPA_SET_STATUS): "), "{e}");
        let e = vhost_error(Step::Queue(1), "SET_VRING_ADDR", vhost::Error::InvalidQueue);
        assert!(matches!(e.cause(), Cause::Protocol(_)));
    }

    #[test]
    fn the_address_space_is_empty() {
        use vm_memory::GuestMemoryBackend;
        assert_eq!(no_guest_memory().num_regions(), 0);
    }
}
