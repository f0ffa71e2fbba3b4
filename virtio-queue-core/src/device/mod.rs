//! The device side of both ring formats, as a small reference model
//! (feature `device-model`).
//!
//! [`SplitDevice`] and [`PackedDevice`] play the device of one virtqueue over
//! the same [`SharedMemory`] the driver queue uses. They touch ring memory only
//! through the accessors of [`crate::shared`], each field with the same kind
//! (synchronising or data) the driver uses, so under `cfg(loom)` the models
//! take part in loom's checking of the real driver code.
//!
//! The model is strict: every rule of the specification that a driver must
//! follow when making buffers available is checked, and a violation is a
//! [`ModelError`] (the model never panics and never reads outside the memory
//! it was given). It can also misbehave on purpose (`*_raw` methods) so tests
//! can check the driver's defences against a hostile device.
//!
//! Like the rest of the crate it is `no_std` and allocation-free: a popped
//! chain is an [`AvailChain`] value holding up to [`MAX_CHAIN`] descriptors.

use core::fmt;

use crate::layout::{off, DescFlags, RingFeatures, RingFormat, RingLayout};
use crate::shared::SharedMemory;

mod packed;
mod split;

pub use packed::{PackedAreas, PackedDevice};
pub use split::SplitDevice;

/// The most descriptors one [`AvailChain`] holds (and the most entries an
/// indirect table may have for the model).
pub const MAX_CHAIN: usize = 64;

/// One buffer of an available chain, as the device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DescInfo {
    /// Device address of the buffer.
    pub addr: u64,
    /// Length in bytes (never zero in a chain the model accepted).
    pub len: u32,
    /// Device-writable (otherwise device-readable).
    pub writable: bool,
}

/// A chain the driver made available, popped by a device model.
///
/// Its buffers are the direct descriptors of the chain, or the entries of its
/// indirect table.
#[derive(Clone, Copy)]
pub struct AvailChain {
    /// Split: the head descriptor index. Packed: the buffer ID (the `id` of the
    /// chain's last descriptor). This is what the device returns as used id.
    pub id: u16,
    /// Ring descriptors (split) or ring positions (packed) the chain occupies:
    /// 1 for an indirect chain.
    pub ring_descs: u16,
    /// Whether the buffers came from an indirect table.
    pub indirect: bool,
    descs: [DescInfo; MAX_CHAIN],
    count: usize,
}

impl AvailChain {
    fn new(id: u16) -> Self {
        AvailChain {
            id,
            ring_descs: 0,
            indirect: false,
            descs: [DescInfo { addr: 0, len: 0, writable: false }; MAX_CHAIN],
            count: 0,
        }
    }

    /// The chain's buffers, readable ones first.
    pub fn descriptors(&self) -> &[DescInfo] {
        self.descs.get(..self.count).unwrap_or(&[])
    }

    /// Total bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.descriptors().iter().filter(|d| !d.writable).map(|d| u64::from(d.len)).sum()
    }

    /// Total bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.descriptors().iter().filter(|d| d.writable).map(|d| u64::from(d.len)).sum()
    }

    /// Appends one buffer, checking the rules every chain follows: nonzero
    /// length, readable buffers before writable ones, at most [`MAX_CHAIN`]
    /// buffers and at most `u32::MAX` bytes in total (§2.7.13.1 / §2.8.21.1).
    fn push(&mut self, d: DescInfo) -> Result<(), ModelError> {
        if d.len == 0 {
            return Err(ModelError::ZeroLength);
        }
        if !d.writable && self.descriptors().last().is_some_and(|p| p.writable) {
            return Err(ModelError::ReadableAfterWritable);
        }
        let total = self.readable_len() + self.writable_len() + u64::from(d.len);
        if total > u64::from(u32::MAX) {
            return Err(ModelError::ChainTooManyBytes);
        }
        let slot = self.descs.get_mut(self.count).ok_or(ModelError::ChainExceedsModel)?;
        *slot = d;
        self.count += 1;
        Ok(())
    }
}

impl fmt::Debug for AvailChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AvailChain")
            .field("id", &self.id)
            .field("ring_descs", &self.ring_descs)
            .field("indirect", &self.indirect)
            .field("descriptors", &self.descriptors())
            .finish()
    }
}

impl PartialEq for AvailChain {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.ring_descs == other.ring_descs
            && self.indirect == other.indirect
            && self.descriptors() == other.descriptors()
    }
}

impl Eq for AvailChain {}

/// The driver broke the protocol in a way the model detected while popping an
/// available chain. The model's state is unchanged by a failed pop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelError {
    /// Split: the avail index moved by more than the queue size.
    AvailIndexJump {
        /// The avail index the driver wrote.
        avail_idx: u16,
        /// The device's next avail index to consume.
        last_avail: u16,
        /// The queue size.
        queue_size: u16,
    },
    /// Split: an avail ring entry names a descriptor not below the queue size.
    HeadOutOfRange {
        /// The head index found in the avail ring.
        head: u16,
        /// The queue size.
        queue_size: u16,
    },
    /// Split: a `next` index not below the queue size (or, inside an indirect
    /// table, the number of table entries).
    NextOutOfRange {
        /// The `next` index.
        next: u16,
        /// The bound it broke.
        limit: u16,
    },
    /// Split: a chain that returns to a descriptor it already went through.
    ChainLoop,
    /// A chain of more descriptors than the queue size (or the indirect table).
    ChainTooLong,
    /// A well-formed chain of more than [`MAX_CHAIN`] buffers: a limit of the
    /// model, not of the protocol.
    ChainExceedsModel,
    /// A chain whose buffers add up to more than `u32::MAX` bytes.
    ChainTooManyBytes,
    /// A device-readable buffer after a device-writable one.
    ReadableAfterWritable,
    /// A descriptor of length zero.
    ZeroLength,
    /// INDIRECT set while VIRTIO_F_INDIRECT_DESC was not negotiated.
    IndirectNotNegotiated,
    /// A descriptor with both INDIRECT and NEXT.
    IndirectWithNext,
    /// An INDIRECT descriptor that is not the first of its chain.
    IndirectInChain,
    /// INDIRECT set inside an indirect table.
    NestedIndirect,
    /// An indirect table length that is zero, not a multiple of 16, or more
    /// than [`MAX_CHAIN`] entries.
    IndirectTableBadLen {
        /// The length of the table in bytes.
        len: u32,
    },
    /// An indirect table not inside any [`MemoryRegion`] of the model.
    IndirectTableUnmapped {
        /// Device address of the table.
        addr: u64,
    },
    /// An indirect table not on a 16-byte boundary of its region.
    IndirectTableMisaligned {
        /// Device address of the table.
        addr: u64,
    },
    /// Packed: a chain continues (NEXT) into a descriptor the driver has not
    /// made available in the same lap.
    ChainIncomplete {
        /// Ring position of the descriptor that is not available.
        position: u16,
    },
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ModelError::AvailIndexJump { avail_idx, last_avail, queue_size } => {
                write!(f, "avail index moved from {last_avail} to {avail_idx} on a queue of size {queue_size}")
            }
            ModelError::HeadOutOfRange { head, queue_size } => {
                write!(f, "chain head {head} on a queue of size {queue_size}")
            }
            ModelError::NextOutOfRange { next, limit } => {
                write!(f, "next index {next} not below {limit}")
            }
            ModelError::ChainLoop => write!(f, "descriptor chain loops"),
            ModelError::ChainTooLong => write!(f, "descriptor chain longer than the queue"),
            ModelError::ChainExceedsModel => {
                write!(f, "descriptor chain longer than the model's {MAX_CHAIN} buffers")
            }
            ModelError::ChainTooManyBytes => write!(f, "descriptor chain longer than 4 GiB"),
            ModelError::ReadableAfterWritable => {
                write!(f, "device-readable descriptor after a device-writable one")
            }
            ModelError::ZeroLength => write!(f, "descriptor of length zero"),
            ModelError::IndirectNotNegotiated => {
                write!(f, "indirect descriptor without VIRTIO_F_INDIRECT_DESC")
            }
            ModelError::IndirectWithNext => write!(f, "descriptor with both INDIRECT and NEXT"),
            ModelError::IndirectInChain => write!(f, "indirect descriptor inside a chain"),
            ModelError::NestedIndirect => write!(f, "indirect descriptor inside an indirect table"),
            ModelError::IndirectTableBadLen { len } => {
                write!(f, "indirect table of {len} bytes")
            }
            ModelError::IndirectTableUnmapped { addr } => {
                write!(f, "indirect table at {addr:#x} is in no memory region")
            }
            ModelError::IndirectTableMisaligned { addr } => {
                write!(f, "indirect table at {addr:#x} is not 16-byte aligned")
            }
            ModelError::ChainIncomplete { position } => {
                write!(f, "chain continues into descriptor {position}, which is not available")
            }
        }
    }
}

/// Why a device model could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// The layout is of the other format.
    WrongFormat {
        /// The format of the model.
        expected: RingFormat,
        /// The format of the layout given.
        found: RingFormat,
    },
    /// The ring memory is smaller than the layout.
    RingTooSmall {
        /// Bytes the layout needs.
        needed: usize,
        /// Bytes given.
        given: usize,
    },
    /// A queue size of 0 or more than 32768.
    QueueSize {
        /// The size given.
        size: u16,
    },
    /// An event suppression area not 4-byte aligned or not inside its view.
    EventArea {
        /// Offset of the area in its view.
        offset: usize,
        /// Length of the view.
        len: usize,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ConfigError::WrongFormat { expected, found } => {
                write!(f, "a {expected:?} device model was given a {found:?} layout")
            }
            ConfigError::RingTooSmall { needed, given } => {
                write!(f, "ring memory of {given} bytes is smaller than the {needed} bytes needed")
            }
            ConfigError::QueueSize { size } => write!(f, "queue size {size} is not 1..=32768"),
            ConfigError::EventArea { offset, len } => {
                write!(f, "event suppression area at offset {offset} of {len} bytes: misaligned or outside")
            }
        }
    }
}

/// Memory the device can reach by device address: where the model finds
/// indirect tables.
#[derive(Clone, Copy, Debug)]
pub struct MemoryRegion<'a> {
    /// Device address of the first byte of `mem`.
    pub addr: u64,
    /// The memory.
    pub mem: SharedMemory<'a>,
}

/// What a device model works on.
#[derive(Clone, Copy, Debug)]
pub struct DeviceConfig<'a> {
    /// Where the parts of the ring are inside `ring`.
    pub layout: RingLayout,
    /// The ring area, the same memory the driver queue uses.
    pub ring: SharedMemory<'a>,
    /// Negotiated features that change the ring's behaviour.
    pub features: RingFeatures,
    /// Memory reachable by device address (indirect tables).
    pub memory: &'a [MemoryRegion<'a>],
}

impl DeviceConfig<'_> {
    /// Checks the layout format and the ring length.
    fn check(&self, format: RingFormat) -> Result<(), ConfigError> {
        if self.layout.format() != format {
            return Err(ConfigError::WrongFormat { expected: format, found: self.layout.format() });
        }
        if self.ring.len() < self.layout.size() {
            return Err(ConfigError::RingTooSmall { needed: self.layout.size(), given: self.ring.len() });
        }
        Ok(())
    }
}

/// The fields of one descriptor, read as data (both layouts have `addr` and
/// `len` at the same offsets; the last four bytes differ).
struct RawDesc {
    addr: u64,
    len: u32,
    /// Split: `flags`. Packed: `id`.
    word12: u16,
    /// Split: `next`. Packed: `flags` (only read this way inside indirect tables).
    word14: u16,
}

const _: () = assert!(off::SPLIT_DESC_ADDR == off::PACKED_DESC_ADDR);
const _: () = assert!(off::SPLIT_DESC_LEN == off::PACKED_DESC_LEN);
const _: () = assert!(off::SPLIT_DESC_FLAGS == off::PACKED_DESC_ID);
const _: () = assert!(off::SPLIT_DESC_NEXT == off::PACKED_DESC_FLAGS);

/// Reads all four fields of a descriptor as data fields.
///
/// # Safety
///
/// `at` is a multiple of 16 and `at + 16 <= mem.len()`.
unsafe fn read_desc_data(mem: &SharedMemory<'_>, at: usize) -> RawDesc {
    // SAFETY: the caller keeps the 16-byte descriptor at `at` inside `mem` and
    // 16-aligned, so every field offset below is aligned to its width and in bounds.
    unsafe {
        RawDesc {
            addr: mem.read_u64(at + off::SPLIT_DESC_ADDR),
            len: mem.read_u32(at + off::SPLIT_DESC_LEN),
            word12: mem.read_u16(at + off::SPLIT_DESC_FLAGS),
            word14: mem.read_u16(at + off::SPLIT_DESC_NEXT),
        }
    }
}

/// Finds the indirect table of `len` bytes at device address `addr` and
/// returns it as a window of exactly `len` bytes, with its number of entries.
fn find_table<'a>(memory: &[MemoryRegion<'a>], addr: u64, len: u32) -> Result<(SharedMemory<'a>, u16), ModelError> {
    let entries = len as usize / off::DESC_SIZE;
    if len == 0 || len as usize % off::DESC_SIZE != 0 || entries > MAX_CHAIN {
        return Err(ModelError::IndirectTableBadLen { len });
    }
    for r in memory {
        let Some(offset) = addr.checked_sub(r.addr) else { continue };
        let Ok(offset) = usize::try_from(offset) else { continue };
        let Some(end) = offset.checked_add(len as usize) else { continue };
        if end > r.mem.len() {
            continue;
        }
        let table = r.mem.slice(offset, len as usize).ok_or(ModelError::IndirectTableMisaligned { addr })?;
        // `entries <= MAX_CHAIN`, so this cannot truncate.
        return Ok((table, entries as u16));
    }
    Err(ModelError::IndirectTableUnmapped { addr })
}

/// The flag bits of a split descriptor (or packed table entry) that the model knows.
fn desc_flags(bits: u16) -> DescFlags {
    DescFlags::from_bits_truncate(bits)
}

/// Helpers for the tests of both models: ring memory and a driver written by hand.
#[cfg(test)]
pub(super) mod test_util {
    use crate::layout::RingLayout;
    use crate::shared::SharedLine;

    /// Zeroed lines for `layout`.
    pub fn lines_for(layout: &RingLayout) -> Vec<SharedLine> {
        (0..layout.lines()).map(|_| SharedLine::new()).collect()
    }

    /// `n` zeroed lines (for indirect tables).
    pub fn lines(n: usize) -> Vec<SharedLine> {
        (0..n).map(|_| SharedLine::new()).collect()
    }
}
