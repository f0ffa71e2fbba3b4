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
        invalid(
            Step::Memory,
            format!("file offset {offset:#x} cannot be that of {addr:#x}, {head:#x} bytes into a page"),
        )
    })?;
    let file = FileId::of(fd)
        .map_err(|e| Error::os(NAME, Step::Memory, e).with_context(format!("fstat of fd {}", fd.as_raw_fd())))?;
    check_own_memory(start, end, Some((file, start_offset))).map_err(|why| invalid(Step::Memory, why))?;
    shared.map(addr, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{backend_features, no_guest_memory};
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use vhost::vhost_kern::vhost_binding::vhost_msg_v2;

    /// An IOTLB message as written to the device node.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Msg {
        kind: VhostIotlbType,
        iova: u64,
        size: u64,
        uaddr: u64,
    }

    const UPDATE: VhostIotlbType = VhostIotlbType::Update;
    const INVALIDATE: VhostIotlbType = VhostIotlbType::Invalidate;
    const BEGIN: VhostIotlbType = VhostIotlbType::BatchBegin;
    const END: VhostIotlbType = VhostIotlbType::BatchEnd;

    /// A `Shared` whose "device" is a temporary file: every IOTLB message the transport
    /// writes lands there, to be decoded by [`Fake::messages`].
    struct Fake {
        shared: Arc<Shared>,
        file: File,
        read: u64,
    }

    impl Fake {
        fn new(batch: bool, persist: bool, pages: u64) -> Fake {
            let file = tempfile::tempfile().unwrap();
            let device = Device::with(file.try_clone().unwrap(), no_guest_memory(), backend_features::IOTLB_MSG_V2);
            let page = page_size() as u64;
            let iovas = IovaAllocator::new([0..=(pages + 1) * page - 1], page).unwrap();
            Fake { shared: Arc::new(Shared::new(device, iovas, batch, persist)), file, read: 0 }
        }

        /// The messages written since the last call (`struct vhost_msg_v2`, linux/vhost_types.h).
        fn messages(&mut self) -> Vec<Msg> {
            let size = std::mem::size_of::<vhost_msg_v2>();
            assert_eq!(size, 72);
            let len = self.file.metadata().unwrap().len();
            let mut bytes = vec![0u8; (len - self.read) as usize];
            self.file.read_exact_at(&mut bytes, self.read).unwrap();
            self.read = len;
            assert_eq!(bytes.len() % size, 0);
            let u64_at = |m: &[u8], o: usize| u64::from_ne_bytes(m[o..o + 8].try_into().unwrap());
            bytes
                .chunks(size)
                .map(|m| {
                    assert_eq!(u32::from_ne_bytes(m[..4].try_into().unwrap()), 2, "VHOST_IOTLB_MSG_V2");
                    let kind = match m[33] {
                        2 => UPDATE,
                        3 => INVALIDATE,
                        5 => BEGIN,
                        6 => END,
                        other => panic!("unexpected IOTLB message type {other}"),
                    };
                    if kind == UPDATE {
                        assert_eq!(m[32], 3, "read-write");
                    }
                    Msg { kind, iova: u64_at(m, 8), size: u64_at(m, 16), uaddr: u64_at(m, 24) }
                })
                .collect()
        }
    }

    fn kinds(msgs: &[Msg]) -> Vec<VhostIotlbType> {
        msgs.iter().map(|m| m.kind).collect()
    }

    #[test]
    fn set_up_updates_are_batched_until_the_batch_ends() {
        let mut f = Fake::new(true, true, 64);
        let page = page_size();
        let a = alloc_dma(&f.shared, 3 * page - 1).unwrap();
        let b = alloc_dma(&f.shared, 1).unwrap();
        assert!(f.shared.in_batch());
        let m = f.messages();
        assert_eq!(kinds(&m), [BEGIN, UPDATE, UPDATE]);
        assert_eq!((m[1].iova, m[1].size, m[1].uaddr), (a.iova(), 3 * page as u64, a.as_ptr() as u64));
        assert_eq!((m[2].iova, m[2].size, m[2].uaddr), (b.iova(), page as u64, b.as_ptr() as u64));
        assert!(b.iova() >= a.iova() + 3 * page as u64 || b.iova() + page as u64 <= a.iova(), "disjoint IOVAs");

        f.shared.end_batch().unwrap();
        assert_eq!(kinds(&f.messages()), [END]);
        // After DRIVER_OK: one message per update, no batch.
        let c = alloc_dma(&f.shared, page).unwrap();
        drop(b);
        let m = f.messages();
        assert_eq!(kinds(&m), [UPDATE, INVALIDATE]);
        assert_eq!(m[0].iova, c.iova());
        drop((a, c));
    }

    #[test]
    fn without_batch_support_nothing_is_batched() {
        let mut f = Fake::new(false, true, 16);
        let a = alloc_dma(&f.shared, 10).unwrap();
        drop(a);
        assert_eq!(kinds(&f.messages()), [UPDATE, INVALIDATE]);
        f.shared.end_batch().unwrap();
        f.shared.after_reset().unwrap();
        assert!(f.messages().is_empty());
    }

    #[test]
    fn dropping_regions_unmaps_them_and_returns_every_iova() {
        let mut f = Fake::new(false, true, 16);
        let free = f.shared.free_iova_bytes();
        let regions: Vec<_> = (1..=4).map(|n| alloc_dma(&f.shared, n * 1000).unwrap()).collect();
        assert_eq!(f.shared.mappings(), 4);
        let mapped: Vec<_> = f.messages();
        drop(regions);
        let unmapped = f.messages();
        assert_eq!(kinds(&unmapped), [INVALIDATE; 4]);
        for (u, i) in mapped.iter().zip(&unmapped) {
            assert_eq!((u.iova, u.size), (i.iova, i.size), "each invalidation covers its update");
        }
        assert_eq!(f.shared.mappings(), 0);
        assert_eq!(f.shared.free_iova_bytes(), free);
    }

    #[test]
    fn an_exhausted_window_is_a_typed_error_and_leaks_nothing() {
        let mut f = Fake::new(false, true, 2);
        let page = page_size();
        let e = alloc_dma(&f.shared, 3 * page).unwrap_err();
        assert_eq!(e.step(), Step::Memory);
        assert!(e.to_string().contains("no free IOVA range"), "{e}");
        assert!(f.messages().is_empty(), "nothing was sent");
        assert_eq!(f.shared.free_iova_bytes(), 2 * page as u64);
        let a = alloc_dma(&f.shared, 2 * page).unwrap();
        assert!(alloc_dma(&f.shared, 1).is_err());
        drop(a);
        assert_eq!(f.shared.free_iova_bytes(), 2 * page as u64);
    }

    #[test]
    fn a_reset_without_persist_sends_every_mapping_again() {
        let mut f = Fake::new(true, false, 16);
        let a = alloc_dma(&f.shared, 100).unwrap();
        f.shared.end_batch().unwrap();
        let first = f.messages();
        f.shared.after_reset().unwrap();
        let m = f.messages();
        assert_eq!(kinds(&m), [BEGIN, INVALIDATE, UPDATE]);
        assert_eq!((m[2].iova, m[2].uaddr), (first[1].iova, first[1].uaddr));
        assert_eq!(m[2].iova, a.iova());
        // With PERSIST the parent keeps them: nothing to send.
        let mut p = Fake::new(true, true, 16);
        let _b = alloc_dma(&p.shared, 100).unwrap();
        p.shared.end_batch().unwrap();
        p.messages();
        p.shared.after_reset().unwrap();
        assert!(p.messages().is_empty());
    }

    #[test]
    fn closing_unmaps_everything_and_later_drops_send_nothing() {
        let mut f = Fake::new(true, true, 16);
        let free = f.shared.free_iova_bytes();
        let a = alloc_dma(&f.shared, 100).unwrap();
        let b = alloc_dma(&f.shared, 5000).unwrap();
        f.messages();
        f.shared.close();
        let m = f.messages();
        assert_eq!(kinds(&m), [END, BEGIN, INVALIDATE, INVALIDATE, END]);
        assert_eq!(f.shared.mappings(), 0);
        assert_eq!(f.shared.free_iova_bytes(), free);
        drop((a, b));
        assert!(f.messages().is_empty());
        let e = alloc_dma(&f.shared, 1).unwrap_err();
        assert!(e.is_disconnected(), "{e}");
    }

    #[test]
    fn regions_outliving_the_transport_only_free_their_memory() {
        let f = Fake::new(false, true, 16);
        let a = alloc_dma(&f.shared, 100).unwrap();
        let Fake { shared, file, .. } = f;
        assert_eq!(Arc::strong_count(&shared), 1, "a region does not keep the device open");
        drop(shared);
        let written = file.metadata().unwrap().len();
        drop(a);
        assert_eq!(file.metadata().unwrap().len(), written, "nothing is sent to a closed device");
    }

    #[test]
    fn map_memory_takes_a_memfd_and_refuses_anonymous_memory() {
        let mut f = Fake::new(false, true, 16);
        let page = page_size();
        let m = MemFd::new("map-test", 2 * page).unwrap();
        let addr = m.as_ptr() as usize + 100;
        let iova = map_memory(&f.shared, addr, page, m.fd(), 100).unwrap();
        assert_eq!(iova % page as u64, 100);
        let msgs = f.messages();
        assert_eq!(kinds(&msgs), [UPDATE]);
        // The whole pages around the range are mapped.
        assert_eq!((msgs[0].uaddr, msgs[0].size), (m.as_ptr() as u64, 2 * page as u64));
        assert_eq!(f.shared.translate(addr + 8, 16), Some(iova + 8));
        assert_eq!(f.shared.translate(addr + 2 * page, 1), None);
        assert!(f.shared.iova_mapped(iova - 100, 2 * page as u64));
        assert!(!f.shared.iova_mapped(iova - 100, 2 * page as u64 + 1));
        let e = map_memory(&f.shared, addr, page, m.fd(), 100).unwrap_err();
        assert!(e.to_string().contains("already mapped"), "{e}");
        let e = map_memory(&f.shared, m.as_ptr() as usize + 50, 10, m.fd(), 10).unwrap_err();
        assert!(e.to_string().contains("cannot be that of"), "{e}");

        let anon = vec![0u8; 3 * page];
        let aligned = (anon.as_ptr() as usize).next_multiple_of(page);
        let e = map_memory(&f.shared, aligned, page, m.fd(), 0).unwrap_err();
        assert_eq!(e.step(), Step::Memory);
        assert!(e.to_string().contains("vhost-vdpa needs shared, file-backed memory (memfd)"), "{e}");
        assert!(f.messages().is_empty(), "nothing sent for refused memory");

        f.shared.unmap(addr).unwrap();
        assert_eq!(kinds(&f.messages()), [INVALIDATE]);
        assert!(f.shared.unmap(addr).is_err());
        assert_eq!(f.shared.translate(addr, 1), None);
    }
}
