//! The negative control: virtio-blk-pci without ACCESS_PLATFORM (`--case no-access-platform`).

use crate::pci_common::{check_vfio_binding, kernel_negotiated_features};
use transport_pci::{PciOptions, PciTransport};
use virtio_transport_api::{Cause, Step, VirtioFeatures};
use vm_tests::{device_or_skip, has_feature, DeviceKind, F_ACCESS_PLATFORM, F_VERSION_1};

#[test]
fn bound_to_vfio_pci_with_viable_group() {
    let dev = device_or_skip!(DeviceKind::PciNoAccessPlatform);
    check_vfio_binding(&dev);
}

#[test]
fn lacks_access_platform() {
    let _dev = device_or_skip!(DeviceKind::PciNoAccessPlatform);
    let features = kernel_negotiated_features();
    assert!(has_feature(features, F_VERSION_1), "features {features:#x} lack VERSION_1");
    assert!(!has_feature(features, F_ACCESS_PLATFORM), "features {features:#x} have ACCESS_PLATFORM");
}

#[test]
fn transport_refuses_a_device_whose_dma_bypasses_the_iommu() {
    let dev = device_or_skip!(DeviceKind::PciNoAccessPlatform);
    let path = dev.to_str().expect("a UTF-8 sysfs path");
    let e =
        PciTransport::open(path, PciOptions::default()).expect_err("a device without ACCESS_PLATFORM must be refused");
    assert_eq!(e.step(), Step::Features, "{e}");
    match e.cause() {
        Cause::MissingFeatures { missing, offered } => {
            assert_eq!(*missing, VirtioFeatures::ACCESS_PLATFORM.bits(), "{e}");
            assert_ne!(offered & VirtioFeatures::VERSION_1.bits(), 0, "{e}");
        }
        other => panic!("expected MissingFeatures, got {other:?} ({e})"),
    }
    let msg = e.to_string();
    assert!(msg.contains("ACCESS_PLATFORM") && msg.contains("IOMMU"), "{msg}");
    eprintln!("refused as expected: {msg}");
    // The refusal left the device usable: a second open is refused the same way, not with
    // a busy group or a stuck device.
    let again = PciTransport::open(path, PciOptions::default()).unwrap_err();
    assert!(matches!(again.cause(), Cause::MissingFeatures { .. }), "{again}");
}
