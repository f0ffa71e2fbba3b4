//! Against an in-process model device: the core's device model playing a
//! virtio-blk device behind a fake transport. Covers what the real back-ends
//! here do not offer (packed rings, IN_ORDER, RO/TOPOLOGY/CONFIG_WCE/
//! SECURE_ERASE in the config) and status bytes they never return (IOERR,
//! UNSUPP, no status written, undefined values).

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_blk_dev::{BlkConfig, BlkDevice, BlkError, BlkFeatures, BlkOptions, Bufs, DeviceStatus, RequestKind};
use virtio_queue_core::device::{AvailChain, DeviceConfig, MemoryRegion, PackedDevice, SplitDevice};
use virtio_queue_core::{RingFeatures, RingFormat, RingLayout, SharedMemory};
use virtio_transport_api::{
    Cause, CompletionEvent, DeviceStatus as Status, DmaRegion, Error, EventFd, MemFd, QueueSetup, Result, Step,
    Transport, VirtioFeatures,
};
use zerocopy::IntoBytes;

const SECTORS: u64 = 8192; // 4 MiB
/// Reads of this sector fail with IOERR; of the next, the status is not
/// written; of the next, the status is 7; of the next, UNSUPP.
const BAD_SECTOR: u64 = 4000;

/// Every region handed out: (address = IOVA, length). Never unmapped.
type Regions = Arc<Mutex<Vec<(u64, usize)>>>;

fn mem_at(regions: &Regions, addr: u64, len: usize) -> Option<(SharedMemory<'static>, usize)> {
    let r = regions.lock().unwrap();
    let &(base, rlen) = r.iter().find(|&&(b, l)| addr >= b && addr + len as u64 <= b + l as u64)?;
    // SAFETY: the region is a leaked memfd mapping (never unmapped), accessed atomically only.
    let m = unsafe { SharedMemory::from_raw_parts(NonNull::new(base as *mut u8)?, rlen) }?;
    Some((m, (addr - base) as usize))
}

fn read(regions: &Regions, addr: u64, out: &mut [u8]) {
    let (m, off) = mem_at(regions, addr, out.len()).expect("device read of unmapped memory");
    assert!(m.read_bytes(off, out));
}

fn write(regions: &Regions, addr: u64, data: &[u8]) {
    let (m, off) = mem_at(regions, addr, data.len()).expect("device write to unmapped memory");
    assert!(m.write_bytes(off, data));
}

enum Model {
    Split(SplitDevice<'static>),
    Packed(PackedDevice<'static>),
}

struct Fake {
    offered: u64,
    driver: u64,
    status: Status,
    config: BlkConfig,
    queues: u16,
    regions: Regions,
    disk: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Split rings: answer GET_ID with a used id that was never in flight.
    hostile_get_id: bool,
}

impl Fake {
    fn new(offered_blk: BlkFeatures, ring: VirtioFeatures, queues: u16) -> Fake {
        let mut config = BlkConfig::default();
        config.capacity.set(SECTORS);
        config.seg_max.set(8);
        config.size_max.set(64 * 1024);
        config.blk_size.set(4096);
        config.physical_block_exp = 1;
        config.min_io_size.set(1);
        config.opt_io_size.set(32);
        config.writeback = 1;
        config.num_queues.set(queues);
        config.max_discard_sectors.set(2048);
        config.max_discard_seg.set(1);
        config.max_write_zeroes_sectors.set(2048);
        config.max_write_zeroes_seg.set(1);
        config.max_secure_erase_sectors.set(64);
        config.max_secure_erase_seg.set(1);
        Fake {
            offered: offered_blk.bits() | ring.bits() | VirtioFeatures::VERSION_1.bits(),
            driver: 0,
            status: Status::empty(),
            config,
            queues,
            regions: Arc::default(),
            disk: Arc::new(Mutex::new(vec![0u8; (SECTORS * 512) as usize])),
            stop: Arc::default(),
            threads: Vec::new(),
            hostile_get_id: false,
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Serves one request; returns the used length and the request type.
fn serve(regions: &Regions, disk: &Mutex<Vec<u8>>, chain: &AvailChain) -> (u32, u32) {
    let mut hdr = [0u8; 4];
    read(regions, chain.descriptors()[0].addr, &mut hdr);
    (serve_one(regions, disk, chain), u32::from_le_bytes(hdr))
}

fn serve_one(regions: &Regions, disk: &Mutex<Vec<u8>>, chain: &AvailChain) -> u32 {
    let d = chain.descriptors();
    let mut hdr = [0u8; 16];
    read(regions, d[0].addr, &mut hdr);
    let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    let status = d.last().unwrap();
    assert!(status.writable && status.len == 1, "status is the last, writable, 1-byte buffer");
    let data = &d[1..d.len() - 1];
    let mut st = 0u8;
    let mut written = 0u32;
    match ty {
        0 | 1 => {
            if ty == 0 && (BAD_SECTOR..BAD_SECTOR + 32).contains(&sector) {
                match sector - BAD_SECTOR {
                    0 => st = 1,
                    8 => return 0, // status not written
                    16 => st = 7,
                    _ => st = 2,
                }
            } else {
                let mut disk = disk.lock().unwrap();
                let mut pos = (sector * 512) as usize;
                for b in data {
                    assert_eq!(b.writable, ty == 0, "data direction");
                    let range = pos..pos + b.len as usize;
                    if ty == 0 {
                        write(regions, b.addr, &disk[range]);
                        written += b.len;
                    } else {
                        read(regions, b.addr, &mut disk[range]);
                    }
                    pos += b.len as usize;
                }
            }
        }
        4 => {}
        8 => {
            write(regions, data[0].addr, b"model-serial\0\0\0\0\0\0\0\0");
            written = 20;
        }
        11 | 13 | 14 => {
            let mut seg = [0u8; 16];
            read(regions, data[0].addr, &mut seg);
            let s = u64::from_le_bytes(seg[0..8].try_into().unwrap()) as usize * 512;
            let n = u32::from_le_bytes(seg[8..12].try_into().unwrap()) as usize * 512;
            disk.lock().unwrap()[s..s + n].fill(0);
        }
        _ => st = 2,
    }
    if ty == 0 && sector == BAD_SECTOR + 8 {
        return 0;
    }
    write(regions, status.addr, &[st]);
    written + 1
}

impl Transport for Fake {
    type Notifier = EventFd;
    fn name(&self) -> &'static str {
        "model"
    }
    fn device_id(&self) -> u32 {
        2
    }
    fn reset(&mut self) -> Result<()> {
        self.status = Status::empty();
        Ok(())
    }
    fn status(&mut self) -> Result<Status> {
        Ok(self.status)
    }
    fn set_status(&mut self, status: Status) -> Result<()> {
        self.status = status;
        Ok(())
    }
    fn device_features(&mut self) -> Result<u64> {
        Ok(self.offered)
    }
    fn set_driver_features(&mut self, features: u64) -> Result<()> {
        assert_eq!(features & !self.offered, 0, "only offered features are accepted");
        self.driver = features;
        Ok(())
    }
    fn config_generation(&mut self) -> Result<u32> {
        Ok(0)
    }
    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        let c = self.config.as_bytes();
        buf.copy_from_slice(&c[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn max_queues(&self) -> u16 {
        self.queues
    }
    fn max_queue_size(&mut self, _index: u16) -> Result<u16> {
        Ok(64)
    }
    fn setup_queue(&mut self, index: u16, setup: &QueueSetup) -> Result<(EventFd, CompletionEvent)> {
        let layout = RingLayout::new(setup.format, setup.size).unwrap();
        let (ring, off) = mem_at(&self.regions, setup.addresses.desc, layout.size()).unwrap();
        let ring = ring.slice(off, layout.size()).unwrap();
        let regions: Vec<(u64, usize)> = self.regions.lock().unwrap().clone();
        let memory: &'static [MemoryRegion<'static>] = Box::leak(
            regions
                .iter()
                .map(|&(addr, _)| MemoryRegion { addr, mem: mem_at(&self.regions, addr, 0).unwrap().0 })
                .collect(),
        );
        let features = VirtioFeatures::ring_features_of(self.driver);
        let cfg = DeviceConfig { layout, ring, features, memory };
        let mut model = match setup.format {
            RingFormat::Split => Model::Split(SplitDevice::new(cfg).unwrap()),
            RingFormat::Packed => Model::Packed(PackedDevice::new(cfg).unwrap()),
        };
        let kick = EventFd::new()?;
        let call = EventFd::new()?;
        let kicked = CompletionEvent::new("model", index, kick.try_clone().unwrap(), None);
        let signal = call.try_clone().unwrap();
        let (regions, disk, stop) = (self.regions.clone(), self.disk.clone(), self.stop.clone());
        let hostile = self.hostile_get_id;
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                loop {
                    match &mut model {
                        Model::Split(m) => m.disable_kicks(),
                        Model::Packed(m) => m.disable_kicks(),
                    }
                    loop {
                        let chain = match &mut model {
                            Model::Split(m) => m.pop_avail(),
                            Model::Packed(m) => m.pop_avail(),
                        };
                        let Some(chain) = chain.expect("the driver follows the ring protocol") else { break };
                        let (len, ty) = serve(&regions, &disk, &chain);
                        match &mut model {
                            Model::Split(m) if hostile && ty == 8 => m.push_used(u32::from(chain.id) + 1000, len),
                            Model::Split(m) => m.push_used(u32::from(chain.id), len),
                            Model::Packed(m) => m.push_used(&chain, len),
                        }
                    }
                    let notify = match &mut model {
                        Model::Split(m) => m.publish_used(),
                        Model::Packed(m) => m.publish_used(),
                    };
                    if notify {
                        signal.signal().unwrap();
                    }
                    let more = match &mut model {
                        Model::Split(m) => m.enable_kicks(),
                        Model::Packed(m) => m.enable_kicks(),
                    };
                    if !more {
                        break;
                    }
                }
                let _ = kicked.wait(Some(Duration::from_millis(5)));
            }
        }));
        Ok((kick, CompletionEvent::new("model", index, call, None)))
    }
    fn alloc_dma(&self, len: usize) -> Result<DmaRegion> {
        let m = MemFd::new("model", len).map_err(|e| Error::os("model", Step::Memory, e))?;
        let m: &'static MemFd = Box::leak(Box::new(m));
        let (p, l) = (m.as_non_null(), m.len());
        self.regions.lock().unwrap().push((p.as_ptr() as u64, l));
        // SAFETY: the memfd is leaked, so the mapping lives forever; identity IOVA.
        unsafe { DmaRegion::new(p, l, p.as_ptr() as u64, Box::new(())) }
            .ok_or_else(|| Error::new("model", Step::Memory, Cause::InvalidArgument("misaligned".into())))
    }
    unsafe fn map_memory(&self, addr: *mut u8, _len: usize, _fd: BorrowedFd<'_>, _offset: u64) -> Result<u64> {
        Ok(addr as u64)
    }
    unsafe fn unmap_memory(&self, _addr: *mut u8) -> Result<()> {
        Ok(())
    }
    fn translate(&self, addr: *const u8, _len: usize) -> Option<u64> {
        Some(addr as u64)
    }
}

fn all_blk() -> BlkFeatures {
    BlkFeatures::all() - BlkFeatures::RO
}

fn all_ring() -> VirtioFeatures {
    VirtioFeatures::RING_PACKED | VirtioFeatures::EVENT_IDX | VirtioFeatures::INDIRECT_DESC | VirtioFeatures::IN_ORDER
}

fn roundtrip(dev: &mut BlkDevice<Fake>) {
    let bs = dev.block_size() as usize;
    let mut bufs = dev.alloc_bufs(bs, 4).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    let data: Vec<u8> = (0..3 * bs).map(|i| (i * 13 + 5) as u8).collect();
    q.write_at(3 * bs as u64, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    q.read_at(3 * bs as u64, &mut back).unwrap();
    assert_eq!(back, data);
    // readv across three buffers.
    let three: Vec<_> = (0..3).map(|_| bufs.pop().unwrap()).collect();
    q.submit_readv(3 * bs as u64, three, 5).unwrap();
    let c = q.wait(Some(Duration::from_secs(5))).unwrap();
    c.result.unwrap();
    let Bufs::Many(three) = c.bufs else { panic!() };
    let got: Vec<u8> = three.iter().flat_map(|b| b.to_vec()).collect();
    assert_eq!(got, data);
    q.flush().unwrap();
    assert_eq!(&q.get_id().unwrap()[..12], b"model-serial");
    q.submit_secure_erase(3 * bs as u64, bs as u64, 6).unwrap();
    q.wait(Some(Duration::from_secs(5))).unwrap().result.unwrap();
    q.read_at(3 * bs as u64, &mut back[..bs]).unwrap();
    assert!(back[..bs].iter().all(|&b| b == 0));
    // A single-buffer read into the last buffer.
    q.submit_read(0, bufs.pop().unwrap(), 1).unwrap();
    let c = q.wait(Some(Duration::from_secs(5))).unwrap();
    c.result.unwrap();
    assert!(matches!(c.bufs, Bufs::One(_)));
}

#[test]
fn config_and_features_are_read() {
    let dev = BlkDevice::open(Fake::new(all_blk(), all_ring(), 2), BlkOptions::default()).unwrap();
    assert_eq!(dev.capacity(), SECTORS * 512);
    assert_eq!(dev.block_size(), 4096);
    let t = dev.topology().unwrap();
    assert_eq!((t.physical_block_exp, t.min_io_size, t.opt_io_size), (1, 1, 32));
    assert!(dev.write_cache());
    assert!(!dev.read_only());
    assert_eq!(dev.num_queues(), 1, "one queue asked for");
    assert_eq!(dev.ring_features(), RingFeatures::all());
    assert_eq!(dev.blk_features(), all_blk());
}

#[test]
fn options_refuse_offered_features() {
    let options = BlkOptions {
        packed: false,
        in_order: false,
        indirect: false,
        event_idx: false,
        refuse: BlkFeatures::FLUSH | BlkFeatures::TOPOLOGY,
        num_queues: 2,
        ..Default::default()
    };
    let mut dev = BlkDevice::open(Fake::new(all_blk(), all_ring(), 2), options).unwrap();
    assert_eq!(dev.ring_features(), RingFeatures::empty());
    assert!(dev.topology().is_none());
    assert_eq!(dev.num_queues(), 2);
    let mut q = dev.take_queue(1).unwrap();
    assert_eq!(q.format(), RingFormat::Split);
    assert!(matches!(q.flush(), Err(BlkError::Unsupported(BlkFeatures::FLUSH))));
}

#[test]
fn packed_in_order_indirect() {
    let mut dev = BlkDevice::open(Fake::new(all_blk(), all_ring(), 1), BlkOptions::default()).unwrap();
    assert_eq!(dev.take_queue(0).unwrap().format(), RingFormat::Packed);
    let mut dev = BlkDevice::open(Fake::new(all_blk(), all_ring(), 1), BlkOptions::default()).unwrap();
    roundtrip(&mut dev);
}

#[test]
fn every_ring_feature_combination() {
    for bits in 0..16u32 {
        let options = BlkOptions {
            packed: bits & 1 != 0,
            event_idx: bits & 2 != 0,
            indirect: bits & 4 != 0,
            in_order: bits & 8 != 0,
            ..Default::default()
        };
        let mut dev = BlkDevice::open(Fake::new(all_blk(), all_ring(), 1), options).unwrap();
        roundtrip(&mut dev);
    }
}

#[test]
fn limits_from_the_config_are_enforced_before_submission() {
    let mut dev = BlkDevice::open(Fake::new(all_blk(), all_ring(), 1), BlkOptions::default()).unwrap();
    let nine = dev.alloc_bufs(4096, 9).unwrap();
    let big = dev.alloc_buf(128 * 1024).unwrap();
    let odd = dev.alloc_buf(512).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    assert_eq!(q.max_segments(), 8, "seg_max");
    let e = q.submit_readv(0, nine, 0).unwrap_err();
    assert!(matches!(e.error, BlkError::TooManySegments { segments: 9, max: 8 }), "{}", e.error);
    let e = q.submit_read(0, big, 0).unwrap_err();
    assert!(matches!(e.error, BlkError::SegmentTooLarge { len: 131072, max: 65536 }), "{}", e.error);
    let e = q.submit_read(0, odd, 0).unwrap_err();
    assert!(matches!(e.error, BlkError::Misaligned { block_size: 4096, .. }), "{}", e.error);
    assert!(matches!(q.submit_discard(0, 2049 * 512 + 3584, 0), Err(BlkError::SegmentTooLarge { .. })));
    assert!(matches!(q.submit_secure_erase(0, 65 * 512 + 3584, 0), Err(BlkError::SegmentTooLarge { .. })));
    assert!(matches!(q.submit_write_zeroes(512, 4096, false, 0), Err(BlkError::Misaligned { .. })));
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn read_only_device() {
    let mut dev = BlkDevice::open(Fake::new(BlkFeatures::all(), all_ring(), 1), BlkOptions::default()).unwrap();
    assert!(dev.read_only());
    let mut q = dev.take_queue(0).unwrap();
    assert!(matches!(q.write_at(0, &[0u8; 4096]), Err(BlkError::ReadOnly)));
    assert!(matches!(q.submit_secure_erase(0, 4096, 0), Err(BlkError::ReadOnly)));
    assert!(matches!(q.submit_discard(0, 4096, 0), Err(BlkError::ReadOnly)));
}

#[test]
fn device_status_bytes_become_typed_errors() {
    for packed in [false, true] {
        let options = BlkOptions { packed, ..Default::default() };
        let mut dev = BlkDevice::open(Fake::new(all_blk(), all_ring(), 1), options).unwrap();
        let bufs = dev.alloc_bufs(4096, 4).unwrap();
        let mut q = dev.take_queue(0).unwrap();
        for (i, b) in bufs.into_iter().enumerate() {
            q.submit_read((BAD_SECTOR + 8 * i as u64) * 512, b, i as u64).unwrap();
        }
        let mut seen = [None, None, None, None];
        while let Some(c) = q.wait(Some(Duration::from_secs(5))) {
            assert_eq!(c.kind, RequestKind::Read);
            assert!(matches!(c.bufs, Bufs::One(_)));
            seen[c.tag as usize] = Some(c.result.unwrap_err());
        }
        let [a, b, c, d] = seen.map(|e| e.expect("completed"));
        assert!(matches!(a, BlkError::Device(DeviceStatus::IoErr)), "{a}");
        assert!(matches!(b, BlkError::Device(DeviceStatus::NotWritten)), "{b}");
        assert!(matches!(c, BlkError::Device(DeviceStatus::Other(7))), "{c}");
        assert!(matches!(d, BlkError::Device(DeviceStatus::Unsupp)), "{d}");
        let mut buf = [0u8; 4096];
        assert!(matches!(q.read_at(BAD_SECTOR * 512, &mut buf), Err(BlkError::Device(DeviceStatus::IoErr))));
        // The queue still works afterwards.
        q.read_at(0, &mut buf).unwrap();
    }
}

#[test]
fn a_device_breaking_the_ring_fails_every_request_and_later_ones() {
    let mut fake = Fake::new(all_blk(), all_ring(), 1);
    fake.hostile_get_id = true;
    let mut dev = BlkDevice::open(fake, BlkOptions { packed: false, in_order: false, ..Default::default() }).unwrap();
    let bufs = dev.alloc_bufs(4096, 4).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    q.submit_get_id(100).unwrap();
    for (i, b) in bufs.into_iter().enumerate() {
        q.submit_read(i as u64 * 4096, b, i as u64).unwrap();
    }
    let mut n = 0;
    while let Some(c) = q.wait(Some(Duration::from_secs(5))) {
        n += 1;
        if let Err(e) = c.result {
            assert!(matches!(e, BlkError::Queue(virtio_queue_core::Error::Broken(_))), "{e}");
        }
    }
    assert_eq!(n, 5, "every request completed");
    let mut buf = [0u8; 4096];
    assert!(matches!(q.read_at(0, &mut buf), Err(BlkError::Queue(virtio_queue_core::Error::Broken(_)))));
    assert!(matches!(q.get_id(), Err(BlkError::Queue(_))));
}
