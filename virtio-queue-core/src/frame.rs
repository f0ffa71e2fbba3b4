//! Framed chains: a device-readable header, one data buffer and a
//! device-writable status, where header and status sit at fixed addresses
//! chosen by the chain's id (virtio 1.2 §2.6.4 "Message Framing": the
//! framing of a request is the driver's choice).
//!
//! Block, SCSI and crypto requests all have this shape, and a device crate
//! that keeps its per-request headers in an array indexed by the chain id
//! ([`crate::SplitQueue::next_id`]) knows both ends of every chain before it
//! adds it. [`ChainFrame`] tells the queue where they are once, so that
//! [`crate::SplitQueue::add_framed`] and [`crate::PackedQueue::add_framed`]
//! take only the data buffer: no buffer slices, no per-request checks of the
//! fixed ends, and no rewrite of the header and status descriptors a chain of
//! the same id left in the split ring's table or in the id's indirect table.
//! With indirect tables of three or more entries a framed chain takes one
//! ring descriptor (its id's table), as [`crate::SplitQueue::add`] would put
//! it, so a queue holds as many framed chains as it has entries.

use crate::layout::LayoutError;
use crate::Buffer;

/// Where the fixed ends of a framed chain are: chain `id`'s header is the
/// `header_len` bytes at `iova + id × stride` (device-readable), its status
/// the `status_len` bytes at `iova + id × stride + status_offset`
/// (device-writable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainFrame {
    /// Device address of chain 0's header.
    pub iova: u64,
    /// Bytes from one chain's header to the next chain's.
    pub stride: u32,
    /// Length of every header; not zero.
    pub header_len: u32,
    /// Offset of the status from the header.
    pub status_offset: u32,
    /// Length of every status; not zero.
    pub status_len: u32,
}

/// A [`ChainFrame`] checked against a queue size, with what `add_framed`
/// needs precomputed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Frame {
    pub iova: u64,
    pub stride: u64,
    pub header_len: u32,
    pub status_offset: u64,
    pub status_len: u32,
    /// One more than the longest data buffer: the chain stays within
    /// `u32::MAX` bytes (§2.7.13.1). 0 while no frame is set, so that
    /// `data.len - 1 < max_data` (wrapping) is the one test of "a frame is
    /// set, the data is not empty and the chain is not too long" (the queues
    /// keep a copy that is also 0 while their fast path is closed).
    pub max_data: u32,
}

impl Frame {
    /// No frame: every `add_framed` takes its slow path and fails.
    pub const NONE: Frame = Frame { iova: 0, stride: 0, header_len: 0, status_offset: 0, status_len: 0, max_data: 0 };

    /// Checks `f` for a queue of `queue_size` chains: both ends non-empty,
    /// every chain's ends inside the 64-bit address space, and room for a
    /// data byte within the 4 GiB a chain may have.
    pub fn new(f: ChainFrame, queue_size: u16) -> Result<Frame, LayoutError> {
        let fixed = u64::from(f.header_len) + u64::from(f.status_len);
        let last = u64::from(queue_size.saturating_sub(1)) * u64::from(f.stride);
        let header_end = last.checked_add(u64::from(f.header_len));
        let status_end =
            last.checked_add(u64::from(f.status_offset)).and_then(|e| e.checked_add(u64::from(f.status_len)));
        let fits = |end: Option<u64>| end.and_then(|e| f.iova.checked_add(e)).is_some();
        if f.header_len == 0
            || f.status_len == 0
            || fixed >= u64::from(u32::MAX)
            || !fits(header_end)
            || !fits(status_end)
        {
            return Err(LayoutError::InvalidChainFrame);
        }
        Ok(Frame {
            iova: f.iova,
            stride: u64::from(f.stride),
            header_len: f.header_len,
            status_offset: u64::from(f.status_offset),
            status_len: f.status_len,
            // `fixed < u32::MAX`, so at least 1: a one-byte data buffer fits.
            max_data: (u64::from(u32::MAX) - fixed) as u32,
        })
    }

    /// Whether a frame is set.
    #[inline(always)]
    pub fn is_set(&self) -> bool {
        self.max_data != 0
    }

    /// Device address of chain `id`'s header (the addition cannot overflow:
    /// checked by [`Frame::new`] for every id below the queue size).
    #[inline(always)]
    pub fn header_addr(&self, id: u16) -> u64 {
        self.iova.wrapping_add(u64::from(id).wrapping_mul(self.stride))
    }

    /// Chain `id`'s header buffer.
    #[inline(always)]
    pub fn header(&self, id: u16) -> Buffer {
        Buffer::new(self.header_addr(id), self.header_len)
    }

    /// Chain `id`'s status buffer.
    #[inline(always)]
    pub fn status(&self, id: u16) -> Buffer {
        Buffer::new(self.header_addr(id).wrapping_add(self.status_offset), self.status_len)
    }

    /// The chain's writable bytes: the status, and the data if the device
    /// writes it (within `u32::MAX` for data shorter than `max_data`).
    #[inline(always)]
    pub fn writable(&self, data: &Buffer, data_writable: bool) -> u32 {
        if data_writable {
            data.len + self.status_len
        } else {
            self.status_len
        }
    }
}

/// The framed fast paths' state, the same for both ring formats: which layout
/// framed chains take, and the bound of each layout's fast path.
///
/// A bound is one more than the longest data buffer its fast path takes: the
/// frame's `max_data` for the layout chosen, 0 for the other and for both
/// while the queue has no frame or is broken. A 0 closes that path with the
/// same comparison that checks the data length.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FramedPaths {
    /// Bound of the direct path (three ring descriptors or positions).
    pub direct: u32,
    /// Bound of the indirect path (one ring descriptor or position and the
    /// chain id's table, as `add` would put the chain).
    pub indirect: u32,
    /// Whether framed chains go into indirect tables.
    pub in_tables: bool,
}

impl FramedPaths {
    /// Both paths closed; framed chains in tables if the tables (of
    /// `table_entries` each) hold one.
    pub fn new(table_entries: u16) -> Self {
        FramedPaths { direct: 0, indirect: 0, in_tables: table_entries >= 3 }
    }

    /// Opens the chosen layout's path with `frame`'s bound (closed while
    /// `broken`) and closes the other.
    pub fn open(&mut self, frame: &Frame, broken: bool) {
        let bound = if broken { 0 } else { frame.max_data };
        (self.direct, self.indirect) = if self.in_tables { (0, bound) } else { (bound, 0) };
    }

    /// Closes both paths (a broken queue).
    pub fn close(&mut self) {
        (self.direct, self.indirect) = (0, 0);
    }

    /// Chooses the layout; tables need three entries (`table_entries`).
    /// Call [`FramedPaths::open`] after.
    pub fn choose(&mut self, in_tables: bool, table_entries: u16) -> Result<(), LayoutError> {
        if in_tables && table_entries < 3 {
            return Err(LayoutError::IndirectTablesTooSmall);
        }
        self.in_tables = in_tables;
        Ok(())
    }
}
