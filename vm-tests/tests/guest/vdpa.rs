//! vhost-vdpa devices: `vdpa_sim_blk` (VA and PA mode) and VDUSE. `main.rs` invokes
//! [`vhost_vdpa_tests!`] once per device kind, so each gets a top-level module named after its
//! phase prefix.

use std::path::Path;

use vm_tests::{has_feature, link_name, VhostVdpa, F_ACCESS_PLATFORM, F_VERSION_1, VIRTIO_ID_BLOCK};

/// The vhost-vdpa node belongs to a vdpa device bound to `vhost_vdpa`.
pub fn check_vhost_vdpa_binding(node: &Path) {
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
pub fn check_vhost_vdpa_blk(node: &Path) {
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
            use vm_tests::{device_or_skip, DeviceKind};
            use $crate::vdpa::check_vhost_vdpa_blk;

            #[test]
            fn answers_as_virtio_blk_with_access_platform() {
                let node = device_or_skip!($kind);
                check_vhost_vdpa_blk(&node);
            }
        }
    };
}
