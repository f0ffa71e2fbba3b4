//! What the PCI tests share: the VFIO binding check and the kernel's negotiated features.

use std::path::Path;

use vm_tests::{
    ioctl_value, link_name, nr, open_rw, parse_feature_bits, sysfs, vfio_group_flags, VFIO_GROUP_FLAGS_VIABLE,
    VFIO_TYPE1V2_IOMMU,
};

/// The function is a modern virtio-blk device (1af4:1042) bound to vfio-pci, in an IOMMU
/// group that is viable, with its `/dev/vfio/<group>` node, and the VFIO container offers
/// the type-1 v2 IOMMU.
pub fn check_vfio_binding(dev: &Path) {
    assert_eq!(sysfs(dev, "vendor").ok().as_deref(), Some("0x1af4"), "{}: vendor", dev.display());
    assert_eq!(sysfs(dev, "device").ok().as_deref(), Some("0x1042"), "{}: not a modern virtio-blk", dev.display());
    let driver = link_name(dev, "driver").unwrap_or_else(|e| panic!("{}: no driver link: {e}", dev.display()));
    assert_eq!(driver, "vfio-pci", "{} is bound to {driver}", dev.display());
    let group = link_name(dev, "iommu_group").unwrap_or_else(|e| panic!("{}: no iommu_group: {e}", dev.display()));
    let node = Path::new("/dev/vfio").join(&group);
    let group_fd = open_rw(&node).unwrap_or_else(|e| panic!("open {}: {e}", node.display()));
    let flags = vfio_group_flags(&group_fd).unwrap_or_else(|e| panic!("VFIO_GROUP_GET_STATUS: {e}"));
    assert_ne!(flags & VFIO_GROUP_FLAGS_VIABLE, 0, "group {group} not viable (flags {flags:#x})");
    let container = open_rw(Path::new("/dev/vfio/vfio")).unwrap_or_else(|e| panic!("open /dev/vfio/vfio: {e}"));
    assert_eq!(ioctl_value(&container, nr::VFIO_GET_API_VERSION, 0).ok(), Some(0), "VFIO API version");
    assert_eq!(
        ioctl_value(&container, nr::VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU).ok(),
        Some(1),
        "VFIO_TYPE1v2_IOMMU not supported"
    );
}

/// The features the guest kernel negotiated with the PCI device before it moved to vfio-pci.
pub fn kernel_negotiated_features() -> u64 {
    let text = std::env::var("VIRTIO_TEST_PCI_FEATURES")
        .unwrap_or_else(|_| panic!("VIRTIO_TEST_PCI_FEATURES is unset (the guest's /init sets it)"));
    parse_feature_bits(&text).unwrap_or_else(|| panic!("VIRTIO_TEST_PCI_FEATURES `{text}` is not a bit string"))
}
