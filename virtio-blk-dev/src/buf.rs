//! Owned buffers of device-visible memory.

use std::sync::Arc;

use virtio_queue_core::SharedMemory;
use virtio_transport_api::DmaRegion;

/// An owned slice of device-visible memory (from [`virtio_transport_api::Transport::alloc_dma`]).
///
/// A `DmaBuf` is not `Clone`: whoever holds it is the only one that can
/// reach its bytes. Submitting a request moves the buffer into the queue and
/// the [`crate::Completion`] hands it back, so the caller cannot free or
/// reuse memory the device may still write. Its bytes are only accessed
/// through copies made with atomic byte accesses ([`DmaBuf::read`],
/// [`DmaBuf::write`]), never through Rust references, so a device writing
/// it at any time cannot cause undefined behaviour.
///
/// Several buffers may share one region ([`DmaBuf::split`]); the region is
/// released (unregistered from the device) when the last of them is dropped.
#[derive(Debug)]
pub struct DmaBuf {
    region: Arc<DmaRegion>,
    /// The device address of the first byte, computed once here: submitting
    /// a request reads it without going through the `Arc`. The offset in
    /// the region is `iova - region.iova()`.
    iova: u64,
    len: usize,
}

impl DmaBuf {
    /// The whole of `region` as one buffer.
    pub fn new(region: DmaRegion) -> Self {
        let (len, iova) = (region.len(), region.iova());
        DmaBuf { region: Arc::new(region), iova, len }
    }

    /// Splits `region` into `count` disjoint buffers of `len` bytes each,
    /// each starting on a 16-byte boundary (so `len` is rounded up for the
    /// stride). Returns `None` if they do not fit.
    pub fn split(region: DmaRegion, len: usize, count: usize) -> Option<Vec<DmaBuf>> {
        let stride = len.checked_add(15)? & !15;
        if stride.checked_mul(count)? > region.len() || len == 0 {
            return None;
        }
        let iova = region.iova();
        let region = Arc::new(region);
        let buf = |i: usize| DmaBuf { region: region.clone(), iova: iova.wrapping_add((i * stride) as u64), len };
        Some((0..count).map(buf).collect())
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the first byte.
    #[inline]
    pub fn iova(&self) -> u64 {
        self.iova
    }

    fn mem(&self) -> SharedMemory<'_> {
        let whole = self.region.shared_memory();
        let offset = self.iova.wrapping_sub(self.region.iova()) as usize;
        // `offset` is a multiple of 16 and the buffer lies inside the region
        // (checked in `split`), so the window exists.
        whole.slice(offset, self.len).unwrap_or(SharedMemory::new(&[]))
    }

    /// Copies `data` into the buffer at `offset`; `false` if it does not fit.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> bool {
        self.mem().write_bytes(offset, data)
    }

    /// Copies bytes at `offset` of the buffer into `out`; `false` if out of bounds.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        self.mem().read_bytes(offset, out)
    }

    /// The buffer's bytes as a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.read(0, &mut v);
        v
    }

    /// Sets every byte to `value`.
    pub fn fill(&mut self, value: u8) {
        const CHUNK: usize = 512;
        let block = [value; CHUNK];
        let mut off = 0;
        while off < self.len {
            let n = CHUNK.min(self.len - off);
            self.mem().write_bytes(off, &block[..n]);
            off += n;
        }
    }
}
