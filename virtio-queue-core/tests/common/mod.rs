//! Set-up shared by the integration tests that drive a queue against the
//! device model over one ring.

use virtio_queue_core::device::{DeviceConfig, PackedDevice, SplitDevice};
use virtio_queue_core::{
    PackedQueue, QueueConfig, RingFeatures, RingLayout, SharedLine, SharedMemory, Slot, SplitQueue,
};

/// Runs `f` on a split queue of `size` and a split device over the same ring.
pub fn with_split<R>(
    size: u16,
    features: RingFeatures,
    f: impl FnOnce(&mut SplitQueue<'_, u32>, &mut SplitDevice<'_>, SharedMemory<'_>) -> R,
) -> R {
    let layout = RingLayout::split(size).unwrap();
    let lines: Vec<SharedLine> = (0..layout.lines()).map(|_| SharedLine::new()).collect();
    let ring = SharedMemory::new(&lines);
    let mut slots: Vec<Slot<u32>> = (0..size).map(|_| Slot::new()).collect();
    let mut q = SplitQueue::new(
        QueueConfig { queue_size: size, ring, ring_iova: 0x10000, features, indirect: None },
        slots.as_mut_slice(),
    )
    .unwrap();
    let mut dev = SplitDevice::new(DeviceConfig { layout, ring, features, memory: &[] }).unwrap();
    f(&mut q, &mut dev, ring)
}

/// Runs `f` on a packed queue of `size` and a packed device over the same
/// ring (`features` gain RING_PACKED).
pub fn with_packed<R>(
    size: u16,
    features: RingFeatures,
    f: impl FnOnce(&mut PackedQueue<'_, u32>, &mut PackedDevice<'_>, SharedMemory<'_>) -> R,
) -> R {
    let layout = RingLayout::packed(size).unwrap();
    let lines: Vec<SharedLine> = (0..layout.lines()).map(|_| SharedLine::new()).collect();
    let ring = SharedMemory::new(&lines);
    let mut slots: Vec<Slot<u32>> = (0..size).map(|_| Slot::new()).collect();
    let features = features | RingFeatures::RING_PACKED;
    let mut q = PackedQueue::new(
        QueueConfig { queue_size: size, ring, ring_iova: 0x10000, features, indirect: None },
        slots.as_mut_slice(),
    )
    .unwrap();
    let mut dev = PackedDevice::new(DeviceConfig { layout, ring, features, memory: &[] }).unwrap();
    f(&mut q, &mut dev, ring)
}
