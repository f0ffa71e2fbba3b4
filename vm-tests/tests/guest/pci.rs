//! virtio-blk-pci with ACCESS_PLATFORM, bound to vfio-pci (phase `va`).

use crate::pci_common::{check_vfio_binding, kernel_negotiated_features};
use vm_tests::{device_or_skip, has_feature, DeviceKind, F_ACCESS_PLATFORM, F_VERSION_1};

#[test]
fn bound_to_vfio_pci_with_viable_group() {
    let dev = device_or_skip!(DeviceKind::Pci);
    check_vfio_binding(&dev);
}

#[test]
fn offers_version_1_and_access_platform() {
    let _dev = device_or_skip!(DeviceKind::Pci);
    let features = kernel_negotiated_features();
    assert!(has_feature(features, F_VERSION_1), "features {features:#x} lack VERSION_1");
    assert!(has_feature(features, F_ACCESS_PLATFORM), "features {features:#x} lack ACCESS_PLATFORM");
}
