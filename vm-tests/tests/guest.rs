//! Tests that run inside the `cargo xtask vm-test` guest (see the crate docs for the
//! environment contract). The module a test lives in decides which phase runs it:
//! `pci`, `vdpa_sim`, `vduse` (VA-mode devices), `vdpa_sim_pa` (simulator with `use_va=0`),
//! `pci_no_access_platform` (negative-control boot). Until transport-pci and transport-vdpa
//! exist, these check what user space can check without a driver.

use std::path::Path;

use vm_tests::{
    device_or_skip, has_feature, ioctl_value, link_name, nr, open_rw, parse_feature_bits, sysfs, vfio_group_flags,
    DeviceKind, VhostVdpa, F_ACCESS_PLATFORM, F_VERSION_1, VFIO_GROUP_FLAGS_VIABLE, VFIO_TYPE1V2_IOMMU,
    VIRTIO_ID_BLOCK,
};

/// The function is a modern virtio-blk device (1af4:1042) bound to vfio-pci, in an IOMMU
/// group that is viable, with its `/dev/vfio/<group>` node, and the VFIO container offers
/// the type-1 v2 IOMMU.
fn check_vfio_binding(dev: &Path) {
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
fn kernel_negotiated_features() -> u64 {
    let text = std::env::var("VIRTIO_TEST_PCI_FEATURES")
        .unwrap_or_else(|_| panic!("VIRTIO_TEST_PCI_FEATURES is unset (the guest's /init sets it)"));
    parse_feature_bits(&text).unwrap_or_else(|| panic!("VIRTIO_TEST_PCI_FEATURES `{text}` is not a bit string"))
}

mod pci {
    use super::*;

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
}

mod pci_no_access_platform {
    use super::*;

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
}

/// The vhost-vdpa node belongs to a vdpa device bound to `vhost_vdpa`.
fn check_vhost_vdpa_binding(node: &Path) {
    let name = node.file_name().and_then(|n| n.to_str()).unwrap_or_else(|| panic!("odd node {}", node.display()));
    let devices = std::fs::read_dir("/sys/bus/vdpa/devices").unwrap_or_else(|e| panic!("/sys/bus/vdpa: {e}"));
    let parent = devices
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|d| d.join(name).exists())
        .unwrap_or_else(|| panic!("no vdpa device has {name}"));
    assert_eq!(link_name(&parent, "driver").ok().as_deref(), Some("vhost_vdpa"), "{}", parent.display());
}

/// The node answers as a virtio-blk device with VERSION_1 and ACCESS_PLATFORM and a non-zero
/// capacity in its config space.
fn check_vhost_vdpa_blk(node: &Path) {
    check_vhost_vdpa_binding(node);
    let dev = VhostVdpa::open(node).unwrap_or_else(|e| panic!("open {}: {e}", node.display()));
    assert_eq!(dev.device_id().unwrap_or_else(|e| panic!("VHOST_VDPA_GET_DEVICE_ID: {e}")), VIRTIO_ID_BLOCK);
    let features = dev.features().unwrap_or_else(|e| panic!("VHOST_GET_FEATURES: {e}"));
    assert!(has_feature(features, F_VERSION_1), "features {features:#x} lack VERSION_1");
    assert!(has_feature(features, F_ACCESS_PLATFORM), "features {features:#x} lack ACCESS_PLATFORM");
    let capacity = dev.config(0, 8).unwrap_or_else(|e| panic!("VHOST_VDPA_GET_CONFIG: {e}"));
    let sectors = u64::from_le_bytes(capacity.try_into().unwrap_or_else(|_| panic!("short config read")));
    assert!(sectors > 0, "capacity is 0 sectors");
    eprintln!("{}: features {features:#x}, capacity {sectors} sectors", node.display());
}

/// The checks every vhost-vdpa device gets, as a module named after its phase prefix.
macro_rules! vhost_vdpa_tests {
    ($module:ident, $kind:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn answers_as_virtio_blk_with_access_platform() {
                let node = device_or_skip!($kind);
                check_vhost_vdpa_blk(&node);
            }
        }
    };
}

vhost_vdpa_tests!(vdpa_sim, DeviceKind::VdpaSim);
vhost_vdpa_tests!(vdpa_sim_pa, DeviceKind::VdpaSimPa);
vhost_vdpa_tests!(vduse, DeviceKind::Vduse);
