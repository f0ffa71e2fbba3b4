//! Device-visible memory: IOVAs from the device's window, IOTLB updates and
//! invalidations (`VHOST_IOTLB_UPDATE` / `VHOST_IOTLB_INVALIDATE`, in
//! `struct vhost_msg_v2` when the kernel offers `VHOST_BACKEND_F_IOTLB_MSG_V2`),
//! and set-up batching (`VHOST_IOTLB_BATCH_BEGIN` / `BATCH_END` when it offers
//! `VHOST_BACKEND_F_IOTLB_BATCH`).
//!
//! # Batching
//!
//! Between a reset and DRIVER_OK (device set-up: rings, request headers, the
//! first buffers) every update and invalidation goes into one batch: the first
//! one sends BATCH_BEGIN, and the transport sends BATCH_END just before it
//! writes DRIVER_OK (or resets, or is dropped). Parents that program their
//! translation as a whole (`set_map`: VDUSE, most hardware) then rebuild it
//! once instead of once per region; parents with per-range `dma_map`
//! (`vdpa_sim`) apply each update at once either way. The device does no DMA
//! before DRIVER_OK, so nothing uses a mapping before its batch ends. After
//! DRIVER_OK updates are sent one by one.
//!
//! # Resets
//!
//! With `VHOST_BACKEND_F_IOTLB_PERSIST` the parent keeps its mappings across a
//! reset. Without it, a reset makes the parent forget them (the kernel resets
//! with `VDPA_RESET_F_CLEAN_MAP`) while vhost-vdpa's own IOTLB keeps them, so
//! [`Shared::after_reset`] sends each live mapping again (invalidate, update).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use vhost::vdpa::VhostVdpa;
use vhost::{VhostIotlbBackend, VhostIotlbMsg, VhostIotlbType};
use virtio_transport_api::memfd::page_size;
use virtio_transport_api::{Cause, DmaRegion, Error, IovaAllocator, MemFd, Result, Step};

use crate::backend::{invalid, vhost_error, Device};
use crate::maps::{check_own_memory, FileId};
use crate::NAME;

/// One range mapped for the device.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    /// The process address the caller gave (the key of `unmap`).
    addr: usize,
    /// Page-aligned process address of what is mapped.
    start: usize,
    /// Page-aligned length mapped.
    len: usize,
    /// IOVA of `start`.
    iova: u64,
}

impl Mapping {
    fn contains_addr(&self, addr: usize, len: usize) -> bool {
        addr >= self.start && addr.checked_add(len).is_some_and(|end| end <= self.start + self.len)
    }

    fn contains_iova(&self, iova: u64, len: u64) -> bool {
        iova >= self.iova && iova.checked_add(len).is_some_and(|end| end <= self.iova + self.len as u64)
    }
}

/// Mappings and IOVAs, under one lock.
#[derive(Debug)]
struct State {
    iovas: IovaAllocator,
    maps: Vec<Mapping>,
    /// Updates go into one batch (set-up, between reset and DRIVER_OK).
    batching: bool,
    /// A BATCH_BEGIN was sent and its BATCH_END was not.
    in_batch: bool,
    /// The transport was dropped: everything was unmapped already.
    closed: bool,
}

/// The device handle and what is mapped on it, shared by the transport and
/// (weakly) by the DMA regions it handed out.
pub(crate) struct Shared {
    pub(crate) device: Device,
    /// `VHOST_BACKEND_F_IOTLB_BATCH` was acked.
    batch: bool,
    /// `VHOST_BACKEND_F_IOTLB_PERSIST` was acked.
    persist: bool,
    state: Mutex<State>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("batch", &self.batch)
            .field("persist", &self.persist)
            .field("state", &*self.lock())
            .finish_non_exhaustive()
    }
}

fn iotlb_msg(msg_type: VhostIotlbType) -> VhostIotlbMsg {
    VhostIotlbMsg { msg_type, ..Default::default() }
}

impl Shared {
    pub(crate) fn new(device: Device, iovas: IovaAllocator, batch: bool, persist: bool) -> Self {
        let state = State { iovas, maps: Vec::new(), batching: batch, in_batch: false, closed: false };
        Shared { device, batch, persist, state: Mutex::new(state) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether updates are being batched right now (for tests and `Debug`).
    pub(crate) fn in_batch(&self) -> bool {
        self.lock().in_batch
    }

    /// Sends BATCH_BEGIN if this is the first update of a set-up batch.
    fn begin_if_batching(&self, s: &mut State) -> Result<()> {
        if s.batching && !s.in_batch {
            self.device
                .send_iotlb_msg(&iotlb_msg(VhostIotlbType::BatchBegin))
                .map_err(|e| vhost_error(Step::Memory, "VHOST_IOTLB_BATCH_BEGIN", e))?;
            s.in_batch = true;
        }
        Ok(())
    }

    fn end_locked(&self, s: &mut State) -> Result<()> {
        s.batching = false;
        if s.in_batch {
            s.in_batch = false;
            self.device
                .send_iotlb_msg(&iotlb_msg(VhostIotlbType::BatchEnd))
                .map_err(|e| vhost_error(Step::Memory, "VHOST_IOTLB_BATCH_END", e))?;
        }
        Ok(())
    }

    /// Ends the set-up batch (before DRIVER_OK): from now on updates are sent one by one.
    pub(crate) fn end_batch(&self) -> Result<()> {
        self.end_locked(&mut self.lock())
    }

    fn update(&self, m: &Mapping) -> Result<()> {
        self.device.dma_map(m.iova, m.len as u64, m.start as *const u8, false).map_err(|e| {
            let pinned = matches!(&e, vhost::Error::IOError(io) if io.raw_os_error() == Some(libc::ENOMEM));
            let what = if pinned {
                "VHOST_IOTLB_UPDATE; a parent in PA mode pins the pages, counted against RLIMIT_MEMLOCK"
            } else {
                "VHOST_IOTLB_UPDATE"
            };
            vhost_error(Step::Memory, &format!("{what} of {:#x} bytes at IOVA {:#x}", m.len, m.iova), e)
        })
    }

    fn invalidate(&self, m: &Mapping) -> Result<()> {
        self.device.dma_unmap(m.iova, m.len as u64).map_err(|e| vhost_error(Step::Memory, "VHOST_IOTLB_INVALIDATE", e))
    }

    /// Maps `len` bytes at process address `addr` (page-aligned outwards) at a
    /// new IOVA and returns the IOVA of `addr`. The caller has checked that
    /// the memory is shared and file-backed.
    fn map(&self, addr: usize, len: usize) -> Result<u64> {
        let page = page_size();
        let start = addr & !(page - 1);
        let end = addr
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(page))
            .ok_or_else(|| invalid(Step::Memory, format!("{len} bytes at {addr:#x} overflow")))?;
        let mut s = self.lock();
        if s.closed {
            return Err(Error::new(NAME, Step::Memory, Cause::Disconnected("the transport was dropped".into())));
        }
        if s.maps.iter().any(|m| m.addr == addr) {
            return Err(invalid(Step::Memory, format!("{addr:#x} is already mapped")));
        }
        let iova = s
            .iovas
            .alloc((end - start) as u64)
            .map_err(|e| Error::new(NAME, Step::Memory, Cause::InvalidArgument(e.to_string())))?;
        let m = Mapping { addr, start, len: end - start, iova };
        let sent = self.begin_if_batching(&mut s).and_then(|()| self.update(&m));
        if let Err(e) = sent {
            // Nothing is mapped at this IOVA: it can be handed out again.
            let _ = s.iovas.free(m.iova, m.len as u64);
            return Err(e);
        }
        s.maps.push(m);
        Ok(iova + (addr - start) as u64)
    }

    /// Invalidates the mapping made for `addr` and frees its IOVA.
    pub(crate) fn unmap(&self, addr: usize) -> Result<()> {
        let mut s = self.lock();
        if s.closed {
            return Ok(());
        }
        let Some(i) = s.maps.iter().position(|m| m.addr == addr) else {
            return Err(invalid(Step::Memory, format!("{addr:#x} is not mapped")));
        };
        let m = s.maps.remove(i);
        self.begin_if_batching(&mut s)?;
        // If the kernel refuses, the IOVA may still be mapped: keep it
        // reserved rather than hand it out twice.
        self.invalidate(&m)?;
        s.iovas.free(m.iova, m.len as u64).map_err(|e| invalid(Step::Memory, e.to_string()))
    }

    /// The IOVA of `len` bytes at process address `addr`, if one mapping holds them all.
    pub(crate) fn translate(&self, addr: usize, len: usize) -> Option<u64> {
        let s = self.lock();
        let m = s.maps.iter().find(|m| m.contains_addr(addr, len.max(1)))?;
        Some(m.iova + (addr - m.start) as u64)
    }

    /// Whether `len` bytes at `iova` lie inside one mapping.
    pub(crate) fn iova_mapped(&self, iova: u64, len: u64) -> bool {
        self.lock().maps.iter().any(|m| m.contains_iova(iova, len))
    }

    /// After a device reset: a new set-up batch starts, and without
    /// IOTLB_PERSIST every live mapping is sent again.
    pub(crate) fn after_reset(&self) -> Result<()> {
        let mut s = self.lock();
        s.batching = self.batch;
        if self.persist || s.maps.is_empty() {
            return Ok(());
        }
        self.begin_if_batching(&mut s)?;
        for m in s.maps.clone() {
            self.invalidate(&m)?;
            self.update(&m)?;
        }
        Ok(())
    }

    /// The transport is going away (after its reset): unmaps everything and
    /// frees every IOVA; regions still alive only free their memory later.
    pub(crate) fn close(&self) {
        let mut s = self.lock();
        let _ = self.end_locked(&mut s);
        s.batching = self.batch;
        let maps = std::mem::take(&mut s.maps);
        if !maps.is_empty() && self.begin_if_batching(&mut s).is_err() {
            s.batching = false;
        }
        for m in maps {
            if self.invalidate(&m).is_ok() {
                let _ = s.iovas.free(m.iova, m.len as u64);
            }
        }
        let _ = self.end_locked(&mut s);
        s.closed = true;
    }

    /// Bytes of IOVA space still free (for leak checks).
    pub(crate) fn free_iova_bytes(&self) -> u64 {
        self.lock().iovas.free_bytes()
    }

    /// Number of live mappings (for leak checks).
    pub(crate) fn mappings(&self) -> usize {
        self.lock().maps.len()
    }
}

/// Owner of an [`alloc_dma`] region: on drop, unmaps it from the device
/// (if the transport is still there) and then frees the memfd.
struct DmaOwner {
    shared: Weak<Shared>,
    addr: usize,
    _mem: MemFd,
}

impl Drop for DmaOwner {
    fn drop(&mut self) {
        // The transport unmapped everything when it was dropped; if it is
        // still there, a refused invalidation cannot be helped here.
        if let Some(shared) = self.shared.upgrade() {
            let _ = shared.unmap(self.addr);
        }
    }
}

/// [`virtio_transport_api::Transport::alloc_dma`]: a shared memfd mapping, mapped at a new IOVA.
pub(crate) fn alloc_dma(shared: &Arc<Shared>, len: usize) -> Result<DmaRegion> {
    if len == 0 {
        return Err(invalid(Step::Memory, "zero-length DMA region"));
    }
    let mem =
        MemFd::new("uvirtio-vdpa-dma", len).map_err(|e| Error::os(NAME, Step::Memory, e).with_context("memfd"))?;
    let ptr = mem.as_non_null();
    let len = mem.len();
    let addr = ptr.as_ptr() as usize;
    let iova = shared.map(addr, len)?;
    let owner = DmaOwner { shared: Arc::downgrade(shared), addr, _mem: mem };
    // SAFETY: the memfd mapping lives as long as `owner`, and the device sees
    // it at `iova` (mapped just above) until `owner` unmaps it.
    unsafe { DmaRegion::new(ptr, len, iova, Box::new(owner)) }
        .ok_or_else(|| invalid(Step::Memory, "memfd mapping not aligned"))
}

/// [`virtio_transport_api::Transport::map_memory`]: checks that the range is a
/// shared mapping of `fd` at `offset`, then maps it at a new IOVA.
pub(crate) fn map_memory(shared: &Shared, addr: usize, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<u64> {
    if addr == 0 || len == 0 {
        return Err(invalid(Step::Memory, "null address or empty mapping"));
    }
    let page = page_size();
    let start = addr & !(page - 1);
    let end = addr
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(page))
        .ok_or_else(|| invalid(Step::Memory, format!("{len} bytes at {addr:#x} overflow")))?;
    let head = (addr - start) as u64;
    let start_offset = offset.checked_sub(head).ok_or_else(|| {
        invalid(Step::Memory, format!("file offset {offset:#x} of {addr:#x} is inside its first page"))
    })?;
    let file = FileId::of(fd)
        .map_err(|e| Error::os(NAME, Step::Memory, e).with_context(format!("fstat of fd {}", fd.as_raw_fd())))?;
    check_own_memory(start, end, Some((file, start_offset))).map_err(|why| invalid(Step::Memory, why))?;
    shared.map(addr, len)
}
