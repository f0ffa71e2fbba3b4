//! DMA through the IOMMU: the VFIO type-1 v2 container, the IOVA windows it reports,
//! and the process memory mapped into it.
//!
//! Every mapping gets a fresh IOVA from an [`IovaAllocator`] limited to the windows
//! `VFIO_IOMMU_GET_INFO` reports (capability `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`), or to
//! [`DEFAULT_IOVA_WINDOW`] if the kernel reports none. VFIO pins the pages it maps, so
//! any process memory works (anonymous or file-backed); mappings are page-granular.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_info, VFIO_BASE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_TYPE,
};
use vfio_ioctls::VfioContainer;
use virtio_transport_api::memfd::page_size;
use virtio_transport_api::{Cause, DmaRegion, Error, IovaAllocator, MemFd, Result, Step};

use crate::{vfio_error, NAME};

/// The IOVA window used when the kernel reports none (kernels before 5.4): the first 4 GiB
/// without the first MiB and without the x86 interrupt (MSI) window at 0xfee0_0000, which
/// an IOMMU never translates for DMA.
pub const DEFAULT_IOVA_WINDOW: RangeInclusive<u64> = 0x10_0000..=0xfedf_ffff;

mod ioctls {
    use super::{VFIO_BASE, VFIO_TYPE};
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);
}
use ioctls::VFIO_IOMMU_GET_INFO;

/// What `VFIO_IOMMU_GET_INFO` says about the container's IOMMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuInfo {
    /// Bitmap of the IOMMU page sizes (`iova_pgsizes`); 0 if not reported.
    pub page_sizes: u64,
    /// The usable IOVA ranges (inclusive), if reported.
    pub ranges: Option<Vec<RangeInclusive<u64>>>,
}

impl IommuInfo {
    /// The alignment mappings need: the smallest IOMMU page, at least the CPU page.
    pub fn alignment(&self, cpu_page: u64) -> u64 {
        let iommu = if self.page_sizes == 0 { 0 } else { 1u64 << self.page_sizes.trailing_zeros() };
        iommu.max(cpu_page)
    }

    /// The windows to allocate IOVAs from.
    pub fn windows(&self) -> Vec<RangeInclusive<u64>> {
        self.ranges.clone().unwrap_or_else(|| vec![DEFAULT_IOVA_WINDOW])
    }
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(off..off.checked_add(8)?)?.try_into().ok()?))
}

/// Parses the reply of `VFIO_IOMMU_GET_INFO` (a `struct vfio_iommu_type1_info` and its
/// capability chain). The chain is walked defensively: each capability must start after the
/// previous one and lie inside the reply.
pub fn parse_iommu_info(b: &[u8]) -> std::result::Result<IommuInfo, String> {
    const HDR: usize = std::mem::size_of::<vfio_iommu_type1_info>();
    let flags = u32_at(b, 4).ok_or("short reply")?;
    let page_sizes = u64_at(b, 8).ok_or("short reply")?;
    let mut info = IommuInfo { page_sizes, ranges: None };
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return Ok(info);
    }
    let mut off = u32_at(b, 16).ok_or("short reply")? as usize;
    let mut min = HDR;
    while off != 0 {
        if off < min || off.checked_add(8).is_none_or(|e| e > b.len()) {
            return Err(format!("capability at {off} outside the {}-byte reply or out of order", b.len()));
        }
        let id = u16::from_ne_bytes([b[off], b[off + 1]]);
        let next = u32_at(b, off + 4).ok_or("short capability")? as usize;
        if u32::from(id) == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE && info.ranges.is_none() {
            let n = u32_at(b, off + 8).ok_or("short IOVA range capability")? as usize;
            let mut ranges = Vec::with_capacity(n.min(64));
            for i in 0..n {
                let at = off + 16 + i * 16;
                let (Some(start), Some(end)) = (u64_at(b, at), u64_at(b, at + 8)) else {
                    return Err(format!("IOVA range {i} of {n} lies outside the reply"));
                };
                if start <= end {
                    ranges.push(start..=end);
                }
            }
            info.ranges = Some(ranges);
        }
        min = off + 8;
        off = next;
    }
    Ok(info)
}

/// Asks the container's IOMMU for its page sizes and IOVA ranges.
pub fn query_iommu_info(container: &VfioContainer) -> std::io::Result<IommuInfo> {
    const HDR: usize = std::mem::size_of::<vfio_iommu_type1_info>();
    let mut argsz = HDR;
    // Twice at most: once to learn the size the capabilities need, once to read them.
    for _ in 0..2 {
        let mut buf = vec![0u64; argsz.div_ceil(8)];
        let bytes = buf.len() * 8;
        // argsz is the first u32 of the structure.
        buf[0] = u64::from(bytes as u32);
        // SAFETY: `buf` is `bytes` long and starts with `argsz = bytes`, so the kernel writes
        // at most that much; the descriptor is the container's.
        let r = unsafe { libc::ioctl(container.as_raw_fd(), VFIO_IOMMU_GET_INFO() as _, buf.as_mut_ptr()) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let reply: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let want = u32_at(&reply, 0).unwrap_or(0) as usize;
        if want <= bytes {
            return parse_iommu_info(&reply).map_err(|m| std::io::Error::new(std::io::ErrorKind::InvalidData, m));
        }
        argsz = want.min(1 << 20);
    }
    Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "VFIO_IOMMU_GET_INFO kept growing"))
}

/// What maps process memory into the device's IOVA space: the VFIO container, or a fake in
/// tests. Called at set-up and buffer-pool time, never per request.
pub trait DmaMapper: Send + Sync {
    /// Maps `len` bytes at process address `vaddr` at `iova` (both page-aligned).
    ///
    /// # Safety
    ///
    /// The memory must stay mapped until [`DmaMapper::unmap`] and is only accessed through
    /// raw pointers while the device may use it.
    unsafe fn map(&self, iova: u64, len: usize, vaddr: *mut u8) -> Result<()>;

    /// Unmaps what [`DmaMapper::map`] mapped at `iova`.
    fn unmap(&self, iova: u64, len: usize) -> Result<()>;
}

impl DmaMapper for VfioContainer {
    unsafe fn map(&self, iova: u64, len: usize, vaddr: *mut u8) -> Result<()> {
        // SAFETY: the caller keeps the contract of `DmaMapper::map`, which is that of
        // `vfio_dma_map`: the memory stays mapped and is reached through raw pointers only.
        unsafe { self.vfio_dma_map(iova, len, vaddr) }.map_err(|e| vfio_error(Step::Memory, "VFIO_IOMMU_MAP_DMA", e))
    }

    fn unmap(&self, iova: u64, len: usize) -> Result<()> {
        self.vfio_dma_unmap(iova, len).map_err(|e| vfio_error(Step::Memory, "VFIO_IOMMU_UNMAP_DMA", e))
    }
}

/// One live IOMMU mapping of process memory.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    /// The caller's range (what `translate` answers for).
    len: usize,
    /// IOVA of the caller's first byte.
    iova: u64,
    /// The page-aligned range actually mapped.
    map_iova: u64,
    map_len: usize,
}

struct State {
    iovas: IovaAllocator,
    /// Keyed by the caller's start address; the caller ranges never overlap.
    maps: BTreeMap<usize, Mapping>,
    /// Set once the transport is gone: everything was unmapped.
    closed: bool,
}

/// The IOMMU side of a transport: its container, IOVA space and mappings. Shared by the
/// transport and every [`DmaRegion`] it handed out (they unmap themselves on drop).
pub struct Iommu {
    mapper: Arc<dyn DmaMapper>,
    state: Mutex<State>,
    align: u64,
    info: IommuInfo,
}

impl std::fmt::Debug for Iommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iommu").field("align", &self.align).field("info", &self.info).finish_non_exhaustive()
    }
}

fn invalid(msg: String) -> Error {
    Error::new(NAME, Step::Memory, Cause::InvalidArgument(msg))
}

impl Iommu {
    /// The IOMMU of `container` (a group must be attached and the IOMMU type set).
    pub fn new(container: Arc<VfioContainer>) -> Result<Self> {
        let info = query_iommu_info(&container)
            .map_err(|e| Error::os(NAME, Step::Connect, e).with_context("VFIO_IOMMU_GET_INFO"))?;
        Self::with_mapper(container, info)
    }

    /// An IOMMU whose windows and alignment `info` gives, mapping through `mapper`.
    pub fn with_mapper(mapper: Arc<dyn DmaMapper>, info: IommuInfo) -> Result<Self> {
        let align = info.alignment(page_size() as u64);
        let iovas = IovaAllocator::new(info.windows(), align).map_err(|e| {
            Error::new(NAME, Step::Connect, Cause::Unsupported(format!("{e} (windows {:x?})", info.windows())))
        })?;
        Ok(Iommu { mapper, state: Mutex::new(State { iovas, maps: BTreeMap::new(), closed: false }), align, info })
    }

    /// What the IOMMU reported.
    pub fn info(&self) -> &IommuInfo {
        &self.info
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps `len` bytes of process memory at `addr` at a fresh IOVA; returns the IOVA of `addr`.
    ///
    /// # Safety
    ///
    /// The memory must stay mapped until [`Iommu::unmap`] (or [`Iommu::unmap_all`]) and is
    /// only accessed through raw pointers while the device may use it.
    pub unsafe fn map(&self, addr: *mut u8, len: usize) -> Result<u64> {
        let start = addr as usize;
        let end = start.checked_add(len).filter(|_| len > 0 && start != 0);
        let Some(end) = end else {
            return Err(invalid(format!("{len} bytes at {start:#x}")));
        };
        let align = self.align as usize;
        let page_start = start & !(align - 1);
        let Some(page_end) = end.checked_next_multiple_of(align) else {
            return Err(invalid(format!("{len} bytes at {start:#x} wrap around")));
        };
        let map_len = page_end - page_start;
        let mut st = self.lock();
        if st.closed {
            return Err(Error::new(NAME, Step::Memory, Cause::Disconnected("the transport was dropped".into())));
        }
        let overlap = st.maps.range(..end).next_back().is_some_and(|(&s, m)| s + m.len > start);
        if overlap {
            return Err(invalid(format!("{start:#x}+{len:#x} overlaps memory already mapped")));
        }
        let map_iova = st
            .iovas
            .alloc(map_len as u64)
            .map_err(|e| Error::new(NAME, Step::Memory, Cause::Unsupported(format!("no IOVA space: {e}"))))?;
        // SAFETY: the caller keeps the pages mapped until they are unmapped here, and
        // accesses them through raw pointers only (the contract of this function).
        if let Err(e) = unsafe { self.mapper.map(map_iova, map_len, page_start as *mut u8) } {
            let _ = st.iovas.free(map_iova, map_len as u64);
            return Err(e);
        }
        let iova = map_iova + (start - page_start) as u64;
        st.maps.insert(start, Mapping { len, iova, map_iova, map_len });
        Ok(iova)
    }

    /// Unmaps the mapping that starts at `addr`.
    pub fn unmap(&self, addr: *const u8) -> Result<()> {
        let mut st = self.lock();
        if st.closed {
            return Ok(());
        }
        let Some(m) = st.maps.remove(&(addr as usize)) else {
            return Err(invalid(format!("{:#x} is not mapped", addr as usize)));
        };
        match self.mapper.unmap(m.map_iova, m.map_len) {
            Ok(()) => {
                let _ = st.iovas.free(m.map_iova, m.map_len as u64);
                Ok(())
            }
            // The IOVA range stays allocated: it may still be mapped.
            Err(e) => Err(e),
        }
    }

    /// The IOVA of `len` bytes at `addr`, if they lie inside one mapping.
    pub fn translate(&self, addr: *const u8, len: usize) -> Option<u64> {
        let a = addr as usize;
        let end = a.checked_add(len)?;
        let st = self.lock();
        let (&s, m) = st.maps.range(..=a).next_back()?;
        (end <= s + m.len).then(|| m.iova + (a - s) as u64)
    }

    /// Whether `iova .. iova + len` lies inside one mapping.
    pub fn iova_mapped(&self, iova: u64, len: u64) -> bool {
        let Some(end) = iova.checked_add(len) else { return false };
        self.lock().maps.values().any(|m| iova >= m.map_iova && end <= m.map_iova + m.map_len as u64)
    }

    /// Unmaps everything (the device has been reset) and refuses new mappings.
    pub fn unmap_all(&self) {
        let mut st = self.lock();
        st.closed = true;
        let maps = std::mem::take(&mut st.maps);
        for m in maps.values() {
            let _ = self.mapper.unmap(m.map_iova, m.map_len);
        }
    }

    /// Zeroed, page-aligned memory of at least `len` bytes, mapped at a fresh IOVA.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<DmaRegion> {
        if len == 0 {
            return Err(invalid("a DMA region of 0 bytes".into()));
        }
        let mem =
            MemFd::new("uvirtio-pci-dma", len).map_err(|e| Error::os(NAME, Step::Memory, e).with_context("memfd"))?;
        let ptr = mem.as_non_null();
        // SAFETY: the memfd mapping lives as long as the owner below, which unmaps it from
        // the IOMMU before it is freed; it is only reached through `DmaRegion`'s raw views.
        let iova = unsafe { self.map(ptr.as_ptr(), mem.len()) }?;
        let len = mem.len();
        let owner = DmaOwner { iommu: Arc::clone(self), addr: ptr, _mem: mem };
        // SAFETY: the memory stays mapped, and the device sees it at `iova`, until `owner`
        // is dropped (it unmaps first, then frees).
        unsafe { DmaRegion::new(ptr, len, iova, Box::new(owner)) }
            .ok_or_else(|| invalid("memfd mapping not aligned".into()))
    }
}

/// Unmaps a DMA region from the IOMMU, then frees its memory.
struct DmaOwner {
    iommu: Arc<Iommu>,
    addr: NonNull<u8>,
    _mem: MemFd,
}

// SAFETY: the pointer is only a key for the unmap; the memory is owned by `_mem`.
unsafe impl Send for DmaOwner {}
// SAFETY: as for `Send`; nothing is accessed through `&self`.
unsafe impl Sync for DmaOwner {}

impl Drop for DmaOwner {
    fn drop(&mut self) {
        // A failed unmap keeps the IOVA reserved; the memory is ours to free either way once
        // the device cannot reach it (unmapped here, or reset with the transport).
        let _ = self.iommu.unmap(self.addr.as_ptr());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(flags: u32, pgsizes: u64, caps: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0u8; 24];
        b[4..8].copy_from_slice(&flags.to_ne_bytes());
        b[8..16].copy_from_slice(&pgsizes.to_ne_bytes());
        let mut prev: Option<usize> = None;
        for (id, body) in caps {
            let at = b.len();
            match prev {
                None => b[16..20].copy_from_slice(&(at as u32).to_ne_bytes()),
                Some(p) => b[p + 4..p + 8].copy_from_slice(&(at as u32).to_ne_bytes()),
            }
            b.extend_from_slice(&id.to_ne_bytes());
            b.extend_from_slice(&1u16.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(body);
            prev = Some(at);
        }
        let len = b.len() as u32;
        b[0..4].copy_from_slice(&len.to_ne_bytes());
        b
    }

    fn ranges_body(ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(ranges.len() as u32).to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        for (s, e) in ranges {
            v.extend_from_slice(&s.to_ne_bytes());
            v.extend_from_slice(&e.to_ne_bytes());
        }
        v
    }

    #[test]
    fn intel_iommu_reply_gives_two_windows_around_the_msi_range() {
        let b = reply(
            VFIO_IOMMU_INFO_CAPS | 1,
            0x4020_1000,
            &[(3, vec![0; 8]), (1, ranges_body(&[(0, 0xfedf_ffff), (0xfef0_0000, (1 << 39) - 1)]))],
        );
        let info = parse_iommu_info(&b).unwrap();
        assert_eq!(info.ranges, Some(vec![0..=0xfedf_ffff, 0xfef0_0000..=(1 << 39) - 1]));
        assert_eq!(info.alignment(4096), 4096);
        assert_eq!(info.windows().len(), 2);
    }

    #[test]
    fn no_capability_falls_back_to_the_default_window() {
        let info = parse_iommu_info(&reply(1, 1 << 21, &[])).unwrap();
        assert_eq!(info.ranges, None);
        assert_eq!(info.windows(), vec![DEFAULT_IOVA_WINDOW]);
        assert_eq!(info.alignment(4096), 1 << 21, "the IOMMU's smallest page wins when larger");
        assert_eq!(parse_iommu_info(&reply(0, 0, &[])).unwrap().alignment(4096), 4096);
    }

    #[test]
    fn hostile_replies_are_errors_not_panics() {
        // A capability pointing back at itself (a loop).
        let mut b = reply(VFIO_IOMMU_INFO_CAPS, 4096, &[(1, ranges_body(&[(0, 0xffff)]))]);
        b[28..32].copy_from_slice(&24u32.to_ne_bytes());
        assert!(parse_iommu_info(&b).is_err());
        // More ranges claimed than the reply holds.
        let mut b = reply(VFIO_IOMMU_INFO_CAPS, 4096, &[(1, ranges_body(&[(0, 0xffff)]))]);
        b[32..36].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_iommu_info(&b).unwrap_err().contains("outside the reply"));
        // Capability offset past the end, and into the header.
        let mut b = reply(VFIO_IOMMU_INFO_CAPS, 4096, &[]);
        b[16..20].copy_from_slice(&4000u32.to_ne_bytes());
        assert!(parse_iommu_info(&b).is_err());
        b[16..20].copy_from_slice(&8u32.to_ne_bytes());
        assert!(parse_iommu_info(&b).is_err());
        assert!(parse_iommu_info(&[0u8; 10]).is_err());
        // Inverted ranges are dropped, not trusted.
        let b = reply(VFIO_IOMMU_INFO_CAPS, 4096, &[(1, ranges_body(&[(0x5000, 0x1000), (0x10000, 0x1ffff)]))]);
        assert_eq!(parse_iommu_info(&b).unwrap().ranges, Some(vec![0x10000..=0x1ffff]));
    }

    /// A mapper that records what is mapped and fails when told to.
    #[derive(Default)]
    struct Fake {
        live: Mutex<Vec<(u64, usize, usize)>>,
        fail_map: std::sync::atomic::AtomicBool,
        fail_unmap: std::sync::atomic::AtomicBool,
    }

    impl DmaMapper for Fake {
        unsafe fn map(&self, iova: u64, len: usize, vaddr: *mut u8) -> Result<()> {
            if self.fail_map.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::os(NAME, Step::Memory, std::io::Error::from_raw_os_error(libc::ENOSPC)));
            }
            assert_eq!(iova % 4096, 0);
            assert_eq!(len % 4096, 0);
            assert_eq!(vaddr as usize % 4096, 0);
            self.live.lock().unwrap().push((iova, len, vaddr as usize));
            Ok(())
        }

        fn unmap(&self, iova: u64, len: usize) -> Result<()> {
            if self.fail_unmap.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::os(NAME, Step::Memory, std::io::Error::from_raw_os_error(libc::EINVAL)));
            }
            let mut live = self.live.lock().unwrap();
            let i = live.iter().position(|&(i, l, _)| i == iova && l == len).expect("unmap of what was mapped");
            live.remove(i);
            Ok(())
        }
    }

    const WINDOW: RangeInclusive<u64> = 0x10_0000..=0x10_ffff; // 16 pages

    fn iommu() -> (Arc<Fake>, Arc<Iommu>) {
        let fake = Arc::new(Fake::default());
        let info = IommuInfo { page_sizes: 4096, ranges: Some(vec![WINDOW]) };
        let iommu = Iommu::with_mapper(Arc::clone(&fake) as Arc<dyn DmaMapper>, info).unwrap();
        (fake, Arc::new(iommu))
    }

    /// A 4-page buffer, page-aligned, that outlives the test's mappings.
    fn buffer() -> MemFd {
        MemFd::new("iova-test", 4 * 4096).unwrap()
    }

    #[test]
    fn unaligned_caller_memory_keeps_its_page_offset() {
        let (fake, io) = iommu();
        let m = buffer();
        // SAFETY: `m` outlives the mapping; the fake mapper touches nothing.
        let iova = unsafe { io.map(m.as_ptr().add(100), 5000) }.unwrap();
        assert!(WINDOW.contains(&iova));
        assert_eq!(iova % 4096, 100, "the offset inside the page is kept");
        assert_eq!(fake.live.lock().unwrap().as_slice(), &[(iova - 100, 8192, m.as_ptr() as usize)], "two whole pages");
        // SAFETY: pointer arithmetic inside `m`.
        let (p, q) = unsafe { (m.as_ptr().add(100), m.as_ptr().add(5099)) };
        assert_eq!(io.translate(p, 5000), Some(iova));
        assert_eq!(io.translate(q, 1), Some(iova + 4999));
        assert_eq!(io.translate(q, 2), None, "past the caller's range");
        assert_eq!(io.translate(m.as_ptr(), 1), None, "before it, though in the same page");
        assert!(io.iova_mapped(iova - 100, 8192));
        assert!(!io.iova_mapped(iova - 100, 8193));
        io.unmap(p).unwrap();
        assert!(fake.live.lock().unwrap().is_empty());
        assert_eq!(io.translate(p, 1), None);
    }

    #[test]
    fn overlaps_bad_ranges_and_double_unmaps_are_refused() {
        let (_fake, io) = iommu();
        let m = buffer();
        // SAFETY: as above.
        unsafe {
            io.map(m.as_ptr(), 8192).unwrap();
            for (off, len) in [(0, 1), (8191, 1), (4096, 8192)] {
                let e = io.map(m.as_ptr().add(off), len).unwrap_err();
                assert!(matches!(e.cause(), Cause::InvalidArgument(s) if s.contains("overlaps")), "{off}+{len}: {e}");
            }
            // Adjacent, sharing no byte: fine (even though it shares no page either).
            io.map(m.as_ptr().add(8192), 4096).unwrap();
            assert!(matches!(io.map(std::ptr::null_mut(), 4096).unwrap_err().cause(), Cause::InvalidArgument(_)));
            assert!(matches!(io.map(m.as_ptr().add(12288), 0).unwrap_err().cause(), Cause::InvalidArgument(_)));
            let e = io.map((usize::MAX - 10) as *mut u8, 100).unwrap_err();
            assert!(matches!(e.cause(), Cause::InvalidArgument(_)), "{e}");
        }
        io.unmap(m.as_ptr()).unwrap();
        let e = io.unmap(m.as_ptr()).unwrap_err();
        assert!(matches!(e.cause(), Cause::InvalidArgument(s) if s.contains("not mapped")), "{e}");
        // SAFETY: pointer arithmetic inside `m`.
        io.unmap(unsafe { m.as_ptr().add(8192) }).unwrap();
    }

    #[test]
    fn iova_space_is_bounded_by_the_window_and_reused_after_unmap() {
        let (fake, io) = iommu();
        let bufs: Vec<MemFd> = (0..5).map(|_| buffer()).collect();
        let mut iovas = Vec::new();
        for b in &bufs[..4] {
            // SAFETY: as above.
            iovas.push(unsafe { io.map(b.as_ptr(), 4 * 4096) }.unwrap());
        }
        assert!(iovas.iter().all(|i| WINDOW.contains(i) && WINDOW.contains(&(i + 4 * 4096 - 1))));
        // The window's 16 pages are used up.
        // SAFETY: as above.
        let e = unsafe { io.map(bufs[4].as_ptr(), 4096) }.unwrap_err();
        assert!(matches!(e.cause(), Cause::Unsupported(s) if s.contains("no IOVA space")), "{e}");
        io.unmap(bufs[1].as_ptr()).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { io.map(bufs[4].as_ptr(), 4 * 4096) }.unwrap(), iovas[1], "the freed range is reused");
        assert_eq!(fake.live.lock().unwrap().len(), 4);
    }

    #[test]
    fn failed_maps_free_their_iova_and_failed_unmaps_keep_it() {
        let (fake, io) = iommu();
        let m = buffer();
        fake.fail_map.store(true, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as above.
        let e = unsafe { io.map(m.as_ptr(), 4096) }.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(io.translate(m.as_ptr(), 1), None);
        fake.fail_map.store(false, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as above.
        let first = unsafe { io.map(m.as_ptr(), 4096) }.unwrap();
        assert_eq!(first, *WINDOW.start(), "the failed attempt gave its IOVA back");
        fake.fail_unmap.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(io.unmap(m.as_ptr()).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        fake.fail_unmap.store(false, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as above.
        let second = unsafe { io.map(m.as_ptr(), 4096) }.unwrap();
        assert_ne!(second, first, "an IOVA that may still be mapped is never handed out again");
    }

    #[test]
    fn regions_unmap_on_drop_and_everything_goes_at_unmap_all() {
        let (fake, io) = iommu();
        let a = io.alloc(100).unwrap();
        assert_eq!(a.len(), 4096);
        let b = io.alloc(4096 * 2).unwrap();
        assert_eq!(io.translate(b.as_ptr(), b.len()), Some(b.iova()));
        assert!(a.iova_at(0).is_some_and(|i| WINDOW.contains(&i)));
        assert_eq!(fake.live.lock().unwrap().len(), 2);
        drop(b);
        assert_eq!(fake.live.lock().unwrap().len(), 1, "the region unmapped itself");
        assert!(matches!(io.alloc(0).unwrap_err().cause(), Cause::InvalidArgument(_)));
        io.unmap_all();
        assert!(fake.live.lock().unwrap().is_empty());
        let e = io.alloc(4096).unwrap_err();
        assert!(matches!(e.cause(), Cause::Disconnected(_)), "no mapping after the transport is gone: {e}");
        drop(a); // does not unmap twice (the fake would panic)
    }

    #[test]
    fn arbitrary_replies_never_panic() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        for _ in 0..2000 {
            let mut b = vec![0u8; 96];
            for x in b.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *x = seed as u8;
            }
            b[4] |= VFIO_IOMMU_INFO_CAPS as u8;
            b[16] = 24 + (b[16] % 64);
            b[17..20].fill(0);
            let _ = parse_iommu_info(&b);
        }
    }
}
