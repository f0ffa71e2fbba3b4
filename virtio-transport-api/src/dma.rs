//! Device-visible memory handed out by a transport.

use std::any::Any;
use std::ptr::NonNull;

use virtio_queue_core::SharedMemory;

/// Memory the device can access: a process mapping, its length, and its device
/// address (IOVA). Dropping it unregisters (unmaps) it from the device and then
/// releases the memory.
///
/// Everything placed in a `DmaRegion` that the device reads or writes while it
/// owns it must be accessed through [`DmaRegion::shared_memory`] (atomics) or
/// raw-pointer volatile accesses, never through Rust references.
pub struct DmaRegion {
    ptr: NonNull<u8>,
    len: usize,
    iova: u64,
    /// Unregisters on drop, then frees the memory (a memfd, a DMA mapping ...).
    _owner: Box<dyn Any + Send + Sync>,
}

// SAFETY: the region is plain memory plus an owner that is `Send + Sync`; the
// raw pointer is only exposed, never dereferenced through `&self` methods other
// than by creating atomic views.
unsafe impl Send for DmaRegion {}
// SAFETY: as for `Send`.
unsafe impl Sync for DmaRegion {}

impl std::fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaRegion").field("ptr", &self.ptr).field("len", &self.len).field("iova", &self.iova).finish()
    }
}

impl DmaRegion {
    /// A region of `len` bytes at `ptr`, seen by the device at `iova`. `owner`
    /// is dropped when the region is: it must unregister the memory from the
    /// device and then free it. Returns `None` if `ptr` is not 64-byte aligned
    /// (transports hand out page-aligned memory).
    ///
    /// # Safety
    ///
    /// Until `owner` is dropped, the `len` bytes at `ptr` must stay mapped,
    /// readable and writable, and the device must see them at `iova ..
    /// iova + len`.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize, iova: u64, owner: Box<dyn Any + Send + Sync>) -> Option<Self> {
        if ptr.as_ptr() as usize % 64 != 0 {
            return None;
        }
        Some(DmaRegion { ptr, len, iova, _owner: owner })
    }

    /// The process address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The device address of byte `offset`, if it lies inside the region.
    pub fn iova_at(&self, offset: usize) -> Option<u64> {
        (offset < self.len).then(|| self.iova + offset as u64)
    }

    /// An atomic-access view of the whole region, for ring memory, indirect
    /// tables and request headers. It borrows the region, so a queue built on
    /// it cannot outlive the memory.
    pub fn shared_memory(&self) -> SharedMemory<'_> {
        // SAFETY: the memory stays mapped while `self` lives (the contract of
        // `new`), and `'_` borrows `self`; the alignment was checked in `new`.
        match unsafe { SharedMemory::from_raw_parts(self.ptr, self.len) } {
            Some(m) => m,
            None => SharedMemory::new(&[]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memfd::MemFd;

    #[test]
    fn region_over_a_memfd() {
        let m = MemFd::new("dma", 8192).unwrap();
        let (ptr, len) = (m.as_non_null(), m.len());
        // SAFETY: the memfd owns the mapping and is the owner.
        let r = unsafe { DmaRegion::new(ptr, len, 0x10_0000, Box::new(m)) }.unwrap();
        assert_eq!(r.len(), 8192);
        assert_eq!(r.iova_at(16), Some(0x10_0010));
        assert_eq!(r.iova_at(8192), None);
        let s = r.shared_memory();
        assert_eq!(s.len(), 8192);
        assert!(s.write_bytes(100, b"abc"));
        let mut out = [0u8; 3];
        assert!(s.read_bytes(100, &mut out));
        assert_eq!(&out, b"abc");
        // SAFETY: in bounds, a plain read of what was written atomically above.
        assert_eq!(unsafe { r.as_ptr().add(101).read_volatile() }, b'b');
    }
}
