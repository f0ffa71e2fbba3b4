//! Feature bits and the device status byte (virtio 1.2 §2.1, §2.2, §6).

use virtio_queue_core::RingFeatures;

bitflags::bitflags! {
    /// Device-independent feature bits (24..41, virtio 1.2 §6), at their
    /// specification positions in the 64-bit feature word.
    ///
    /// Device-specific bits (0..24) and reserved bits are not named here; keep
    /// them with [`VirtioFeatures::from_bits_retain`] or work on the raw `u64`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct VirtioFeatures: u64 {
        /// VIRTIO_F_NOTIFY_ON_EMPTY (24, legacy only).
        const NOTIFY_ON_EMPTY = 1 << 24;
        /// VIRTIO_F_ANY_LAYOUT (27, legacy only).
        const ANY_LAYOUT = 1 << 27;
        /// VIRTIO_F_INDIRECT_DESC (28): indirect descriptor tables.
        const INDIRECT_DESC = 1 << 28;
        /// VIRTIO_F_EVENT_IDX (29): `used_event` / `avail_event` notification suppression.
        const EVENT_IDX = 1 << 29;
        /// VIRTIO_F_VERSION_1 (32): a modern (1.0+) device. Always required here.
        const VERSION_1 = 1 << 32;
        /// VIRTIO_F_ACCESS_PLATFORM (33): the device accesses memory through the
        /// platform's IOMMU (addresses are IOVAs).
        const ACCESS_PLATFORM = 1 << 33;
        /// VIRTIO_F_RING_PACKED (34): packed virtqueues.
        const RING_PACKED = 1 << 34;
        /// VIRTIO_F_IN_ORDER (35): buffers are used in the order they were made available.
        const IN_ORDER = 1 << 35;
        /// VIRTIO_F_ORDER_PLATFORM (36): memory accesses must be ordered as the platform orders them.
        const ORDER_PLATFORM = 1 << 36;
        /// VIRTIO_F_SR_IOV (37): single root I/O virtualization.
        const SR_IOV = 1 << 37;
        /// VIRTIO_F_NOTIFICATION_DATA (38): the driver passes extra data in notifications.
        const NOTIFICATION_DATA = 1 << 38;
        /// VIRTIO_F_NOTIF_CONFIG_DATA (39): the device provides the notification data to use.
        const NOTIF_CONFIG_DATA = 1 << 39;
        /// VIRTIO_F_RING_RESET (40): individual virtqueues can be reset.
        const RING_RESET = 1 << 40;
        /// VIRTIO_F_ADMIN_VQ (41): administration virtqueue.
        const ADMIN_VQ = 1 << 41;
    }
}

impl VirtioFeatures {
    /// Mask of the device-specific bits (0..24).
    pub const DEVICE_SPECIFIC_MASK: u64 = (1 << 24) - 1;

    /// The bits that change how a virtqueue works, for [`virtio_queue_core::QueueConfig`].
    pub fn ring_features(self) -> RingFeatures {
        RingFeatures::from_bits_truncate(self.bits())
    }

    /// [`VirtioFeatures::ring_features`] of a raw negotiated feature word.
    pub fn ring_features_of(features: u64) -> RingFeatures {
        RingFeatures::from_bits_truncate(features)
    }
}

bitflags::bitflags! {
    /// The device status field (virtio 1.2 §2.1).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct DeviceStatus: u8 {
        /// The guest OS has found the device.
        const ACKNOWLEDGE = 1;
        /// The driver knows how to drive the device.
        const DRIVER = 2;
        /// The driver is set up and ready to drive the device.
        const DRIVER_OK = 4;
        /// The driver has acknowledged the features it understands; feature
        /// negotiation is complete once the device keeps this bit set.
        const FEATURES_OK = 8;
        /// The device has hit an error it cannot recover from without a reset.
        const DEVICE_NEEDS_RESET = 64;
        /// The driver has given up on the device.
        const FAILED = 128;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_at_spec_positions() {
        assert_eq!(VirtioFeatures::INDIRECT_DESC.bits(), 1 << 28);
        assert_eq!(VirtioFeatures::EVENT_IDX.bits(), 1 << 29);
        assert_eq!(VirtioFeatures::VERSION_1.bits(), 1 << 32);
        assert_eq!(VirtioFeatures::ACCESS_PLATFORM.bits(), 1 << 33);
        assert_eq!(VirtioFeatures::RING_PACKED.bits(), 1 << 34);
        assert_eq!(VirtioFeatures::IN_ORDER.bits(), 1 << 35);
        assert_eq!(VirtioFeatures::NOTIFICATION_DATA.bits(), 1 << 38);
        assert_eq!(VirtioFeatures::RING_RESET.bits(), 1 << 40);
        assert_eq!(DeviceStatus::FEATURES_OK.bits(), 8);
        assert_eq!(DeviceStatus::FAILED.bits(), 128);
    }

    #[test]
    fn ring_features_pick_the_ring_bits() {
        let f = VirtioFeatures::from_bits_retain(
            (1 << 9) | VirtioFeatures::VERSION_1.bits() | VirtioFeatures::EVENT_IDX.bits() | (1 << 34) | (1 << 35),
        );
        assert_eq!(f.ring_features(), RingFeatures::EVENT_IDX | RingFeatures::RING_PACKED | RingFeatures::IN_ORDER);
        assert_eq!(VirtioFeatures::ring_features_of(1 << 28), RingFeatures::INDIRECT_DESC);
        assert_eq!(VirtioFeatures::VERSION_1.ring_features(), RingFeatures::empty());
        // Device-specific bits survive a round trip through from_bits_retain.
        assert_eq!(f.bits() & VirtioFeatures::DEVICE_SPECIFIC_MASK, 1 << 9);
    }
}
