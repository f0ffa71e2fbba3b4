//! The request areas: per request id, the header the device reads, the
//! status word the device writes, and the extra buffers of the rarer
//! requests, in device-visible memory.
//!
//! # Layout, and why
//!
//! One 64-byte area per id, at `id × 64`, one cache line each:
//!
//! | offset | field                                                      |
//! |--------|------------------------------------------------------------|
//! | 0      | the 16-byte request header                                 |
//! | 16     | the discard/write-zeroes segment (16 bytes)                |
//! | 32     | the status word: the status byte (its low byte) and the slow-path mark above it; nothing else, so it is preset and read with one 8-byte access |
//! | 40     | the 20-byte ID buffer (GET_ID)                             |
//!
//! A request's header and status share its line, so a device serves a
//! request touching one line of request memory. Splitting them into
//! separate arrays, four entries to a line, was measured on 2026-12-05
//! against qemu-storage-daemon (pinned to CPU 1, `vblk bench --vhost-user
//! SOCK --rw randread --bs 4096 --iodepth 32 --runtime 3 --interrupt --json`
//! on CPU 0, alternating with `bench/virtio-driver-ref`): it did not lower the
//! driver's CPU per request in interrupt mode (304–311 ns against 298–311 over
//! three runs each), and in poll mode (eight alternating 1 s rounds) it made
//! 0.92× the reference's IOPS against 0.95× with one line per request. So
//! each request keeps its own line.

use virtio_queue_core::{ChainFrame, SharedMemory, UsedIdHint};

use super::{S_PRESET, W_SLOW};
use crate::spec::{HEADER_LEN, ID_LEN, SEGMENT_LEN};

/// Bytes per area.
const AREA: usize = 64;
const A_HDR: usize = 0;
const A_SEG: usize = 16;
const A_STATUS: usize = 32;
const A_ID: usize = 40;

const _: () = assert!(
    A_HDR + HEADER_LEN <= A_SEG && A_SEG + SEGMENT_LEN <= A_STATUS && A_STATUS + 8 <= A_ID && A_ID + ID_LEN <= AREA
);

/// The request areas of one queue of `size` ids (see the module docs).
#[derive(Clone, Copy)]
pub(super) struct RequestAreas {
    mem: SharedMemory<'static>,
    iova: u64,
}

impl RequestAreas {
    /// Bytes the areas of `size` ids take.
    pub fn bytes(size: u16) -> usize {
        usize::from(size) * AREA
    }

    /// The areas of `size` ids in `mem`, whose device address is `iova`;
    /// `None` if `mem` is shorter than [`RequestAreas::bytes`]. The unchecked
    /// methods rely on that length.
    pub fn new(mem: SharedMemory<'static>, iova: u64, size: u16) -> Option<Self> {
        (mem.len() >= Self::bytes(size)).then_some(RequestAreas { mem, iova })
    }

    /// Where the framed chains of the core queue find every id's header and
    /// status.
    pub fn frame(&self) -> ChainFrame {
        ChainFrame {
            iova: self.iova + A_HDR as u64,
            stride: AREA as u32,
            header_len: HEADER_LEN as u32,
            status_offset: (A_STATUS - A_HDR) as u32,
            status_len: 1,
        }
    }

    /// Writes the header of request `id` and presets its status word: the
    /// status byte to [`S_PRESET`], with the slow-path mark [`W_SLOW`] for a
    /// GET_ID (`get_id`). Three 8-byte stores, unchecked.
    ///
    /// # Safety
    ///
    /// `id` is below the queue size these areas were made for: an id the
    /// core queue's `next_id` returned, or a token it handed back (as for
    /// `Requests::ring_id`). Its area then lies inside `mem` (checked by
    /// `new`), 8-aligned.
    #[inline(always)]
    pub unsafe fn write_header(&self, id: u16, ty: u32, sector: u64, get_id: bool) {
        let area = usize::from(id) * AREA;
        let slow = if get_id { W_SLOW } else { 0 };
        // SAFETY: see the contract above.
        unsafe {
            self.mem.write_le_u64_unchecked(area + A_HDR, u64::from(ty));
            self.mem.write_le_u64_unchecked(area + A_HDR + 8, sector);
            self.mem.write_le_u64_unchecked(area + A_STATUS, u64::from(S_PRESET) | slow);
        }
    }

    /// Starts loading the line of the request the device may have completed
    /// under `hint` into this CPU's cache, ahead of [`status_word`]: after a
    /// sleep the lines of a whole batch of completions then arrive together
    /// instead of one miss after another (see `virtio_queue_core::UsedIdHint`).
    /// An id past the areas is ignored; a prefetch neither faults nor changes
    /// what a later read returns, so a wrong id costs a wasted line at most.
    /// On targets other than x86-64 it does nothing.
    ///
    /// [`status_word`]: Self::status_word
    #[inline(always)]
    pub fn prefetch_status(&self, hint: UsedIdHint) {
        let Some(off) = (hint.unchecked() as usize)
            .checked_mul(AREA)
            .filter(|&o| o.checked_add(AREA).is_some_and(|end| end <= self.mem.len()))
        else {
            return;
        };
        let line = self.mem.as_ptr().wrapping_add(off + A_STATUS);
        // SAFETY: SSE, which the intrinsic requires, is part of the x86-64
        // baseline; a prefetch accesses no memory architecturally (it cannot
        // fault, whatever the address), and `line` lies inside `mem` anyway.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(line.cast_const().cast())
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = line;
    }

    /// Request `id`'s status word, unchecked.
    ///
    /// # Safety
    ///
    /// As for [`RequestAreas::write_header`].
    #[inline(always)]
    pub unsafe fn status_word(&self, id: u16) -> u64 {
        // SAFETY: the area of an id below the size lies inside `mem`, 8-aligned.
        unsafe { self.mem.read_le_u64_unchecked(usize::from(id) * AREA + A_STATUS) }
    }

    /// Device address of request `id`'s header.
    pub fn header_iova(&self, id: u16) -> u64 {
        self.iova + (usize::from(id) * AREA + A_HDR) as u64
    }

    /// Device address of request `id`'s status byte.
    pub fn status_iova(&self, id: u16) -> u64 {
        self.iova + (usize::from(id) * AREA + A_STATUS) as u64
    }

    /// Writes request `id`'s discard/write-zeroes segment; returns its
    /// device address.
    pub fn write_segment(&self, id: u16, bytes: &[u8; SEGMENT_LEN]) -> u64 {
        let off = usize::from(id) * AREA + A_SEG;
        self.mem.write_bytes(off, bytes);
        self.iova + off as u64
    }

    /// Device address of request `id`'s ID buffer (GET_ID).
    pub fn id_iova(&self, id: u16) -> u64 {
        self.iova + (usize::from(id) * AREA + A_ID) as u64
    }

    /// The device ID request `id` read.
    pub fn read_id(&self, id: u16) -> [u8; ID_LEN] {
        let mut b = [0u8; ID_LEN];
        self.mem.read_bytes(usize::from(id) * AREA + A_ID, &mut b);
        b
    }
}
