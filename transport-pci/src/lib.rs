//! The modern virtio-pci transport (virtio 1.2 §4.1) for a PCI function bound to `vfio-pci`.
//!
//! [`PciTransport`] implements [`virtio_transport_api::Transport`]:
//!
//! * [`addr`]: the device by PCI address (`DDDD:BB:DD.F`) or sysfs directory, its driver
//!   binding and IOMMU group;
//! * [`caps`]: vendor and device id checks and the virtio vendor capabilities, parsed from
//!   configuration space (read through VFIO's config region) and checked against the real
//!   BAR sizes — a legacy-only device gets a clear error;
//! * [`regs`]: the BARs mapped through VFIO, `struct virtio_pci_common_cfg`, the device
//!   configuration window and the notify registers, all accessed through `volatile` with
//!   the specification's access widths;
//! * [`msix`]: MSI-X vectors routed to eventfds with `VFIO_DEVICE_SET_IRQS`, and a polling
//!   fallback for queues without a vector;
//! * [`dma`]: the type-1 v2 IOMMU container, the IOVA windows it reports, and DMA memory.
//!
//! Containers, groups and devices come from `vfio-ioctls`. A device that does not offer
//! VIRTIO_F_ACCESS_PLATFORM is refused at [`PciTransport::open`]: its DMA would bypass the
//! IOMMU, so the IOVAs this transport hands out would mean nothing to it.

pub mod addr;
pub mod caps;
pub mod dma;
pub mod msix;
pub mod regs;
mod transport;

pub use addr::PciAddress;
pub use msix::{Interrupts, QueueInterrupt};
pub use regs::PciNotifier;
pub use transport::{PciOptions, PciTransport, REQUIRED_FEATURES, UNSUPPORTED_FEATURES};

use virtio_transport_api::{Cause, Error, Step};

/// The transport name in errors.
pub const NAME: &str = "pci";

/// A `vfio-ioctls` error as a transport error: an OS error (with its errno) when there is
/// one underneath, a protocol error otherwise.
pub(crate) fn vfio_error(step: Step, what: &str, e: vfio_ioctls::VfioError) -> Error {
    let msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    let mut errno = None;
    while let Some(s) = source {
        if let Some(sys) = s.downcast_ref::<vmm_sys_util::errno::Error>() {
            errno = Some(sys.errno());
            break;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            errno = io.raw_os_error();
            break;
        }
        source = s.source();
    }
    match errno {
        Some(n) => Error::os(NAME, step, std::io::Error::from_raw_os_error(n)).with_context(format!("{what}: {msg}")),
        None => Error::new(NAME, step, Cause::Protocol(msg)).with_context(what.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_errors_keep_their_errno() {
        let e = vfio_error(
            Step::Memory,
            "VFIO_IOMMU_MAP_DMA",
            vfio_ioctls::VfioError::IommuDmaMap(vmm_sys_util::errno::Error::new(libc::ENOMEM)),
        );
        assert_eq!(e.raw_os_error(), Some(libc::ENOMEM));
        assert_eq!(e.step(), Step::Memory);
        assert!(e.to_string().starts_with("pci: DMA memory (VFIO_IOMMU_MAP_DMA: "), "{e}");
        let e = vfio_error(Step::Connect, "group 3", vfio_ioctls::VfioError::GroupViable);
        assert!(matches!(e.cause(), Cause::Protocol(m) if m.contains("not viable")), "{e}");
    }

    #[test]
    fn transport_and_notifier_cross_threads() {
        fn is_send<T: Send>() {}
        fn is_sync<T: Sync>() {}
        is_send::<PciTransport>();
        is_send::<PciNotifier>();
        is_sync::<PciNotifier>();
        is_send::<virtio_blk_dev::BlkQueue<PciTransport>>();
    }

    #[test]
    fn open_refuses_bad_addresses_and_missing_devices() {
        let e = PciTransport::open("not-a-device", PciOptions::default()).unwrap_err();
        assert!(matches!(e.cause(), Cause::InvalidArgument(m) if m.contains("DDDD:BB:DD.F")), "{e}");
        assert_eq!(e.step(), Step::Connect);
        let e = PciTransport::open("ffff:ff:1f.7", PciOptions::default()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        assert!(e.to_string().contains("ffff:ff:1f.7"), "{e}");
    }
}

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
