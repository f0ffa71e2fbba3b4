//! Ring layouts of the virtio 1.2 specification (§2.7 split, §2.8 packed).
//!
//! The structures here are the bytes the driver and the device exchange, as
//! [`zerocopy`] types with explicit little-endian fields. The queue code never
//! reads or writes them through references (the device may change them at any
//! time); it uses their field offsets with the atomic accessors of
//! [`crate::shared`]. [`RingLayout`] says where each part of a queue lives in a
//! ring area of a given queue size and format.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::shared::SharedLine;

/// Largest queue size either format allows (§2.6: "Queue Size ... maximum is 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// A split-ring descriptor (§2.7.5): one buffer of guest memory.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SplitDescriptor {
    /// Device address of the buffer.
    pub addr: U64,
    /// Length of the buffer in bytes.
    pub len: U32,
    /// [`DescFlags`]: `NEXT`, `WRITE`, `INDIRECT`.
    pub flags: U16,
    /// Index of the next descriptor of the chain when `NEXT` is set.
    pub next: U16,
}

/// Header of the split-ring driver area, the available ring (§2.7.6).
///
/// `ring: [le16; queue_size]` follows, then `used_event: le16` when
/// VIRTIO_F_EVENT_IDX is negotiated.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct SplitAvailHeader {
    /// [`AvailFlags`].
    pub flags: U16,
    /// Where the driver will put the next available entry (free-running).
    pub idx: U16,
}

/// Header of the split-ring device area, the used ring (§2.7.8).
///
/// `ring: [SplitUsedElem; queue_size]` follows, then `avail_event: le16`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct SplitUsedHeader {
    /// [`UsedFlags`].
    pub flags: U16,
    /// Where the device will put the next used entry (free-running).
    pub idx: U16,
}

/// One used-ring element (§2.7.8).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct SplitUsedElem {
    /// Head descriptor index of the used chain.
    pub id: U32,
    /// Bytes the device wrote into the chain's writable buffers.
    pub len: U32,
}

/// A packed-ring descriptor (§2.8.13), also used in indirect tables of packed queues.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PackedDescriptor {
    /// Device address of the buffer.
    pub addr: U64,
    /// Length of the buffer; in a used descriptor, the bytes written.
    pub len: U32,
    /// Buffer ID.
    pub id: U16,
    /// [`DescFlags`], including the `AVAIL` and `USED` wrap bits.
    pub flags: U16,
}

/// Packed-ring event suppression structure (§2.8.10), one for each direction.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct PackedEventSuppression {
    /// Descriptor ring offset (bits 0..15) and wrap counter (bit 15) of the
    /// event, valid when `flags` is [`PackedEventFlags::Desc`].
    pub off_wrap: U16,
    /// [`PackedEventFlags`] in bits 0..2.
    pub flags: U16,
}

bitflags::bitflags! {
    /// Descriptor flags of both formats (§2.7.5, §2.8.1).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct DescFlags: u16 {
        /// The chain continues (split: at `next`; packed: at the following slot).
        const NEXT = 1;
        /// The buffer is device-writable (otherwise device-readable).
        const WRITE = 2;
        /// The buffer holds a table of indirect descriptors.
        const INDIRECT = 4;
        /// Packed: the driver's avail wrap bit.
        const AVAIL = 1 << 7;
        /// Packed: the device's used wrap bit.
        const USED = 1 << 15;
    }

    /// Split available-ring flags (§2.7.6).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct AvailFlags: u16 {
        /// The driver does not want used-buffer notifications (ignored by the
        /// device when VIRTIO_F_EVENT_IDX is negotiated).
        const NO_INTERRUPT = 1;
    }

    /// Split used-ring flags (§2.7.8).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct UsedFlags: u16 {
        /// The device does not want available-buffer notifications (ignored by
        /// the driver when VIRTIO_F_EVENT_IDX is negotiated).
        const NO_NOTIFY = 1;
    }

    /// Device feature bits that change how a virtqueue works (§6), at their
    /// specification bit positions so `RingFeatures::from_bits_truncate(negotiated)`
    /// picks them out of a 64-bit feature word.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct RingFeatures: u64 {
        /// VIRTIO_F_INDIRECT_DESC (28): indirect descriptor tables.
        const INDIRECT_DESC = 1 << 28;
        /// VIRTIO_F_EVENT_IDX (29): `used_event` / `avail_event` notification suppression.
        const EVENT_IDX = 1 << 29;
        /// VIRTIO_F_RING_PACKED (34): the packed layout.
        const RING_PACKED = 1 << 34;
        /// VIRTIO_F_IN_ORDER (35): buffers are used in the order they were made available.
        const IN_ORDER = 1 << 35;
    }
}

/// Values of [`PackedEventSuppression::flags`] (§2.8.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum PackedEventFlags {
    /// Notify on every event.
    Enable = 0,
    /// Do not notify.
    Disable = 1,
    /// Notify when the position in `off_wrap` is reached (needs VIRTIO_F_EVENT_IDX).
    Desc = 2,
}

/// The two virtqueue formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RingFormat {
    /// Descriptor table, available ring and used ring (§2.7).
    Split,
    /// One descriptor ring with wrap counters (§2.8).
    Packed,
}

/// Why a queue size or ring area does not work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// Zero, above 32768, or (split format) not a power of two.
    InvalidQueueSize {
        /// The size asked for.
        size: u16,
        /// The format it was asked for.
        format: RingFormat,
    },
    /// The memory given is smaller than the layout needs.
    AreaTooSmall {
        /// Bytes the layout needs.
        needed: usize,
        /// Bytes given.
        given: usize,
    },
    /// A device address does not have the alignment the specification requires.
    MisalignedAddress {
        /// The address.
        addr: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// The slot array is shorter than the queue size.
    TooFewSlots {
        /// Slots needed (the queue size).
        needed: usize,
        /// Slots given.
        given: usize,
    },
    /// The indirect tables do not give every slot a table of at least one entry.
    IndirectTablesTooSmall,
    /// A [`crate::ChainFrame`] with an empty header or status, ends beyond
    /// the 64-bit address space, or no room for data within 4 GiB.
    InvalidChainFrame,
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            LayoutError::InvalidQueueSize { size, format } => {
                write!(f, "queue size {size} is not valid for a {format:?} virtqueue")
            }
            LayoutError::AreaTooSmall { needed, given } => {
                write!(f, "ring area of {given} bytes is smaller than the {needed} bytes needed")
            }
            LayoutError::MisalignedAddress { addr, align } => {
                write!(f, "device address {addr:#x} is not {align}-byte aligned")
            }
            LayoutError::TooFewSlots { needed, given } => {
                write!(f, "{given} slots given for a queue of {needed}")
            }
            LayoutError::IndirectTablesTooSmall => {
                write!(f, "indirect tables too small for the queue")
            }
            LayoutError::InvalidChainFrame => write!(f, "chain frame does not fit the queue"),
        }
    }
}

/// Every area starts on a cache line so the driver-written and device-written
/// parts never share one (this is stricter than the 16/2/4 (split) and 16/4/4
/// (packed) byte alignments the specification asks for, §2.7 and §2.8.10).
pub const AREA_ALIGN: usize = 64;

/// Alignment the specification requires of the descriptor area (both formats).
pub const DESC_ALIGN: u64 = 16;

/// Where the three parts of one virtqueue live inside a ring area.
///
/// The descriptor area (split: descriptor table; packed: descriptor ring)
/// starts at offset 0, the driver area (split: available ring; packed: driver
/// event suppression) and the device area (split: used ring; packed: device
/// event suppression) follow, each on a 64-byte boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    format: RingFormat,
    queue_size: u16,
    driver_offset: usize,
    device_offset: usize,
    total: usize,
}

const fn align_up(x: usize, a: usize) -> usize {
    (x + a - 1) & !(a - 1)
}

impl RingLayout {
    /// The layout of a split virtqueue of `queue_size` entries (a power of two, 1..=32768).
    pub const fn split(queue_size: u16) -> Result<Self, LayoutError> {
        if queue_size == 0 || queue_size > MAX_QUEUE_SIZE || !queue_size.is_power_of_two() {
            return Err(LayoutError::InvalidQueueSize { size: queue_size, format: RingFormat::Split });
        }
        let n = queue_size as usize;
        let driver_offset = align_up(16 * n, AREA_ALIGN);
        let device_offset = align_up(driver_offset + 6 + 2 * n, AREA_ALIGN);
        let total = align_up(device_offset + 6 + 8 * n, AREA_ALIGN);
        Ok(RingLayout { format: RingFormat::Split, queue_size, driver_offset, device_offset, total })
    }

    /// The layout of a packed virtqueue of `queue_size` entries (any size 1..=32768).
    pub const fn packed(queue_size: u16) -> Result<Self, LayoutError> {
        if queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
            return Err(LayoutError::InvalidQueueSize { size: queue_size, format: RingFormat::Packed });
        }
        let n = queue_size as usize;
        let driver_offset = align_up(16 * n, AREA_ALIGN);
        let device_offset = driver_offset + AREA_ALIGN;
        let total = device_offset + AREA_ALIGN;
        Ok(RingLayout { format: RingFormat::Packed, queue_size, driver_offset, device_offset, total })
    }

    /// The layout of `format` at `queue_size`.
    pub const fn new(format: RingFormat, queue_size: u16) -> Result<Self, LayoutError> {
        match format {
            RingFormat::Split => Self::split(queue_size),
            RingFormat::Packed => Self::packed(queue_size),
        }
    }

    /// The ring format.
    pub const fn format(&self) -> RingFormat {
        self.format
    }

    /// Number of entries.
    pub const fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Offset of the descriptor area (always 0).
    pub const fn desc_offset(&self) -> usize {
        0
    }

    /// Bytes of the descriptor area: 16 per entry in both formats.
    pub const fn desc_size(&self) -> usize {
        16 * self.queue_size as usize
    }

    /// Offset of the driver area.
    pub const fn driver_offset(&self) -> usize {
        self.driver_offset
    }

    /// Bytes of the driver area: split `6 + 2 × size`; packed 4.
    pub const fn driver_size(&self) -> usize {
        match self.format {
            RingFormat::Split => 6 + 2 * self.queue_size as usize,
            RingFormat::Packed => 4,
        }
    }

    /// Offset of the device area.
    pub const fn device_offset(&self) -> usize {
        self.device_offset
    }

    /// Bytes of the device area: split `6 + 8 × size`; packed 4.
    pub const fn device_size(&self) -> usize {
        match self.format {
            RingFormat::Split => 6 + 8 * self.queue_size as usize,
            RingFormat::Packed => 4,
        }
    }

    /// Alignment the specification requires of the driver area (split 2, packed 4).
    pub const fn driver_align(&self) -> u64 {
        match self.format {
            RingFormat::Split => 2,
            RingFormat::Packed => 4,
        }
    }

    /// Alignment the specification requires of the device area (4 in both formats).
    pub const fn device_align(&self) -> u64 {
        4
    }

    /// Total bytes of the ring area, a multiple of 64.
    pub const fn size(&self) -> usize {
        self.total
    }

    /// Device addresses of the three areas of a ring area at device address
    /// `base`, for the transport to program into the device.
    pub const fn addresses(&self, base: u64) -> crate::QueueAddresses {
        crate::QueueAddresses {
            desc: base,
            driver: base + self.driver_offset as u64,
            device: base + self.device_offset as u64,
        }
    }

    /// Number of [`SharedLine`]s that hold the ring area.
    pub const fn lines(&self) -> usize {
        self.total / SharedLine::BYTES
    }
}

/// [`SharedLine`]s needed for a ring of `format` at `queue_size`, or 0 if the
/// size is not valid; for sizing static arrays:
///
/// ```
/// use virtio_queue_core::{layout::{ring_lines, RingFormat}, shared::SharedLine};
/// static RING: [SharedLine; ring_lines(RingFormat::Split, 64)] = [SharedLine::ZERO; ring_lines(RingFormat::Split, 64)];
/// assert_eq!(RING.len() * 64, 64 * 16 + 192 + 576);
/// ```
pub const fn ring_lines(format: RingFormat, queue_size: u16) -> usize {
    match RingLayout::new(format, queue_size) {
        Ok(l) => l.lines(),
        Err(_) => 0,
    }
}

/// Byte offsets of the fields the queue code touches, derived from the
/// structures above so the two cannot disagree.
pub(crate) mod off {
    use super::*;
    use core::mem::{offset_of, size_of};

    pub const DESC_SIZE: usize = size_of::<SplitDescriptor>();
    pub const SPLIT_DESC_ADDR: usize = offset_of!(SplitDescriptor, addr);
    pub const SPLIT_DESC_LEN: usize = offset_of!(SplitDescriptor, len);
    pub const SPLIT_DESC_FLAGS: usize = offset_of!(SplitDescriptor, flags);
    pub const SPLIT_DESC_NEXT: usize = offset_of!(SplitDescriptor, next);
    pub const AVAIL_FLAGS: usize = offset_of!(SplitAvailHeader, flags);
    pub const AVAIL_IDX: usize = offset_of!(SplitAvailHeader, idx);
    pub const AVAIL_RING: usize = size_of::<SplitAvailHeader>();
    pub const USED_FLAGS: usize = offset_of!(SplitUsedHeader, flags);
    pub const USED_IDX: usize = offset_of!(SplitUsedHeader, idx);
    pub const USED_RING: usize = size_of::<SplitUsedHeader>();
    pub const USED_ELEM_SIZE: usize = size_of::<SplitUsedElem>();
    pub const USED_ELEM_ID: usize = offset_of!(SplitUsedElem, id);
    pub const USED_ELEM_LEN: usize = offset_of!(SplitUsedElem, len);
    pub const PACKED_DESC_ADDR: usize = offset_of!(PackedDescriptor, addr);
    pub const PACKED_DESC_LEN: usize = offset_of!(PackedDescriptor, len);
    pub const PACKED_DESC_ID: usize = offset_of!(PackedDescriptor, id);
    pub const PACKED_DESC_FLAGS: usize = offset_of!(PackedDescriptor, flags);
    pub const EVENT_OFF_WRAP: usize = offset_of!(PackedEventSuppression, off_wrap);
    pub const EVENT_FLAGS: usize = offset_of!(PackedEventSuppression, flags);

    const _: () = assert!(size_of::<SplitDescriptor>() == 16);
    const _: () = assert!(size_of::<PackedDescriptor>() == 16);
    const _: () = assert!(size_of::<SplitUsedElem>() == 8);
    const _: () = assert!(size_of::<PackedEventSuppression>() == 4);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_sizes_follow_the_spec() {
        let l = RingLayout::split(256).unwrap();
        assert_eq!(l.desc_size(), 4096);
        assert_eq!(l.driver_offset(), 4096);
        assert_eq!(l.driver_size(), 6 + 512);
        assert_eq!(l.device_offset(), 4096 + 576);
        assert_eq!(l.device_size(), 6 + 2048);
        assert_eq!(l.size() % AREA_ALIGN, 0);
        assert!(l.device_offset() + l.device_size() <= l.size());
    }

    #[test]
    fn split_rejects_non_power_of_two() {
        for bad in [0u16, 3, 100, 32767] {
            assert_eq!(
                RingLayout::split(bad),
                Err(LayoutError::InvalidQueueSize { size: bad, format: RingFormat::Split })
            );
        }
        assert!(RingLayout::split(u16::MAX).is_err());
        assert!(RingLayout::split(32768).is_ok());
        assert!(RingLayout::split(1).is_ok());
    }

    #[test]
    fn packed_allows_any_size_up_to_32768() {
        for good in [1u16, 3, 100, 255, 32767, 32768] {
            let l = RingLayout::packed(good).unwrap();
            assert_eq!(l.desc_size(), 16 * good as usize);
            assert!(l.driver_offset() >= l.desc_size());
            assert!(l.device_offset() >= l.driver_offset() + 4);
            assert_eq!(l.size() % AREA_ALIGN, 0);
        }
        assert!(RingLayout::packed(0).is_err());
        assert!(RingLayout::packed(32769).is_err());
    }

    #[test]
    fn areas_are_aligned_and_disjoint() {
        for n in 1..=600u16 {
            for l in [RingLayout::packed(n).ok(), RingLayout::split(n).ok()].into_iter().flatten() {
                assert_eq!(l.driver_offset() % l.driver_align() as usize, 0);
                assert_eq!(l.device_offset() % l.device_align() as usize, 0);
                assert!(l.desc_size() <= l.driver_offset());
                assert!(l.driver_offset() + l.driver_size() <= l.device_offset());
                assert!(l.device_offset() + l.device_size() <= l.size());
            }
        }
    }
}
