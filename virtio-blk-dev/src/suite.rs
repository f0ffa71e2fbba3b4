//! The operation suite every transport tier runs (feature `suite`).
//!
//! The vhost-user tier (`tests/embedded.rs`, `tests/qsd.rs`) and the VM tier
//! (`vm-tests`, run by `cargo xtask vm-test` against vfio-pci and vhost-vdpa devices) check
//! the same behaviour with the same code: every virtio-blk operation, rejection before
//! submission, several queues used from their own threads, small rings lapped many times, a
//! full ring, split and packed rings where the device offers them, and — when the test can
//! read the device's backing file itself — data integrity checked against that file rather
//! than through the driver.
//!
//! These are test helpers: they panic with a message on the first thing that is wrong.
//! [`operation_suite!`](crate::operation_suite) turns them into one `#[test]` per scenario.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use virtio_queue_core::{RingFeatures, RingFormat};
use virtio_transport_api::Transport;

use crate::{
    BlkDevice, BlkError, BlkFeatures, BlkOptions, BlkQueue, Bufs, Completion, DeviceStatus, DmaBuf, RequestKind,
};

/// The ring format a scenario runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// Split virtqueues (virtio 1.2 §2.7).
    Split,
    /// Packed virtqueues (virtio 1.2 §2.8).
    Packed,
}

impl Ring {
    /// The queues' format with this ring.
    pub fn format(self) -> RingFormat {
        match self {
            Ring::Split => RingFormat::Split,
            Ring::Packed => RingFormat::Packed,
        }
    }

    /// `options` asking for this ring format.
    pub fn options(self, options: BlkOptions) -> BlkOptions {
        BlkOptions { packed: self == Ring::Packed, ..options }
    }
}

/// Opens a device through `open` asking for `ring`, and checks that `ring` was negotiated.
pub fn open_ring<T: Transport>(
    open: &dyn Fn(BlkOptions) -> BlkDevice<T>,
    ring: Ring,
    options: BlkOptions,
) -> BlkDevice<T> {
    let dev = open(ring.options(options));
    assert_eq!(
        dev.ring_features().contains(RingFeatures::RING_PACKED),
        ring == Ring::Packed,
        "asked for {ring:?} rings, negotiated {:?}",
        dev.ring_features()
    );
    dev
}

/// `len` bytes of a pattern that differs with `seed`.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(31).wrapping_add(seed.wrapping_mul(7919)) >> 3) as u8).collect()
}

/// `len` bytes of the file at `path`, from `offset`, read directly (not through the driver).
pub fn read_file(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut v, offset))
        .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", path.display()));
    v
}

/// Waits (at most 10 s) for the next completion.
pub fn next<T: Transport>(q: &mut BlkQueue<T>) -> Completion {
    q.wait(Some(Duration::from_secs(10))).expect("a completion within 10 s")
}

/// `want` bytes, or fewer when the device's `size_max` (VIRTIO_BLK_F_SIZE_MAX) limits one
/// segment to less, in whole blocks.
pub fn segment_len<T: Transport>(dev: &BlkDevice<T>, want: usize) -> usize {
    let size_max = usize::try_from(dev.max_segment_size()).unwrap_or(usize::MAX);
    let bs = dev.block_size() as usize;
    (want.min(size_max) / bs * bs).max(bs)
}

/// Every operation once, checked through the driver, and through the backing file `image`
/// when there is one.
pub fn every_operation<T: Transport>(dev: &mut BlkDevice<T>, image: Option<&Path>) {
    let bs = dev.block_size() as usize;
    assert!(dev.capacity() >= 2 << 20, "the suite needs at least 2 MiB, the device has {}", dev.capacity());
    assert_eq!(dev.capacity() % bs as u64, 0);
    assert!(!dev.read_only());
    let features = dev.blk_features();
    // One buffer is one segment: at most the device's size_max (vdpa_sim_blk allows 4 KiB).
    let seg = segment_len(dev, 8192);
    let mut bufs = dev.alloc_bufs(seg, 4).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    assert!(matches!(dev.take_queue(0), Err(BlkError::NoSuchQueue(0))));

    // write + read with owned buffers.
    let data = pattern(1, seg);
    let mut w = bufs.pop().unwrap();
    assert!(w.write(0, &data));
    q.submit_write(64 * 1024, w, 11).unwrap();
    let c = next(&mut q);
    assert_eq!((c.tag, c.kind), (11, RequestKind::Write));
    c.result.unwrap();
    let Bufs::One(w) = c.bufs else { panic!("the buffer comes back") };
    let r = bufs.pop().unwrap();
    q.submit_read(64 * 1024, r, 12).unwrap();
    let c = next(&mut q);
    c.result.unwrap();
    let Bufs::One(mut r) = c.bufs else { panic!("the buffer comes back") };
    assert_eq!(r.to_vec(), data);

    // flush, then the backing file holds the data.
    if features.contains(BlkFeatures::FLUSH) {
        q.submit_flush(13).unwrap();
        next(&mut q).result.unwrap();
        q.flush().unwrap();
    } else {
        assert!(matches!(q.submit_flush(13), Err(BlkError::Unsupported(BlkFeatures::FLUSH))));
    }
    if let Some(image) = image {
        assert_eq!(read_file(image, 64 * 1024, seg), data, "the backing file holds what the driver wrote");
    }

    // writev / readv: two buffers, in order.
    let a = pattern(2, seg);
    let b = pattern(3, seg);
    let mut w2 = bufs.pop().unwrap();
    let mut w1 = w;
    assert!(w1.write(0, &a));
    assert!(w2.write(0, &b));
    q.submit_writev(128 * 1024, vec![w1, w2], 21).unwrap();
    let c = next(&mut q);
    c.result.unwrap();
    let Bufs::Many(mut two) = c.bufs else { panic!("both buffers come back") };
    two.iter_mut().for_each(|b| b.fill(0));
    q.submit_readv(128 * 1024, two, 22).unwrap();
    let c = next(&mut q);
    c.result.unwrap();
    let Bufs::Many(two) = c.bufs else { panic!("both buffers come back") };
    assert_eq!(two[0].to_vec(), a);
    assert_eq!(two[1].to_vec(), b);
    q.flush().ok();
    if let Some(image) = image {
        assert_eq!(read_file(image, 128 * 1024, seg), a);
        assert_eq!(read_file(image, 128 * 1024 + seg as u64, seg), b);
    }

    // Blocking layer, larger than the bounce buffer.
    let big = pattern(4, 300 * 1024);
    q.write_at(512 * 1024, &big).unwrap();
    let mut back = vec![0u8; big.len()];
    q.read_at(512 * 1024, &mut back).unwrap();
    assert!(back == big, "read_at returns what write_at wrote");

    // write_zeroes without and with unmap, discard.
    if features.contains(BlkFeatures::WRITE_ZEROES) {
        q.submit_write_zeroes(64 * 1024, 4096, false, 31).unwrap();
        next(&mut q).result.unwrap();
        q.submit_write_zeroes(68 * 1024, 4096, true, 32).unwrap();
        next(&mut q).result.unwrap();
        r.fill(0xaa);
        q.submit_read(64 * 1024, r, 33).unwrap();
        let c = next(&mut q);
        c.result.unwrap();
        let Bufs::One(back) = c.bufs else { panic!("the buffer comes back") };
        assert!(back.to_vec().iter().all(|&x| x == 0), "write_zeroes zeroed what was written");
        r = back;
        q.flush().ok();
        if let Some(image) = image {
            assert!(read_file(image, 64 * 1024, seg).iter().all(|&x| x == 0));
        }
    } else {
        assert!(matches!(
            q.submit_write_zeroes(0, 4096, false, 0),
            Err(BlkError::Unsupported(BlkFeatures::WRITE_ZEROES))
        ));
    }
    if features.contains(BlkFeatures::DISCARD) {
        q.submit_discard(1024 * 1024, 64 * 1024, 41).unwrap();
        next(&mut q).result.unwrap();
    } else {
        assert!(matches!(q.submit_discard(0, 4096, 0), Err(BlkError::Unsupported(BlkFeatures::DISCARD))));
    }
    if features.contains(BlkFeatures::SECURE_ERASE) {
        q.submit_secure_erase(1024 * 1024, 4096, 42).unwrap();
        next(&mut q).result.unwrap();
    } else {
        assert!(matches!(q.submit_secure_erase(0, 4096, 0), Err(BlkError::Unsupported(BlkFeatures::SECURE_ERASE))));
    }

    // get_id, both ways.
    q.submit_get_id(51).unwrap();
    let c = next(&mut q);
    c.result.unwrap();
    let id = c.id.expect("an id");
    assert!(id.iter().any(|&c| c != 0), "an id was written: {id:?}");
    assert_eq!(q.get_id().unwrap(), id);

    // Rejected before submission: nothing in flight afterwards, buffer handed back.
    rejections(&mut q, dev.capacity(), r);
    assert_eq!(q.in_flight(), 0);
    assert!(q.poll().is_none());
}

/// Misaligned, out-of-range and over-limit requests fail before they reach the ring.
pub fn rejections<T: Transport>(q: &mut BlkQueue<T>, capacity: u64, buf: DmaBuf) {
    let len = buf.len() as u64;
    let e = q.submit_read(100, buf, 0).unwrap_err();
    assert!(matches!(e.error, BlkError::Misaligned { offset: 100, .. }), "{}", e.error);
    let e = q.submit_read(capacity - 512, e.bufs, 0).unwrap_err();
    assert!(matches!(e.error, BlkError::OutOfRange { .. }), "{}", e.error);
    let e = q.submit_write(capacity, e.bufs, 0).unwrap_err();
    assert!(matches!(e.error, BlkError::OutOfRange { .. }), "{}", e.error);
    let e = q.submit_write(u64::MAX - 511, e.bufs, 0).unwrap_err();
    assert!(matches!(e.error, BlkError::OutOfRange { .. }), "{}", e.error);
    assert_eq!(e.bufs.len() as u64, len);
    let mut odd = vec![0u8; 100];
    assert!(matches!(q.read_at(0, &mut odd), Err(BlkError::Misaligned { .. })));
    assert!(matches!(q.write_at(capacity, &[0u8; 512]), Err(BlkError::OutOfRange { .. })));
    assert!(matches!(q.read_at(0, &mut []), Err(BlkError::Misaligned { .. })));
    assert!(matches!(q.submit_discard(1, 512, 0), Err(BlkError::Misaligned { .. } | BlkError::Unsupported(_))));
    let e = q.submit_readv(0, Vec::new(), 0).unwrap_err();
    assert!(matches!(e.error, BlkError::TooManySegments { segments: 0, .. }), "{}", e.error);
    assert_eq!(q.in_flight(), 0, "nothing was submitted");
}

/// A read-only device refuses every write-type request before submission; reads work.
pub fn read_only_refuses_writes<T: Transport>(dev: &mut BlkDevice<T>) {
    assert!(dev.read_only());
    let buf = dev.alloc_buf(4096).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    let e = q.submit_write(0, buf, 0).unwrap_err();
    assert!(matches!(e.error, BlkError::ReadOnly), "{}", e.error);
    let e = q.submit_writev(0, vec![e.bufs], 0).unwrap_err();
    assert!(matches!(e.error, BlkError::ReadOnly), "{}", e.error);
    assert!(matches!(q.write_at(0, &[1u8; 4096]), Err(BlkError::ReadOnly)));
    assert!(matches!(q.submit_write_zeroes(0, 4096, true, 0), Err(BlkError::ReadOnly | BlkError::Unsupported(_))));
    assert!(matches!(q.submit_discard(0, 4096, 0), Err(BlkError::ReadOnly | BlkError::Unsupported(_))));
    assert_eq!(q.in_flight(), 0);
    let mut back = vec![0u8; 4096];
    q.read_at(0, &mut back).unwrap();
    let e = e.bufs.into_iter().next().unwrap();
    q.submit_read(0, e, 7).unwrap();
    next(&mut q).result.unwrap();
}

/// Each of the device's `n` queues on its own thread, each writing and reading back its own
/// area, then flushing; afterwards the backing file (when there is one) holds what each wrote.
pub fn queues_on_threads<T>(dev: &mut BlkDevice<T>, n: u16, image: Option<&Path>)
where
    T: Transport,
    BlkQueue<T>: Send + 'static,
{
    assert_eq!(dev.num_queues(), n);
    let queues = dev.queues();
    assert_eq!(queues.len(), n as usize);
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, mut q)| {
            std::thread::spawn(move || {
                assert_eq!(q.index() as usize, i);
                for round in 0..20u32 {
                    let off = (i as u64) * 256 * 1024 + u64::from(round % 8) * 16 * 1024;
                    let data = pattern(round + 100 * i as u32, 16 * 1024);
                    q.write_at(off, &data).unwrap();
                    let mut back = vec![0u8; data.len()];
                    q.read_at(off, &mut back).unwrap();
                    assert!(back == data, "queue {i} round {round}");
                }
                q.flush().unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a queue thread failed");
    }
    let Some(image) = image else { return };
    for i in 0..u64::from(n) {
        // Rounds 12..20 are the last in each of a queue's eight 16 KiB slots.
        for round in 12..20u32 {
            let off = i * 256 * 1024 + u64::from(round % 8) * 16 * 1024;
            let want = pattern(round + 100 * i as u32, 16 * 1024);
            assert!(read_file(image, off, want.len()) == want, "queue {i} round {round}: the backing file differs");
        }
    }
}

/// A ring of 8 entries takes 8 requests (with INDIRECT_DESC; without it a read takes 3
/// descriptors, so 2 fit), refuses the next with `QueueFull`, then drains.
pub fn a_full_queue_is_reported_and_drains<T: Transport>(dev: &mut BlkDevice<T>) {
    let fits = if dev.ring_features().contains(RingFeatures::INDIRECT_DESC) { 8 } else { 8 / 3 };
    let mut bufs = dev.alloc_bufs(512, fits as usize + 1).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    assert_eq!(q.queue_size(), 8);
    for i in 0..fits {
        q.submit_read(i * 512, bufs.pop().unwrap(), i).unwrap();
    }
    let e = q.submit_read(0, bufs.pop().unwrap(), 99).unwrap_err();
    assert!(matches!(e.error, BlkError::QueueFull), "{}", e.error);
    let mut tags = Vec::new();
    while let Some(c) = q.wait(Some(Duration::from_secs(10))) {
        assert_eq!(c.kind, RequestKind::Read);
        c.result.unwrap();
        tags.push(c.tag);
    }
    tags.sort();
    assert_eq!(tags, (0..fits).collect::<Vec<_>>());
}

/// A ring of 4 entries goes round many times (packed: both wrap counters flip on every lap),
/// with chains of 1 (indirect) and 3 (direct) descriptors, and the data stays right. `open`
/// is called twice, once with INDIRECT and once without.
pub fn many_laps_of_a_small_ring<T: Transport>(
    open: &dyn Fn(BlkOptions) -> BlkDevice<T>,
    ring: Ring,
    image: Option<&Path>,
) {
    for indirect in [true, false] {
        let mut dev = open_ring(open, ring, BlkOptions { queue_size: 4, indirect, ..Default::default() });
        let mut q = dev.take_queue(0).unwrap();
        assert_eq!((q.queue_size(), q.format()), (4, ring.format()));
        for round in 0..200u32 {
            let off = u64::from(round % 16) * 4096;
            let data = pattern(round + if indirect { 0 } else { 1000 }, 4096);
            q.write_at(off, &data).unwrap();
            let mut back = vec![0u8; 4096];
            q.read_at(off, &mut back).unwrap();
            assert!(back == data, "round {round}");
        }
        q.flush().unwrap();
        let last = pattern(199 + if indirect { 0 } else { 1000 }, 4096);
        if let Some(image) = image {
            assert!(read_file(image, 7 * 4096, 4096) == last, "the backing file holds the last round");
        }
    }
}

/// Requests in flight when the back-end goes away (`kill`) all complete with errors, quickly,
/// and later calls fail fast.
pub fn in_flight_when_backend_dies<T: Transport>(dev: &mut BlkDevice<T>, kill: impl FnOnce()) {
    let bufs = dev.alloc_bufs(4096, 16).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    for (i, b) in bufs.into_iter().enumerate() {
        q.submit_read(i as u64 * 4096, b, i as u64).unwrap();
    }
    kill();
    let _ = q.publish();
    let start = Instant::now();
    let mut ok = 0;
    let mut failed = 0;
    while let Some(c) = q.wait(Some(Duration::from_secs(10))) {
        assert!(matches!(c.bufs, Bufs::One(_)), "the buffer comes back even on error");
        match c.result {
            Ok(()) => ok += 1,
            Err(BlkError::Transport(e)) => {
                assert!(e.is_disconnected(), "{e}");
                failed += 1;
            }
            Err(BlkError::Device(DeviceStatus::IoErr)) => failed += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
        assert!(start.elapsed() < Duration::from_secs(10));
    }
    assert_eq!(ok + failed, 16, "every request completed");
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    let start = Instant::now();
    let e = q.read_at(0, &mut [0u8; 512]);
    assert!(matches!(e, Err(BlkError::Transport(ref e)) if e.is_disconnected()), "{e:?}");
    assert!(q.get_id().is_err());
    assert!(start.elapsed() < Duration::from_secs(2));
}

/// A device that does not offer packed rings gets a driver that asks for them onto split ones.
pub fn packed_not_offered_falls_back_to_split<T: Transport>(open: &dyn Fn(BlkOptions) -> BlkDevice<T>) {
    let mut dev = open(BlkOptions { packed: true, ..Default::default() });
    assert!(!dev.ring_features().contains(RingFeatures::RING_PACKED), "the device offers RING_PACKED after all");
    let mut q = dev.take_queue(0).unwrap();
    assert_eq!(q.format(), RingFormat::Split);
    let data = pattern(5, 4096);
    q.write_at(0, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    q.read_at(0, &mut back).unwrap();
    assert!(back == data);
}

/// The scenarios of one ring format, as `#[test]`s (used by [`operation_suite!`](crate::operation_suite)).
#[doc(hidden)]
#[macro_export]
macro_rules! __operation_suite_ring {
    ($open:ident, $ring:expr) => {
        use $crate::suite::{self, Ring};
        use $crate::BlkOptions;

        fn image() -> Option<std::path::PathBuf> {
            super::__operation_suite_image()
        }

        #[test]
        fn every_operation() {
            let mut dev = suite::open_ring(&super::$open, $ring, BlkOptions::default());
            suite::every_operation(&mut dev, image().as_deref());
        }

        #[test]
        fn without_indirect_and_event_idx() {
            let options = BlkOptions { indirect: false, event_idx: false, ..Default::default() };
            let mut dev = suite::open_ring(&super::$open, $ring, options);
            suite::every_operation(&mut dev, image().as_deref());
        }

        #[test]
        fn every_queue_from_its_own_thread() {
            let mut dev =
                suite::open_ring(&super::$open, $ring, BlkOptions { num_queues: u16::MAX, ..Default::default() });
            suite::queues_on_threads(&mut dev, super::__OPERATION_SUITE_QUEUES, image().as_deref());
        }

        #[test]
        fn a_full_queue_is_reported_and_drains() {
            let mut dev = suite::open_ring(&super::$open, $ring, BlkOptions { queue_size: 8, ..Default::default() });
            suite::a_full_queue_is_reported_and_drains(&mut dev);
        }

        #[test]
        fn many_laps_of_a_small_ring() {
            suite::many_laps_of_a_small_ring(&super::$open, $ring, image().as_deref());
        }
    };
}

/// What the scenario modules of [`operation_suite!`](crate::operation_suite) read from the
/// invoking module (evaluated there, so the expressions may use that module's imports).
#[doc(hidden)]
#[macro_export]
macro_rules! __operation_suite_common {
    ($image:expr, $queues:expr) => {
        fn __operation_suite_image() -> Option<std::path::PathBuf> {
            $image
        }
        const __OPERATION_SUITE_QUEUES: u16 = $queues;
    };
}

/// Expands to the operation suite as `#[test]`s, in modules `split` and `packed`, inside the
/// module where it is invoked.
///
/// * `open`: a function `fn(BlkOptions) -> BlkDevice<T>` in the invoking module that opens
///   the device under test (a fresh open each time; it panics with a clear message if it
///   cannot).
/// * `image`: an expression of type `Option<PathBuf>`: the device's backing file when the test
///   can read it directly (data integrity is then checked against the file), else `None`.
/// * `packed`: whether the device offers packed rings. `true` runs every scenario on both
///   formats; `false` runs them on split rings and checks that a driver asking for packed
///   rings falls back to split ones.
/// * `queues`: how many request queues the device offers; asserted, and each used from its
///   own thread.
///
/// ```
/// # #[cfg(feature = "loopback")]
/// mod model {
///     use virtio_blk_dev::{loopback::RamDisk, BlkDevice, BlkOptions};
///     use virtio_transport_api::loopback::{LoopbackTransport, ServiceMode};
///
///     fn open(options: BlkOptions) -> BlkDevice<LoopbackTransport<RamDisk>> {
///         let transport = LoopbackTransport::new(RamDisk::new(8192), ServiceMode::Threaded);
///         BlkDevice::open(transport, options).expect("the model device opens")
///     }
///
///     virtio_blk_dev::operation_suite!(open, image = None, packed = true, queues = 1);
/// }
/// ```
#[macro_export]
macro_rules! operation_suite {
    ($open:ident, image = $image:expr, packed = true, queues = $queues:expr $(,)?) => {
        $crate::__operation_suite_common!($image, $queues);
        mod split {
            $crate::__operation_suite_ring!($open, Ring::Split);
        }
        mod packed {
            $crate::__operation_suite_ring!($open, Ring::Packed);
        }
    };
    ($open:ident, image = $image:expr, packed = false, queues = $queues:expr $(,)?) => {
        $crate::__operation_suite_common!($image, $queues);
        mod split {
            $crate::__operation_suite_ring!($open, Ring::Split);
        }
        mod packed {
            #[test]
            fn not_offered_so_the_driver_falls_back_to_split() {
                $crate::suite::packed_not_offered_falls_back_to_split(&super::$open);
            }
        }
    };
}
