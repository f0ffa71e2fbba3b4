//! Against an in-process model device: the loopback transport of
//! virtio-transport-api (the core's device model serving the rings) with
//! this crate's RAM-disk loopback device, served by one thread per queue.
//! Covers what the real back-ends here do not offer (packed rings, IN_ORDER,
//! RO/TOPOLOGY/CONFIG_WCE/SECURE_ERASE in the config) and status bytes they
//! never return (IOERR, UNSUPP, no status written, undefined values).

use std::time::Duration;

use virtio_blk_dev::loopback::RamDisk;
use virtio_blk_dev::{BlkDevice, BlkError, BlkFeatures, BlkOptions, Bufs, DeviceStatus, RequestKind};
use virtio_queue_core::{RingFeatures, RingFormat};
use virtio_transport_api::loopback::{LoopbackHandle, LoopbackTransport, ServiceMode};
use virtio_transport_api::VirtioFeatures;

const SECTORS: u64 = 8192; // 4 MiB
/// Reads of this sector fail with IOERR; of the next, the status is not
/// written; of the next, the status is 7; of the next, UNSUPP.
const BAD_SECTOR: u64 = 4000;

type Fake = LoopbackTransport<RamDisk>;

/// The model device: a RAM disk with the limits and faults these tests
/// expect, one device thread per queue.
fn fake(offered_blk: BlkFeatures, ring: VirtioFeatures, queues: u16) -> Fake {
    fake_with(offered_blk, ring, queues, false)
}

/// [`fake`], answering GET_ID on split rings with a used id that was never in
/// flight if `hostile_get_id`.
fn fake_with(offered_blk: BlkFeatures, ring: VirtioFeatures, queues: u16, hostile_get_id: bool) -> Fake {
    let mut disk = RamDisk::new(SECTORS)
        .offer(offered_blk, ring)
        .max_queue_size(64)
        .serial(*b"model-serial\0\0\0\0\0\0\0\0")
        .bad_sectors(BAD_SECTOR)
        .hostile_get_id(hostile_get_id);
    let config = disk.config_mut();
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
    LoopbackTransport::new(disk, ServiceMode::Threaded)
}

/// Opens the device and keeps a handle on the model for [`assert_followed_protocol`].
fn open(t: Fake, options: BlkOptions) -> (BlkDevice<Fake>, LoopbackHandle<RamDisk>) {
    let h = t.handle();
    (BlkDevice::open(t, options).unwrap(), h)
}

/// The driver followed the ring protocol (the device model found nothing) and
/// the virtio-blk protocol (header first, status the last one-byte writable
/// buffer, data in the right direction, every buffer in device memory).
fn assert_followed_protocol(h: &LoopbackHandle<RamDisk>) {
    assert_eq!(h.error(), None, "the driver follows the ring protocol");
    assert_eq!(h.with_device(|d| d.violations()), 0, "the driver follows the virtio-blk protocol");
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
    let (dev, h) = open(fake(all_blk(), all_ring(), 2), BlkOptions::default());
    assert_eq!(dev.capacity(), SECTORS * 512);
    assert_eq!(dev.block_size(), 4096);
    let t = dev.topology().unwrap();
    assert_eq!((t.physical_block_exp, t.min_io_size, t.opt_io_size), (1, 1, 32));
    assert!(dev.write_cache());
    assert!(!dev.read_only());
    assert_eq!(dev.num_queues(), 1, "one queue asked for");
    assert_eq!(dev.ring_features(), RingFeatures::all());
    assert_eq!(dev.blk_features(), all_blk());
    assert_followed_protocol(&h);
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
    let (mut dev, h) = open(fake(all_blk(), all_ring(), 2), options);
    assert_eq!(dev.ring_features(), RingFeatures::empty());
    assert!(dev.topology().is_none());
    assert_eq!(dev.num_queues(), 2);
    let mut q = dev.take_queue(1).unwrap();
    assert_eq!(q.format(), RingFormat::Split);
    assert!(matches!(q.flush(), Err(BlkError::Unsupported(BlkFeatures::FLUSH))));
    assert_followed_protocol(&h);
}

#[test]
fn packed_in_order_indirect() {
    let (mut dev, h) = open(fake(all_blk(), all_ring(), 1), BlkOptions::default());
    assert_eq!(dev.take_queue(0).unwrap().format(), RingFormat::Packed);
    assert_followed_protocol(&h);
    let (mut dev, h) = open(fake(all_blk(), all_ring(), 1), BlkOptions::default());
    roundtrip(&mut dev);
    assert_followed_protocol(&h);
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
        let (mut dev, h) = open(fake(all_blk(), all_ring(), 1), options);
        roundtrip(&mut dev);
        assert_followed_protocol(&h);
    }
}

#[test]
fn limits_from_the_config_are_enforced_before_submission() {
    let (mut dev, h) = open(fake(all_blk(), all_ring(), 1), BlkOptions::default());
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
    assert_eq!(h.with_device(|d| d.served()), 0, "nothing reached the device");
    assert_followed_protocol(&h);
}

#[test]
fn read_only_device() {
    let (mut dev, h) = open(fake(BlkFeatures::all(), all_ring(), 1), BlkOptions::default());
    assert!(dev.read_only());
    let mut q = dev.take_queue(0).unwrap();
    assert!(matches!(q.write_at(0, &[0u8; 4096]), Err(BlkError::ReadOnly)));
    assert!(matches!(q.submit_secure_erase(0, 4096, 0), Err(BlkError::ReadOnly)));
    assert!(matches!(q.submit_discard(0, 4096, 0), Err(BlkError::ReadOnly)));
    assert_followed_protocol(&h);
}

#[test]
fn device_status_bytes_become_typed_errors() {
    for packed in [false, true] {
        let options = BlkOptions { packed, ..Default::default() };
        let (mut dev, h) = open(fake(all_blk(), all_ring(), 1), options);
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
        // A device that writes beyond the status byte (into the rest of its
        // word, where the driver keeps its slow-path mark) cannot turn a
        // status into another: the read still succeeds.
        let b = dev.alloc_bufs(4096, 1).unwrap().pop().unwrap();
        q.submit_read((BAD_SECTOR + 32) * 512, b, 9).unwrap();
        let c = q.wait(Some(Duration::from_secs(5))).expect("completed");
        assert!(c.tag == 9 && c.result.is_ok() && matches!(c.bufs, Bufs::One(_)), "{:?}", c.result);
        q.read_at((BAD_SECTOR + 32) * 512, &mut buf).unwrap();
        // The queue still works afterwards.
        q.read_at(0, &mut buf).unwrap();
        assert_followed_protocol(&h);
    }
}

#[test]
fn a_device_breaking_the_ring_fails_every_request_and_later_ones() {
    let fake = fake_with(all_blk(), all_ring(), 1, true);
    let (mut dev, h) = open(fake, BlkOptions { packed: false, in_order: false, ..Default::default() });
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
    assert_followed_protocol(&h);
}

/// Completions taken with `poll_each` until `n` have come (the device runs
/// in its own thread), or panics after 5 s.
fn poll_each_until(q: &mut virtio_blk_dev::BlkQueue<Fake>, n: usize) -> Vec<virtio_blk_dev::Completion> {
    let mut out = Vec::new();
    let t = std::time::Instant::now();
    while out.len() < n {
        let got = q.poll_each(|c| out.push(c));
        assert!(got <= n, "{got} completions for {n} requests");
        assert!(t.elapsed() < Duration::from_secs(5), "{} of {n} completions", out.len());
        std::thread::yield_now();
    }
    out
}

/// `poll_each` hands back what `poll` does: the buffers, typed status errors,
/// the GET_ID bytes, and every request of a broken ring.
#[test]
fn poll_each_gives_what_poll_gives() {
    for packed in [false, true] {
        let options = BlkOptions { packed, ..Default::default() };
        let (mut dev, h) = open(fake(all_blk(), all_ring(), 1), options);
        let bufs = dev.alloc_bufs(4096, 6).unwrap();
        let mut q = dev.take_queue(0).unwrap();
        for (i, b) in bufs.into_iter().enumerate() {
            // Tags 0..4 on the bad sectors, 4 and 5 on good ones.
            let sector = if i < 4 { BAD_SECTOR + 8 * i as u64 } else { 8 * i as u64 };
            q.submit_read(sector * 512, b, i as u64).unwrap();
        }
        q.submit_get_id(6).unwrap();
        q.submit_flush(7).unwrap();
        // Not published: poll_each publishes first.
        let mut done = poll_each_until(&mut q, 8);
        done.sort_by_key(|c| c.tag);
        let statuses = [DeviceStatus::IoErr, DeviceStatus::NotWritten, DeviceStatus::Other(7), DeviceStatus::Unsupp];
        for (c, want) in done.iter().zip(statuses) {
            assert!(matches!(c.result, Err(BlkError::Device(s)) if s == want), "{:?}", c.result);
            assert!(matches!(c.bufs, Bufs::One(_)), "the buffer comes back even on error");
        }
        for c in &done[4..6] {
            assert!(c.result.is_ok() && matches!(c.bufs, Bufs::One(_)) && c.kind == RequestKind::Read);
        }
        assert_eq!(done[6].kind, RequestKind::GetId);
        assert_eq!(&done[6].id.expect("an id")[..12], b"model-serial");
        assert!(done[7].result.is_ok() && done[7].kind == RequestKind::Flush);
        assert_eq!(q.poll_each(|_| panic!("nothing left")), 0);
        assert_eq!(q.in_flight(), 0);
        assert_followed_protocol(&h);
    }

    // A device that breaks the ring: every request still completes once.
    let fake = fake_with(all_blk(), all_ring(), 1, true);
    let (mut dev, h) = open(fake, BlkOptions { packed: false, in_order: false, ..Default::default() });
    let bufs = dev.alloc_bufs(4096, 4).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    q.submit_get_id(100).unwrap();
    for (i, b) in bufs.into_iter().enumerate() {
        q.submit_read(i as u64 * 4096, b, i as u64).unwrap();
    }
    let done = poll_each_until(&mut q, 5);
    assert!(done.iter().any(|c| matches!(c.result, Err(BlkError::Queue(virtio_queue_core::Error::Broken(_))))));
    assert_eq!(done.iter().filter(|c| matches!(c.bufs, Bufs::One(_))).count(), 4, "every buffer came back");
    assert_eq!(q.poll_each(|_| panic!("nothing left")), 0);
    assert!(matches!(q.submit_flush(1), Err(BlkError::Queue(_))));
    assert_followed_protocol(&h);
}

/// A queue dropped with a request in flight leaves its memory (ring, header,
/// status byte) registered until the device is gone: the device may still
/// serve that request, and must find the memory it was given.
#[test]
fn a_dropped_queue_leaves_its_memory_to_the_device() {
    let disk = RamDisk::new(SECTORS).offer(all_blk(), VirtioFeatures::EVENT_IDX);
    let t = LoopbackTransport::new(disk, ServiceMode::Manual);
    let h = t.handle();
    let mut dev = BlkDevice::open(t, BlkOptions::default()).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    q.submit_flush(7).unwrap();
    q.publish().unwrap();
    drop(q);
    assert_eq!(h.process().unwrap(), 1, "the device serves the request after the queue is gone");
    assert_followed_protocol(&h);
    assert_eq!(h.with_device(|d| d.served()), 1);
    drop(dev);
}

/// With batched completions `wait` still returns every request (the device is
/// asked to signal after most of them, never after more than are in flight),
/// over both ring formats.
#[test]
fn batched_completions_lose_nothing() {
    for ring in [VirtioFeatures::EVENT_IDX, VirtioFeatures::EVENT_IDX | VirtioFeatures::RING_PACKED] {
        let (mut dev, h) = open(fake(all_blk(), ring, 1), BlkOptions { packed: true, ..BlkOptions::default() });
        let mut bufs = dev.alloc_bufs(4096, 32).unwrap();
        let mut q = dev.take_queue(0).unwrap();
        q.set_batch_completions(true);
        for round in 0..20u64 {
            // At most 21 three-descriptor chains fit the 64-entry queue.
            let n = 1 + (round as usize * 7) % 21;
            for i in 0..n {
                let b = bufs.pop().unwrap();
                q.submit_read((i as u64) * 4096, b, round * 100 + i as u64).map_err(|r| r.error).unwrap();
            }
            let mut seen = 0;
            while seen < n {
                let c = q.wait(Some(Duration::from_secs(10))).expect("a completion within 10 s");
                c.result.unwrap();
                let Bufs::One(b) = c.bufs else { panic!("one buffer") };
                bufs.push(b);
                seen += 1;
                while let Some(c) = q.poll() {
                    c.result.unwrap();
                    let Bufs::One(b) = c.bufs else { panic!("one buffer") };
                    bufs.push(b);
                    seen += 1;
                }
            }
            assert_eq!(seen, n);
        }
        assert_followed_protocol(&h);
    }
}

/// Hybrid waiting: with a spin limit far above the model device's answer
/// time, waits at depth 1 and 2 find their completions without sleeping.
#[test]
fn spin_before_sleep_finds_fast_completions_without_sleeping() {
    for ring in [VirtioFeatures::EVENT_IDX, VirtioFeatures::EVENT_IDX | VirtioFeatures::RING_PACKED] {
        let (mut dev, h) = open(fake(all_blk(), ring, 1), BlkOptions { packed: true, ..BlkOptions::default() });
        let mut bufs = dev.alloc_bufs(4096, 2).unwrap();
        let mut q = dev.take_queue(0).unwrap();
        assert_eq!(q.spin_before_sleep(), None);
        q.set_spin_before_sleep(Some(Duration::from_secs(2)));
        assert_eq!(q.spin_before_sleep(), Some(Duration::from_secs(2)));
        for n in (0..100).map(|i| 1 + i % 2) {
            for i in 0..n {
                let b = bufs.pop().unwrap();
                q.submit_read(i as u64 * 4096, b, i as u64).map_err(|r| r.error).unwrap();
            }
            for _ in 0..n {
                let c = q.wait(Some(Duration::from_secs(10))).expect("a completion within 10 s");
                c.result.unwrap();
                let Bufs::One(b) = c.bufs else { panic!("one buffer") };
                bufs.push(b);
            }
        }
        assert_eq!(q.waits(), 0, "every completion at depth 1 and 2 was found by the spin");
        assert_followed_protocol(&h);
    }
}

/// CPU time of the calling thread, in clock ticks (utime + stime of
/// `/proc/thread-self/stat`).
fn thread_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // The fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Hybrid waiting against a device that does not answer: at depth 1 the
/// spin runs out (within the wait's timeout) and the wait sleeps for the
/// rest of it; at depth 3 it does not spin at all.
#[test]
fn spin_before_sleep_gives_up_and_skips_deep_queues() {
    let open_manual = || {
        let disk = RamDisk::new(SECTORS).offer(all_blk(), VirtioFeatures::EVENT_IDX);
        BlkDevice::open(LoopbackTransport::new(disk, ServiceMode::Manual), BlkOptions::default()).unwrap()
    };
    let mut dev = open_manual();
    let mut q = dev.take_queue(0).unwrap();
    q.set_spin_before_sleep(Some(Duration::from_millis(200)));
    q.submit_flush(1).unwrap();
    let (start, cpu) = (std::time::Instant::now(), thread_cpu_ticks());
    assert!(q.wait(Some(Duration::from_millis(500))).is_none());
    let (took, spun) = (start.elapsed(), thread_cpu_ticks() - cpu);
    assert!(took >= Duration::from_millis(500) && took < Duration::from_millis(1500), "{took:?}");
    assert!(spun >= 5, "the spin ran: {spun} ticks of CPU");
    assert_eq!(q.waits(), 1, "it slept after the spin");
    // A spin never outlasts the wait's timeout (a new limit starts afresh,
    // without the skips the miss above earned).
    q.set_spin_before_sleep(Some(Duration::from_secs(30)));
    let start = std::time::Instant::now();
    assert!(q.wait(Some(Duration::from_millis(100))).is_none());
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());

    let mut dev = open_manual();
    let mut q = dev.take_queue(0).unwrap();
    q.set_spin_before_sleep(Some(Duration::from_secs(30)));
    for tag in 0..3 {
        q.submit_flush(tag).unwrap();
    }
    let cpu = thread_cpu_ticks();
    assert!(q.wait(Some(Duration::from_millis(500))).is_none());
    let spun = thread_cpu_ticks() - cpu;
    assert!(spun < 25, "depth 3 slept instead of spinning: {spun} ticks of CPU in a 500 ms wait");
    assert_eq!(q.waits(), 1);
}

/// The operation suite the vhost-user and VM tiers run, against the model device (two queues,
/// both ring formats): keeps `operation_suite!` itself tested on every host.
mod suite_on_the_model {
    use super::*;

    fn open(options: BlkOptions) -> BlkDevice<Fake> {
        let mut disk = RamDisk::new(SECTORS).offer(all_blk(), all_ring());
        disk.config_mut().num_queues.set(2);
        BlkDevice::open(LoopbackTransport::new(disk, ServiceMode::Threaded), options).unwrap()
    }

    virtio_blk_dev::operation_suite!(open, image = None, packed = true, queues = 2);
}

/// `submit_writes` and `submit_reads` submit a batch as `submit_write` and
/// `submit_read` would one by one; the first request refused comes back with
/// its buffer and error, the ones before it stay submitted and the ones after
/// it stay in the iterator.
#[test]
fn batch_submission_is_one_by_one_submission() {
    for packed in [false, true] {
        let options = BlkOptions { packed, ..Default::default() };
        let (mut dev, h) = open(fake(all_blk(), all_ring(), 1), options);
        let mut bufs = dev.alloc_bufs(4096, 8).unwrap();
        for (i, b) in bufs.iter_mut().enumerate() {
            b.fill(0x10 + i as u8);
        }
        let mut q = dev.take_queue(0).unwrap();
        q.submit_writes(bufs.into_iter().enumerate().map(|(i, b)| (i as u64 * 8192, b, i as u64))).unwrap();
        let mut done = poll_each_until(&mut q, 8);
        done.sort_by_key(|c| c.tag);
        let mut bufs = Vec::new();
        for (i, c) in done.into_iter().enumerate() {
            assert!(c.result.is_ok() && c.kind == RequestKind::Write && c.tag == i as u64, "{c:?}");
            let Bufs::One(mut b) = c.bufs else { panic!("a write gives its buffer back") };
            b.fill(0);
            bufs.push(b);
        }

        // The fourth read is misaligned: the batch stops there.
        let mut reqs = bufs
            .into_iter()
            .enumerate()
            .map(|(i, b)| (i as u64 * 8192 + if i == 3 { 512 } else { 0 }, b, 100 + i as u64));
        let refused = q.submit_reads(reqs.by_ref()).unwrap_err();
        assert!(matches!(refused.error, BlkError::Misaligned { .. }), "{:?}", refused.error);
        assert_eq!(refused.bufs.len(), 4096, "the refused buffer comes back");
        let rest: Vec<_> = reqs.collect();
        assert_eq!(
            rest.iter().map(|r| r.2).collect::<Vec<_>>(),
            [104, 105, 106, 107],
            "the rest stays in the iterator"
        );
        assert_eq!(q.in_flight(), 3);
        // Not published by `submit_reads`: `poll_each` publishes.
        let mut done = poll_each_until(&mut q, 3);
        done.sort_by_key(|c| c.tag);
        for (i, c) in done.into_iter().enumerate() {
            assert!(c.result.is_ok() && c.kind == RequestKind::Read && c.tag == 100 + i as u64, "{c:?}");
            let Bufs::One(b) = c.bufs else { panic!("a read gives its buffer back") };
            assert!(b.to_vec().iter().all(|&x| x == 0x10 + i as u8), "read {i} got what write {i} wrote");
        }
        // An empty batch submits nothing.
        q.submit_reads(std::iter::empty()).unwrap();
        assert_eq!(q.in_flight(), 0);
        assert_followed_protocol(&h);
    }
}
