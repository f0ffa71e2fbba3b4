//! The checks a request passes before it touches the ring. Every failure is
//! a [`BlkError`] variant, found in the same order on every path: for a
//! read or write, read-only, then segment count and size, then alignment,
//! then range; then whether the queue is usable, then whether it is full.
//!
//! One-buffer reads and writes (the hot path) first run [`FastLimits::one_ok`],
//! the same conditions folded into one branch; only when it fails are the
//! checks run one by one to find which error to return.

use virtio_queue_core::DriverQueue;
use virtio_transport_api::{Cause, Error, Step, Transport};

use super::BlkQueue;
use crate::buf::DmaBuf;
use crate::config::BlkFeatures;
use crate::error::{BlkError, Result};
use crate::spec::SECTOR_SIZE;

/// The largest request the driver builds: its data length goes into a 32-bit
/// descriptor length, with room for the header and status.
const MAX_TOTAL: u64 = u32::MAX as u64 - 64;

/// What the driver checks requests against.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) capacity_bytes: u64,
    pub(crate) block_size: u32,
    pub(crate) max_segments: usize,
    pub(crate) size_max: u64,
    pub(crate) features: BlkFeatures,
    pub(crate) max_discard_sectors: u32,
    pub(crate) max_write_zeroes_sectors: u32,
    pub(crate) max_secure_erase_sectors: u32,
}

/// [`Limits`] precomputed for the one-buffer check.
#[derive(Clone, Copy, Debug)]
pub(super) struct FastLimits {
    /// `block_size - 1` (the block size is a power of two, checked at open).
    block_mask: u64,
    capacity: u64,
    /// The longest one-buffer request: `size_max`, [`MAX_TOTAL`] and the
    /// capacity (so that `capacity - len` cannot wrap for a length that
    /// passes); 0 once the queue has failed, so that every request takes the
    /// slow path, which finds the error.
    max_one: u64,
    read_only: bool,
}

impl FastLimits {
    pub(super) fn new(l: &Limits) -> Self {
        FastLimits {
            block_mask: u64::from(l.block_size) - 1,
            capacity: l.capacity_bytes,
            max_one: l.size_max.min(MAX_TOTAL).min(l.capacity_bytes),
            read_only: l.features.contains(BlkFeatures::RO),
        }
    }

    /// Refuses every request from now on (the queue failed).
    pub(super) fn close(&mut self) {
        self.max_one = 0;
    }

    /// Whether a one-buffer request of `len` bytes at `offset` passes every
    /// check of [`BlkQueue::check_one`] on a queue that has not failed, with
    /// one branch for the caller.
    #[inline(always)]
    pub(super) fn one_ok(&self, offset: u64, len: u64, write: bool) -> bool {
        // `len == 0` wraps to the maximum: refused like an oversized one.
        let bad_len = len.wrapping_sub(1) >= self.max_one;
        let misaligned = (offset | len) & self.block_mask != 0;
        // `len <= max_one <= capacity` unless `bad_len`: no wrap then.
        let past_end = offset > self.capacity.wrapping_sub(len);
        let read_only = write & self.read_only;
        !(bad_len | misaligned | past_end | read_only)
    }
}

impl<T: Transport> BlkQueue<T> {
    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let mask = u64::from(self.limits.block_size) - 1;
        if len == 0 || (offset | len) & mask != 0 {
            return Err(BlkError::Misaligned { offset, len, block_size: self.limits.block_size });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.limits.capacity_bytes => Ok(()),
            _ => Err(BlkError::OutOfRange { offset, len, capacity: self.limits.capacity_bytes }),
        }
    }

    pub(super) fn check_writable(&self) -> Result<()> {
        if self.limits.features.contains(BlkFeatures::RO) {
            return Err(BlkError::ReadOnly);
        }
        Ok(())
    }

    pub(super) fn check_feature(&self, f: BlkFeatures) -> Result<()> {
        if !self.limits.features.contains(f) {
            return Err(BlkError::Unsupported(f));
        }
        Ok(())
    }

    /// The checks of a one-buffer read or write, in the order of
    /// [`BlkQueue::check_segments`] for one segment.
    pub(super) fn check_one(&self, offset: u64, len: u64, write: bool) -> Result<()> {
        if write {
            self.check_writable()?;
        }
        if len > self.limits.size_max {
            return Err(BlkError::SegmentTooLarge { len, max: self.limits.size_max });
        }
        if len > MAX_TOTAL {
            return Err(BlkError::SegmentTooLarge { len, max: MAX_TOTAL });
        }
        self.check_range(offset, len)
    }

    pub(super) fn check_segments(&self, bufs: &[DmaBuf]) -> Result<u64> {
        let n = bufs.len();
        if n == 0 || n > self.limits.max_segments {
            return Err(BlkError::TooManySegments { segments: n, max: self.limits.max_segments });
        }
        let mut total = 0u64;
        for b in bufs {
            let len = b.len() as u64;
            if len > self.limits.size_max {
                return Err(BlkError::SegmentTooLarge { len, max: self.limits.size_max });
            }
            total += len;
        }
        if total > MAX_TOTAL {
            return Err(BlkError::SegmentTooLarge { len: total, max: MAX_TOTAL });
        }
        Ok(total)
    }

    pub(super) fn check_discard_like(
        &self,
        offset: u64,
        len: u64,
        feature: BlkFeatures,
        max_sectors: u32,
    ) -> Result<()> {
        self.check_feature(feature)?;
        self.check_writable()?;
        self.check_range(offset, len)?;
        let max = if max_sectors == 0 { u64::from(u32::MAX) } else { u64::from(max_sectors) } * SECTOR_SIZE;
        if len > max.min(u64::from(u32::MAX) * SECTOR_SIZE) {
            return Err(BlkError::SegmentTooLarge { len, max });
        }
        Ok(())
    }

    /// Whether the queue takes requests: not after a dead transport or a
    /// broken ring. A ring the device broke sets `failed` too (every queue
    /// operation that can see a device error goes through `fail_all`), and
    /// the core queue refuses chains on a broken ring anyway.
    #[inline]
    pub(super) fn check_live(&self) -> Result<()> {
        if self.failed {
            return Err(self.dead_error());
        }
        Ok(())
    }

    /// Why the queue refuses requests (a dead transport or a broken ring).
    #[cold]
    #[inline(never)]
    fn dead_error(&self) -> BlkError {
        if let Some((name, msg)) = &self.dead {
            return BlkError::Transport(Error::new(name, Step::Queue(self.index), Cause::Disconnected(msg.clone())));
        }
        if let Some(e) = self.broken {
            return BlkError::Queue(e);
        }
        if let Some(e) = self.vq.broken() {
            return BlkError::Queue(virtio_queue_core::Error::Broken(e));
        }
        // Not reached: `failed` is only set with `dead` or `broken`.
        BlkError::Transport(Error::new(self.name, Step::Queue(self.index), Cause::Protocol("failed".into())))
    }
}
