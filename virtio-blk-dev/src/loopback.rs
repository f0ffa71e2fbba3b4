//! A virtio-blk device for the in-process loopback transport (feature
//! `loopback`): a RAM disk behind
//! [`virtio_transport_api::loopback::LoopbackTransport`], for unit tests and
//! benchmarks of this crate with no backend at all.
//!
//! [`RamDisk`] serves every request type of the driver (read, write, flush,
//! get-id, discard, write-zeroes, secure-erase) and can misbehave on purpose:
//! a range of bad sectors whose reads end in each kind of bad status byte,
//! or in a stray write beyond a good one ([`RamDisk::bad_sectors`]), and a GET_ID answered with a used id the driver
//! never gave out ([`RamDisk::hostile_get_id`]). A request that breaks the
//! virtio-blk protocol (no header, a status buffer that is not the last
//! one-byte writable buffer, data in the wrong direction) is answered with
//! `VIRTIO_BLK_S_IOERR` and counted in [`RamDisk::violations`], never a panic.
//!
//! ```
//! use std::time::Duration;
//! use virtio_blk_dev::loopback::RamDisk;
//! use virtio_blk_dev::{BlkDevice, BlkOptions};
//! use virtio_transport_api::loopback::{LoopbackTransport, ServiceMode};
//!
//! let transport = LoopbackTransport::new(RamDisk::new(2048), ServiceMode::Manual);
//! let handle = transport.handle();
//! let mut dev = BlkDevice::open(transport, BlkOptions::default()).unwrap();
//! let mut buf = dev.alloc_buf(4096).unwrap();
//! buf.fill(0xab);
//! let mut q = dev.take_queue(0).unwrap();
//! q.submit_write(8192, buf, 1).map_err(|r| r.error).unwrap();
//! q.publish().unwrap();
//! handle.process().unwrap(); // the device runs here, in this thread
//! let done = q.poll().expect("completed");
//! done.result.unwrap();
//! assert!(handle.with_device(|d| d.disk()[8192..12288].iter().all(|&b| b == 0xab)));
//! ```

use virtio_queue_core::device::{AvailChain, DescInfo};
use virtio_transport_api::loopback::{DeviceMemory, LoopbackDevice, Served};
use virtio_transport_api::VirtioFeatures;
use zerocopy::IntoBytes;

use crate::config::{BlkConfig, BlkFeatures};
use crate::device::VIRTIO_ID_BLOCK;
use crate::spec::{
    HEADER_LEN, ID_LEN, SECTOR_SIZE, SEGMENT_LEN, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_SECURE_ERASE, T_WRITE_ZEROES,
};

/// Sectors past [`RamDisk::bad_sectors`]' first one that each fault covers.
pub const BAD_SECTOR_SPAN: u64 = 40;

/// A RAM-backed virtio-blk device for
/// [`LoopbackTransport`](virtio_transport_api::loopback::LoopbackTransport).
#[derive(Debug)]
pub struct RamDisk {
    config: BlkConfig,
    features: u64,
    max_queue_size: u16,
    disk: Vec<u8>,
    serial: [u8; ID_LEN],
    bad_sector: Option<u64>,
    /// The request being served writes a stray byte after its status byte.
    stray_status_write: bool,
    hostile_get_id: bool,
    violations: u64,
    served: u64,
}

impl RamDisk {
    /// A disk of `sectors` 512-byte sectors, zero-filled, offering VERSION_1,
    /// every virtio-blk feature but RO and every ring feature (packed,
    /// EVENT_IDX, indirect, IN_ORDER), one queue of up to 256 entries, a
    /// default configuration (512-byte blocks, no segment limits) and the
    /// serial `loopback-ramdisk`.
    pub fn new(sectors: u64) -> Self {
        let mut config = BlkConfig::default();
        config.capacity.set(sectors);
        config.blk_size.set(512);
        config.num_queues.set(1);
        config.max_discard_sectors.set(u32::MAX);
        config.max_discard_seg.set(1);
        config.max_write_zeroes_sectors.set(u32::MAX);
        config.max_write_zeroes_seg.set(1);
        config.max_secure_erase_sectors.set(u32::MAX);
        config.max_secure_erase_seg.set(1);
        let mut serial = [0u8; ID_LEN];
        serial[..16].copy_from_slice(b"loopback-ramdisk");
        let ring = VirtioFeatures::RING_PACKED
            | VirtioFeatures::EVENT_IDX
            | VirtioFeatures::INDIRECT_DESC
            | VirtioFeatures::IN_ORDER
            | VirtioFeatures::VERSION_1;
        let blk = BlkFeatures::all() - BlkFeatures::RO - BlkFeatures::SIZE_MAX - BlkFeatures::SEG_MAX;
        RamDisk {
            config,
            features: blk.bits() | ring.bits(),
            max_queue_size: 256,
            disk: vec![0u8; usize::try_from(sectors * SECTOR_SIZE).unwrap_or(0)],
            serial,
            bad_sector: None,
            stray_status_write: false,
            hostile_get_id: false,
            violations: 0,
            served: 0,
        }
    }

    /// Offers exactly `blk` and `ring` (VERSION_1 is always added).
    pub fn offer(mut self, blk: BlkFeatures, ring: VirtioFeatures) -> Self {
        self.features = blk.bits() | ring.bits() | VirtioFeatures::VERSION_1.bits();
        self
    }

    /// The configuration space, to change limits, topology, queue count ...
    /// (`capacity` is kept as given to [`RamDisk::new`]).
    pub fn config_mut(&mut self) -> &mut BlkConfig {
        &mut self.config
    }

    /// Sets the largest queue size the device accepts.
    pub fn max_queue_size(mut self, size: u16) -> Self {
        self.max_queue_size = size;
        self
    }

    /// Sets the device ID returned by GET_ID.
    pub fn serial(mut self, serial: [u8; ID_LEN]) -> Self {
        self.serial = serial;
        self
    }

    /// Fault injection: reads that start in `first .. first + 40` misbehave.
    /// Starting at `first`: status IOERR; at `first + 8`: the status byte is
    /// not written (and 0 bytes are reported used); at `first + 16`: the
    /// undefined status 7; at `first + 32`: served, status OK, and a stray
    /// 0x5a written into the byte after the status byte (outside every
    /// buffer of the chain); anywhere else in the span: UNSUPP.
    pub fn bad_sectors(mut self, first: u64) -> Self {
        self.bad_sector = Some(first);
        self
    }

    /// Fault injection: answer GET_ID with a used id 1000 above the chain's,
    /// which no driver gave out (the driver must treat the ring as broken).
    pub fn hostile_get_id(mut self, on: bool) -> Self {
        self.hostile_get_id = on;
        self
    }

    /// The disk's bytes.
    pub fn disk(&self) -> &[u8] {
        &self.disk
    }

    /// Requests that broke the virtio-blk protocol (answered with IOERR).
    pub fn violations(&self) -> u64 {
        self.violations
    }

    /// Requests served.
    pub fn served(&self) -> u64 {
        self.served
    }

    /// The byte range of `len` bytes at `sector`, if it is on the disk.
    fn range(&self, sector: u64, len: u64) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(sector.checked_mul(SECTOR_SIZE)?).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        (end <= self.disk.len()).then_some(start..end)
    }

    /// Serves a well-formed request; returns the status byte (`None`: leave
    /// it unwritten) and the bytes written into data buffers.
    fn request(&mut self, mem: &DeviceMemory<'_>, ty: u32, sector: u64, data: &[DescInfo]) -> (Option<u8>, u32) {
        match ty {
            T_IN | T_OUT => {
                let read = ty == T_IN;
                if data.iter().any(|d| d.writable != read) {
                    self.violations += 1;
                    return (Some(S_IOERR), 0);
                }
                if read {
                    if let Some(first) = self.bad_sector.filter(|f| (*f..f + BAD_SECTOR_SPAN).contains(&sector)) {
                        match sector - first {
                            0 => return (Some(S_IOERR), 0),
                            8 => return (None, 0),
                            16 => return (Some(7), 0),
                            32 => self.stray_status_write = true,
                            _ => return (Some(S_UNSUPP), 0),
                        }
                    }
                }
                let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
                let Some(range) = self.range(sector, total) else { return (Some(S_IOERR), 0) };
                let mut pos = range.start;
                let mut written = 0u32;
                for d in data {
                    let Some(bytes) = self.disk.get_mut(pos..pos + d.len as usize) else {
                        return (Some(S_IOERR), written);
                    };
                    let ok = if read { mem.write(d.addr, bytes) } else { mem.read(d.addr, bytes) };
                    if !ok {
                        self.violations += 1;
                        return (Some(S_IOERR), written);
                    }
                    if read {
                        written += d.len;
                    }
                    pos += d.len as usize;
                }
                (Some(S_OK), written)
            }
            T_FLUSH => (Some(S_OK), 0),
            T_GET_ID => match data {
                [d] if d.writable && d.len as usize >= ID_LEN && mem.write(d.addr, &self.serial) => {
                    (Some(S_OK), ID_LEN as u32)
                }
                _ => {
                    self.violations += 1;
                    (Some(S_IOERR), 0)
                }
            },
            T_DISCARD | T_WRITE_ZEROES | T_SECURE_ERASE => {
                let mut seg = [0u8; SEGMENT_LEN];
                let ok =
                    matches!(data, [d] if !d.writable && d.len as usize == SEGMENT_LEN && mem.read(d.addr, &mut seg));
                if !ok {
                    self.violations += 1;
                    return (Some(S_IOERR), 0);
                }
                let (s, rest) = seg.split_at(8);
                let start = u64::from_le_bytes(s.try_into().unwrap_or_default());
                let count = u32::from_le_bytes(rest.get(..4).and_then(|b| b.try_into().ok()).unwrap_or_default());
                match self.range(start, u64::from(count) * SECTOR_SIZE) {
                    Some(r) => {
                        if let Some(bytes) = self.disk.get_mut(r) {
                            bytes.fill(0);
                        }
                        (Some(S_OK), 0)
                    }
                    None => (Some(S_IOERR), 0),
                }
            }
            _ => (Some(S_UNSUPP), 0),
        }
    }
}

impl LoopbackDevice for RamDisk {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config(&self) -> &[u8] {
        self.config.as_bytes()
    }

    fn num_queues(&self) -> u16 {
        if self.features & BlkFeatures::MQ.bits() != 0 {
            self.config.num_queues.get().max(1)
        } else {
            1
        }
    }

    fn max_queue_size(&self, _queue: u16) -> u16 {
        self.max_queue_size
    }

    fn serve(&mut self, _queue: u16, mem: &DeviceMemory<'_>, chain: &AvailChain) -> Served {
        self.served += 1;
        let d = chain.descriptors();
        let (Some(hdr), Some(status), Some(data)) = (d.first(), d.last(), d.get(1..d.len().saturating_sub(1))) else {
            self.violations += 1;
            return Served::Used(0);
        };
        let mut h = [0u8; HEADER_LEN];
        if hdr.writable || (hdr.len as usize) < HEADER_LEN || !mem.read(hdr.addr, &mut h) {
            self.violations += 1;
            return Served::Used(0);
        }
        if !status.writable || status.len != 1 || d.len() < 2 {
            self.violations += 1;
            return Served::Used(0);
        }
        let (t, rest) = h.split_at(4);
        let ty = u32::from_le_bytes(t.try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(rest.get(4..12).and_then(|b| b.try_into().ok()).unwrap_or_default());
        let (st, written) = self.request(mem, ty, sector, data);
        let Some(st) = st else { return Served::Used(0) };
        if !mem.write(status.addr, &[st]) {
            self.violations += 1;
            return Served::Used(written);
        }
        if std::mem::take(&mut self.stray_status_write) {
            // Deliberately outside the chain's buffers: not a violation of
            // the driver's.
            let _ = mem.write(status.addr + 1, &[0x5a]);
        }
        if ty == T_GET_ID && self.hostile_get_id {
            return Served::UsedAs { id: chain.id.wrapping_add(1000), len: written + 1 };
        }
        Served::Used(written + 1)
    }
}
