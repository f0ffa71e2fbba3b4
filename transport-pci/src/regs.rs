//! BAR mappings and the registers in them: `struct virtio_pci_common_cfg`, the device
//! configuration window and the queue notify registers (virtio 1.2 §4.1.4).
//!
//! BARs are mapped through VFIO (an `mmap` of the region) and every register is accessed
//! through `volatile`, with the widths §4.1.3.1 asks for: 8-bit registers with 8-bit
//! accesses, 16-bit with 16-bit, 32-bit with 32-bit, and each 64-bit queue address as two
//! 32-bit halves (which the device must accept).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use volatile::{map_field, VolatilePtr};

use crate::caps::Window;

/// One BAR mapped into this process; unmapped on drop.
///
/// Either the whole BAR is mapped, or — when VFIO allows only parts of it (a sparse-mmap
/// region, typically one that holds the MSI-X table without interrupt remapping) — the BAR's
/// size is reserved and only the allowed areas are mapped into it. Registers are reachable
/// only inside the mapped areas.
#[derive(Debug)]
pub struct BarMapping {
    ptr: NonNull<u8>,
    len: usize,
    bar: u8,
    /// The mapped byte ranges of the BAR (`0..len` when it is mapped whole).
    areas: Vec<std::ops::Range<u64>>,
}

// SAFETY: the mapping is plain device memory owned by this value; nothing in it is tied to
// a thread. All accesses go through volatile reads and writes of whole registers.
unsafe impl Send for BarMapping {}
// SAFETY: as for `Send`; `&self` only hands out raw pointers used for volatile access.
unsafe impl Sync for BarMapping {}

impl BarMapping {
    /// Maps `len` bytes of BAR `bar`, which VFIO exposes at `offset` of the device file.
    pub fn map(device: BorrowedFd<'_>, bar: u8, offset: u64, len: u64) -> std::io::Result<Self> {
        let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
        let len = usize::try_from(len).map_err(|_| invalid(format!("BAR {bar} of {len:#x} bytes")))?;
        let off = libc::off_t::try_from(offset).map_err(|_| invalid(format!("BAR {bar} at {offset:#x}")))?;
        if len == 0 {
            return Err(invalid(format!("BAR {bar} is empty")));
        }
        // SAFETY: a new shared mapping of the device's region at a place the kernel
        // chooses; it does not touch existing memory. The result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(BarMapping { ptr, len, bar, areas: std::iter::once(0..len as u64).collect() })
    }

    /// Maps only `areas` (offset, size) of the `len`-byte BAR `bar`, which VFIO exposes at
    /// `offset` of the device file: the rest of the BAR's address range is reserved and
    /// inaccessible.
    pub fn map_sparse(
        device: BorrowedFd<'_>,
        bar: u8,
        offset: u64,
        len: u64,
        areas: &[(u64, u64)],
    ) -> std::io::Result<Self> {
        let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
        let ulen = usize::try_from(len).map_err(|_| invalid(format!("BAR {bar} of {len:#x} bytes")))?;
        if ulen == 0 {
            return Err(invalid(format!("BAR {bar} is empty")));
        }
        // SAFETY: a new private, inaccessible reservation at a place the kernel chooses; it
        // does not touch existing memory. The result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ulen,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
        // From here on, dropping `m` releases the whole reservation and whatever was mapped into it.
        let mut m = BarMapping { ptr, len: ulen, bar, areas: Vec::new() };
        for &(a_off, a_len) in areas {
            let end = a_off.checked_add(a_len).filter(|&e| e <= len && a_len > 0);
            let (Some(end), Ok(file_off)) = (end, libc::off_t::try_from(offset.saturating_add(a_off))) else {
                return Err(invalid(format!("sparse area {a_off:#x}+{a_len:#x} outside BAR {bar} ({len:#x} bytes)")));
            };
            // SAFETY: the target lies inside our own reservation (checked just above), so
            // MAP_FIXED replaces only pages this mapping owns. The result is checked.
            let q = unsafe {
                libc::mmap(
                    ptr.as_ptr().add(a_off as usize).cast(),
                    a_len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    device.as_raw_fd(),
                    file_off,
                )
            };
            if q == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            m.areas.push(a_off..end);
        }
        Ok(m)
    }

    /// Whether `len` bytes at `offset` lie inside one mapped area.
    pub fn is_mapped(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| self.areas.iter().any(|a| a.start <= offset && end <= a.end))
    }

    /// The BAR index.
    pub fn bar(&self) -> u8 {
        self.bar
    }

    /// A pointer to a `T` at `offset`, if it lies inside the mapping and is aligned.
    fn at<T>(&self, offset: u64) -> Option<NonNull<T>> {
        let off = usize::try_from(offset).ok()?;
        let end = off.checked_add(std::mem::size_of::<T>())?;
        if end > self.len
            || !self.is_mapped(offset, std::mem::size_of::<T>() as u64)
            || (self.ptr.as_ptr() as usize + off) % std::mem::align_of::<T>() != 0
        {
            return None;
        }
        // SAFETY: `off + size_of::<T>() <= len`, so the result stays inside the mapping.
        Some(unsafe { self.ptr.add(off) }.cast())
    }
}

impl Drop for BarMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `map` with this address and length and is
        // unmapped only here; every user holds an `Arc` to it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `struct virtio_pci_common_cfg` up to `queue_device` (virtio 1.0), little-endian fields.
/// The 64-bit queue addresses are split into the halves the driver writes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CommonCfg {
    device_feature_select: u32,
    device_feature: u32,
    driver_feature_select: u32,
    driver_feature: u32,
    config_msix_vector: u16,
    num_queues: u16,
    device_status: u8,
    config_generation: u8,
    queue_select: u16,
    queue_size: u16,
    queue_msix_vector: u16,
    queue_enable: u16,
    queue_notify_off: u16,
    queue_desc_lo: u32,
    queue_desc_hi: u32,
    queue_driver_lo: u32,
    queue_driver_hi: u32,
    queue_device_lo: u32,
    queue_device_hi: u32,
}

const _: () = {
    use std::mem::offset_of;
    assert!(offset_of!(CommonCfg, config_msix_vector) == 16);
    assert!(offset_of!(CommonCfg, device_status) == 20);
    assert!(offset_of!(CommonCfg, config_generation) == 21);
    assert!(offset_of!(CommonCfg, queue_select) == 22);
    assert!(offset_of!(CommonCfg, queue_notify_off) == 30);
    assert!(offset_of!(CommonCfg, queue_desc_lo) == 32);
    assert!(offset_of!(CommonCfg, queue_driver_lo) == 40);
    assert!(offset_of!(CommonCfg, queue_device_lo) == 48);
    assert!(std::mem::size_of::<CommonCfg>() == crate::caps::COMMON_CFG_MIN_LEN as usize);
};

/// `VIRTIO_MSI_NO_VECTOR`: no MSI-X vector (also what the device reads back when it
/// could not allocate the vector asked for).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// The common configuration registers.
pub struct Common {
    regs: NonNull<CommonCfg>,
    _bar: Arc<BarMapping>,
}

impl std::fmt::Debug for Common {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Common").field("regs", &self.regs).finish()
    }
}

// SAFETY: a pointer into a BAR mapping that the `Arc` keeps alive; register accesses are
// volatile and need no thread affinity.
unsafe impl Send for Common {}
// SAFETY: as for `Send`; every method that writes takes `&mut self`.
unsafe impl Sync for Common {}

macro_rules! reg {
    ($self:ident . $field:ident) => {{
        let regs = $self.ptr();
        map_field!(regs.$field)
    }};
}

impl Common {
    /// The common configuration at `window` of `bar` (checked to lie inside the mapping).
    pub fn new(bar: Arc<BarMapping>, window: &Window) -> Option<Self> {
        let regs = bar.at::<CommonCfg>(u64::from(window.offset))?;
        Some(Common { regs, _bar: bar })
    }

    fn ptr(&self) -> VolatilePtr<'_, CommonCfg> {
        // SAFETY: `regs` points at `size_of::<CommonCfg>()` mapped, aligned bytes of the BAR
        // (checked in `new`), kept mapped by `_bar` for as long as `self` lives. The memory is
        // device registers, only ever accessed through volatile operations.
        unsafe { VolatilePtr::new(self.regs) }
    }

    /// The 64-bit feature word the device offers (two selects of 32 bits).
    pub fn device_features(&mut self) -> u64 {
        reg!(self.device_feature_select).write(0u32.to_le());
        let lo = u32::from_le(reg!(self.device_feature).read());
        reg!(self.device_feature_select).write(1u32.to_le());
        let hi = u32::from_le(reg!(self.device_feature).read());
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Writes the driver's 64-bit feature word.
    pub fn set_driver_features(&mut self, features: u64) {
        reg!(self.driver_feature_select).write(0u32.to_le());
        reg!(self.driver_feature).write((features as u32).to_le());
        reg!(self.driver_feature_select).write(1u32.to_le());
        reg!(self.driver_feature).write(((features >> 32) as u32).to_le());
    }

    /// The driver feature word as the device holds it (read back).
    pub fn driver_features(&mut self) -> u64 {
        reg!(self.driver_feature_select).write(0u32.to_le());
        let lo = u32::from_le(reg!(self.driver_feature).read());
        reg!(self.driver_feature_select).write(1u32.to_le());
        let hi = u32::from_le(reg!(self.driver_feature).read());
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// `device_status`.
    pub fn device_status(&self) -> u8 {
        reg!(self.device_status).read()
    }

    /// Writes `device_status` (0 starts a reset).
    pub fn set_device_status(&mut self, status: u8) {
        reg!(self.device_status).write(status);
    }

    /// `config_generation`.
    pub fn config_generation(&self) -> u8 {
        reg!(self.config_generation).read()
    }

    /// `num_queues`.
    pub fn num_queues(&self) -> u16 {
        u16::from_le(reg!(self.num_queues).read())
    }

    /// Writes `config_msix_vector` and returns what the device reads back.
    pub fn set_config_msix_vector(&mut self, vector: u16) -> u16 {
        reg!(self.config_msix_vector).write(vector.to_le());
        u16::from_le(reg!(self.config_msix_vector).read())
    }

    /// Writes `queue_select`: the later queue registers are of this queue.
    pub fn select_queue(&mut self, index: u16) {
        reg!(self.queue_select).write(index.to_le());
    }

    /// `queue_size` of the selected queue (its maximum until the driver writes a smaller one;
    /// 0 if the queue does not exist).
    pub fn queue_size(&self) -> u16 {
        u16::from_le(reg!(self.queue_size).read())
    }

    /// Writes `queue_size` of the selected queue.
    pub fn set_queue_size(&mut self, size: u16) {
        reg!(self.queue_size).write(size.to_le());
    }

    /// Writes `queue_msix_vector` of the selected queue and returns what the device reads back.
    pub fn set_queue_msix_vector(&mut self, vector: u16) -> u16 {
        reg!(self.queue_msix_vector).write(vector.to_le());
        u16::from_le(reg!(self.queue_msix_vector).read())
    }

    /// `queue_enable` of the selected queue.
    pub fn queue_enable(&self) -> u16 {
        u16::from_le(reg!(self.queue_enable).read())
    }

    /// Writes 1 to `queue_enable` of the selected queue.
    pub fn enable_queue(&mut self) {
        reg!(self.queue_enable).write(1u16.to_le());
    }

    /// `queue_notify_off` of the selected queue.
    pub fn queue_notify_off(&self) -> u16 {
        u16::from_le(reg!(self.queue_notify_off).read())
    }

    /// Writes the descriptor, driver and device area addresses of the selected queue.
    pub fn set_queue_addresses(&mut self, desc: u64, driver: u64, device: u64) {
        reg!(self.queue_desc_lo).write((desc as u32).to_le());
        reg!(self.queue_desc_hi).write(((desc >> 32) as u32).to_le());
        reg!(self.queue_driver_lo).write((driver as u32).to_le());
        reg!(self.queue_driver_hi).write(((driver >> 32) as u32).to_le());
        reg!(self.queue_device_lo).write((device as u32).to_le());
        reg!(self.queue_device_hi).write(((device >> 32) as u32).to_le());
    }

    /// The three queue addresses of the selected queue, as the device holds them.
    pub fn queue_addresses(&self) -> (u64, u64, u64) {
        let join = |lo: u32, hi: u32| u64::from(u32::from_le(lo)) | (u64::from(u32::from_le(hi)) << 32);
        (
            join(reg!(self.queue_desc_lo).read(), reg!(self.queue_desc_hi).read()),
            join(reg!(self.queue_driver_lo).read(), reg!(self.queue_driver_hi).read()),
            join(reg!(self.queue_device_lo).read(), reg!(self.queue_device_hi).read()),
        )
    }
}

/// The device configuration window.
pub struct DeviceCfg {
    base: NonNull<u8>,
    len: u32,
    _bar: Arc<BarMapping>,
}

impl std::fmt::Debug for DeviceCfg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCfg").field("len", &self.len).finish()
    }
}

// SAFETY: as for `Common`.
unsafe impl Send for DeviceCfg {}
// SAFETY: as for `Common`; reads only.
unsafe impl Sync for DeviceCfg {}

impl DeviceCfg {
    /// The window `window` of `bar` (checked to lie inside the mapping and be 4-aligned).
    pub fn new(bar: Arc<BarMapping>, window: &Window) -> Option<Self> {
        // Check both ends of the window against the mapping.
        let base = bar.at::<u32>(u64::from(window.offset))?;
        if !bar.is_mapped(u64::from(window.offset), u64::from(window.length)) {
            return None;
        }
        Some(DeviceCfg { base: base.cast(), len: window.length, _bar: bar })
    }

    /// Bytes in the window.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads `buf.len()` bytes at `offset`, or `None` if they do not all lie in the window.
    ///
    /// Each aligned 4-byte group is read with a 32-bit access, an aligned 2-byte group with
    /// a 16-bit access, and single bytes with 8-bit accesses: a structure read from its start
    /// gets the natural width for its fields (§4.1.3.1; a 64-bit field as two 32-bit reads).
    pub fn read(&self, offset: u32, buf: &mut [u8]) -> Option<()> {
        let len = u32::try_from(buf.len()).ok()?;
        if offset.checked_add(len)? > self.len {
            return None;
        }
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset as usize + pos;
            let left = buf.len() - pos;
            // SAFETY: `offset + len <= self.len`, the window lies inside the mapping (checked in
            // `new`) and its base is 4-aligned, so every access below is in bounds and aligned
            // to its width; `_bar` keeps the mapping alive.
            unsafe {
                let p = self.base.add(at);
                if at % 4 == 0 && left >= 4 {
                    let v = VolatilePtr::new_read_only(p.cast::<u32>()).read();
                    buf[pos..pos + 4].copy_from_slice(&v.to_ne_bytes());
                    pos += 4;
                } else if at % 2 == 0 && left >= 2 {
                    let v = VolatilePtr::new_read_only(p.cast::<u16>()).read();
                    buf[pos..pos + 2].copy_from_slice(&v.to_ne_bytes());
                    pos += 2;
                } else {
                    buf[pos] = VolatilePtr::new_read_only(p).read();
                    pos += 1;
                }
            }
        }
        Some(())
    }
}

/// A queue's notify register: [`virtio_transport_api::Notifier`] of this transport.
///
/// A kick is one volatile 16-bit write of the queue index (VIRTIO_F_NOTIFICATION_DATA is
/// never negotiated) to the queue's notify address; no system call, no allocation.
pub struct PciNotifier {
    reg: NonNull<u16>,
    value: u16,
    _bar: Arc<BarMapping>,
}

impl std::fmt::Debug for PciNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciNotifier").field("reg", &self.reg).field("queue", &self.value).finish()
    }
}

// SAFETY: a pointer to one 16-bit register of a BAR mapping that the `Arc` keeps alive;
// writing it from any thread is a plain MMIO store.
unsafe impl Send for PciNotifier {}
// SAFETY: as for `Send`: concurrent 16-bit MMIO stores to a notify register are what the
// device expects (queues may share a register when notify_off_multiplier is 0).
unsafe impl Sync for PciNotifier {}

impl PciNotifier {
    /// The notifier of queue `queue` writing at `offset` of `bar`, if the register lies in it.
    pub fn new(bar: Arc<BarMapping>, offset: u64, queue: u16) -> Option<Self> {
        let reg = bar.at::<u16>(offset)?;
        Some(PciNotifier { reg, value: queue, _bar: bar })
    }
}

impl virtio_transport_api::Notifier for PciNotifier {
    #[inline]
    fn notify(&self) -> virtio_transport_api::Result<()> {
        // The ring updates (normal and atomic stores) must be visible before the device sees
        // the doorbell: order them before the MMIO store, which is not an atomic.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: `reg` is an aligned 16-bit register inside the mapping `_bar` keeps alive
        // (checked in `new`); the store is volatile and nothing reads through a reference.
        unsafe { VolatilePtr::new(self.reg) }.write(self.value.to_le());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_transport_api::{MemFd, Notifier};

    /// A "BAR" backed by a memfd: the register code runs against ordinary memory.
    fn fake_bar(len: usize) -> (MemFd, Arc<BarMapping>) {
        let m = MemFd::new("bar", len).unwrap();
        let bar = BarMapping::map(m.fd(), 4, 0, m.len() as u64).unwrap();
        (m, Arc::new(bar))
    }

    fn peek<T: Copy>(m: &MemFd, off: usize) -> T {
        // SAFETY: inside the memfd's mapping; a volatile read of memory the test owns.
        unsafe { m.as_ptr().add(off).cast::<T>().read_volatile() }
    }

    fn poke<T: Copy>(m: &MemFd, off: usize, v: T) {
        // SAFETY: as for `peek`.
        unsafe { m.as_ptr().add(off).cast::<T>().write_volatile(v) }
    }

    #[test]
    fn common_registers_are_at_spec_offsets() {
        let (m, bar) = fake_bar(4096);
        let w = Window { bar: 4, offset: 0x100, length: 0x100 };
        let mut c = Common::new(Arc::clone(&bar), &w).unwrap();
        poke::<u32>(&m, 0x104, 0xdead_beef);
        assert_eq!(c.device_features() & 0xffff_ffff, 0xdead_beef);
        assert_eq!(peek::<u32>(&m, 0x100), 1, "device_feature_select left at 1 after reading the high half");
        c.set_driver_features(0x3_0000_0001);
        assert_eq!(peek::<u32>(&m, 0x108), 1);
        assert_eq!(peek::<u32>(&m, 0x10c), 3, "the high half is written last");
        c.set_device_status(0x0f);
        assert_eq!(peek::<u8>(&m, 0x114), 0x0f);
        poke::<u8>(&m, 0x115, 9);
        assert_eq!(c.config_generation(), 9);
        poke::<u16>(&m, 0x112, 2);
        assert_eq!(c.num_queues(), 2);
        c.select_queue(1);
        assert_eq!(peek::<u16>(&m, 0x116), 1);
        c.set_queue_size(64);
        assert_eq!(c.queue_size(), 64);
        assert_eq!(c.set_queue_msix_vector(3), 3);
        assert_eq!(c.set_config_msix_vector(VIRTIO_MSI_NO_VECTOR), VIRTIO_MSI_NO_VECTOR);
        c.set_queue_addresses(0x1_2345_6000, 0x2000, 0xffff_ffff_0000_3000);
        assert_eq!(peek::<u32>(&m, 0x120), 0x2345_6000);
        assert_eq!(peek::<u32>(&m, 0x124), 1);
        assert_eq!(c.queue_addresses(), (0x1_2345_6000, 0x2000, 0xffff_ffff_0000_3000));
        c.enable_queue();
        assert_eq!(peek::<u16>(&m, 0x11c), 1);
        assert_eq!(c.queue_enable(), 1);
        poke::<u16>(&m, 0x11e, 5);
        assert_eq!(c.queue_notify_off(), 5);
        // Outside the mapping: refused.
        assert!(Common::new(Arc::clone(&bar), &Window { bar: 4, offset: 4090, length: 56 }).is_none());
    }

    #[test]
    fn device_config_reads_are_bounded_and_byte_exact() {
        let (m, bar) = fake_bar(4096);
        for i in 0..64u8 {
            poke::<u8>(&m, 0x200 + usize::from(i), i);
        }
        let d = DeviceCfg::new(Arc::clone(&bar), &Window { bar: 4, offset: 0x200, length: 60 }).unwrap();
        let mut buf = [0u8; 60];
        d.read(0, &mut buf).unwrap();
        assert_eq!(buf.to_vec(), (0..60).collect::<Vec<u8>>());
        let mut odd = [0u8; 7];
        d.read(3, &mut odd).unwrap();
        assert_eq!(odd, [3, 4, 5, 6, 7, 8, 9]);
        assert!(d.read(57, &mut [0u8; 4]).is_none(), "past the window");
        assert!(d.read(u32::MAX, &mut [0u8; 2]).is_none(), "offset overflow");
        assert!(d.read(60, &mut []).is_some());
        assert!(DeviceCfg::new(Arc::clone(&bar), &Window { bar: 4, offset: 4000, length: 200 }).is_none());
        assert!(DeviceCfg::new(Arc::clone(&bar), &Window { bar: 4, offset: 0x202, length: 4 }).is_none(), "unaligned");
    }

    #[test]
    fn sparse_bars_reach_only_their_mapped_areas() {
        let m = MemFd::new("sparse-bar", 4 * 4096).unwrap();
        poke::<u32>(&m, 0x10, 0x1234_5678);
        poke::<u16>(&m, 3 * 4096 + 4, 0xbeef);
        // The "MSI-X table" is in the second and third pages, which are not mapped.
        let bar = Arc::new(BarMapping::map_sparse(m.fd(), 1, 0, 4 * 4096, &[(0, 4096), (3 * 4096, 4096)]).unwrap());
        assert!(bar.is_mapped(0, 4096) && bar.is_mapped(3 * 4096, 4096));
        assert!(!bar.is_mapped(4096, 4) && !bar.is_mapped(4094, 4), "a hole, and a range crossing into it");
        let d = DeviceCfg::new(Arc::clone(&bar), &Window { bar: 1, offset: 0x10, length: 4 }).unwrap();
        let mut v = [0u8; 4];
        d.read(0, &mut v).unwrap();
        assert_eq!(u32::from_ne_bytes(v), 0x1234_5678);
        assert!(DeviceCfg::new(Arc::clone(&bar), &Window { bar: 1, offset: 4000, length: 200 }).is_none());
        assert!(Common::new(Arc::clone(&bar), &Window { bar: 1, offset: 4096, length: 56 }).is_none());
        let n = PciNotifier::new(Arc::clone(&bar), 3 * 4096 + 4, 9).unwrap();
        n.notify().unwrap();
        assert_eq!(peek::<u16>(&m, 3 * 4096 + 4), 9, "the notify write reached the file through the sparse area");
        assert!(PciNotifier::new(Arc::clone(&bar), 2 * 4096, 0).is_none());
        // Areas outside the BAR are refused.
        assert!(BarMapping::map_sparse(m.fd(), 1, 0, 4096, &[(0, 8192)]).is_err());
        assert!(BarMapping::map_sparse(m.fd(), 1, 0, 4096, &[(u64::MAX, 2)]).is_err());
    }

    #[test]
    fn notifier_writes_the_queue_index() {
        let (m, bar) = fake_bar(4096);
        let n = PciNotifier::new(Arc::clone(&bar), 0x304, 1).unwrap();
        n.notify().unwrap();
        assert_eq!(peek::<u16>(&m, 0x304), 1);
        assert!(PciNotifier::new(Arc::clone(&bar), 4095, 0).is_none());
        assert!(PciNotifier::new(bar, 0x305, 0).is_none(), "unaligned");
        fn is_send<T: Send>() {}
        is_send::<PciNotifier>();
    }
}
