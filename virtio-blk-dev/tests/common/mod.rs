//! Shared by the integration tests: back-ends to start and the checks run against each.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use transport_vhost_user::{VhostUserOptions, VhostUserTransport};
use virtio_blk_dev::{BlkDevice, BlkError, BlkFeatures, BlkOptions, BlkQueue, Bufs, DeviceStatus, RequestKind};

pub type Dev = BlkDevice<VhostUserTransport>;
pub type Queue = BlkQueue<VhostUserTransport>;

pub const IMAGE_BYTES: u64 = 4 << 20;
pub const QSD: &str = "qemu-storage-daemon";

pub fn open(sock: &Path, options: BlkOptions) -> Dev {
    let t = VhostUserTransport::connect(sock, VhostUserOptions::default()).unwrap();
    BlkDevice::open(t, options).unwrap()
}

/// A raw image file in a temporary directory, with a socket path beside it.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub sock: PathBuf,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        let sock = dir.path().join("vhost.sock");
        std::fs::File::create(&image).unwrap().set_len(IMAGE_BYTES).unwrap();
        Scratch { dir, image, sock }
    }
}

pub fn read_file(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    std::fs::File::open(path).unwrap().read_exact_at(&mut v, offset).unwrap();
    v
}

pub fn write_file(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(31).wrapping_add(seed.wrapping_mul(7919)) >> 3) as u8).collect()
}

/// Waits (bounded) for the next completion.
pub fn next(q: &mut Queue) -> virtio_blk_dev::Completion {
    q.wait(Some(Duration::from_secs(10))).expect("a completion within 10 s")
}

/// `qemu-storage-daemon` exporting `image` over `sock`.
pub struct Qsd {
    pub child: Child,
}

impl Qsd {
    pub fn start(s: &Scratch, queues: u32, writable: bool) -> Qsd {
        // A daemon started earlier on this scratch directory may have left it.
        let _ = std::fs::remove_file(s.dir.path().join("qsd.pid"));
        let child = Command::new(QSD)
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=disk,filename={}", s.image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable={},num-queues={queues}",
                s.sock.display(),
                if writable { "on" } else { "off" }
            ))
            // qsd writes its pid file after its exports listen and before it
            // accepts connections: the file's existence means "ready" (the
            // socket file alone appears between bind and listen).
            .arg("--pidfile")
            .arg(s.dir.path().join("qsd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {QSD} ({e}): install the Debian package qemu-utils (apt-get install qemu-utils)")
            });
        let mut d = Qsd { child };
        let t = Instant::now();
        let pidfile = s.dir.path().join("qsd.pid");
        while !pidfile.exists() {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("{QSD} exited early: {status}");
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{QSD} did not get ready (pid file) within 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every operation once, checked through the driver (and through the image
/// file when there is one).
pub fn every_operation(dev: &mut Dev, image: Option<&Path>) {
    let bs = dev.block_size() as usize;
    assert!(dev.capacity() >= IMAGE_BYTES.min(dev.capacity()) && dev.capacity() > 0);
    assert_eq!(dev.capacity() % bs as u64, 0);
    assert!(!dev.read_only());
    let features = dev.blk_features();
    let mut bufs = dev.alloc_bufs(8192, 4).unwrap();
    let mut q = dev.take_queue(0).unwrap();
    assert!(matches!(dev.take_queue(0), Err(BlkError::NoSuchQueue(0))));

    // write + read with owned buffers.
    let data = pattern(1, 8192);
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

    // flush, then the image file holds the data.
    if features.contains(BlkFeatures::FLUSH) {
        q.submit_flush(13).unwrap();
        next(&mut q).result.unwrap();
        q.flush().unwrap();
    } else {
        assert!(matches!(q.submit_flush(13), Err(BlkError::Unsupported(BlkFeatures::FLUSH))));
    }
    if let Some(image) = image {
        assert_eq!(read_file(image, 64 * 1024, 8192), data, "image file holds what the driver wrote");
    }

    // writev / readv: two buffers, in order.
    let a = pattern(2, 8192);
    let b = pattern(3, 8192);
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
        assert_eq!(read_file(image, 128 * 1024, 8192), a);
        assert_eq!(read_file(image, 136 * 1024, 8192), b);
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
        let Bufs::One(back) = c.bufs else { panic!() };
        assert!(back.to_vec().iter().all(|&x| x == 0), "write_zeroes zeroed 8 KiB");
        r = back;
        q.flush().ok();
        if let Some(image) = image {
            assert!(read_file(image, 64 * 1024, 8192).iter().all(|&x| x == 0));
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
pub fn rejections(q: &mut Queue, capacity: u64, buf: virtio_blk_dev::DmaBuf) {
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

/// A read-only device refuses every write-type request before submission.
pub fn read_only_refuses_writes(dev: &mut Dev) {
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
    // Reads still work.
    let mut back = vec![0u8; 4096];
    q.read_at(0, &mut back).unwrap();
    let e = e.bufs.into_iter().next().unwrap();
    q.submit_read(0, e, 7).unwrap();
    next(&mut q).result.unwrap();
}

/// Each queue on its own thread, each writing and reading back its own area, then flushing.
pub fn queues_on_threads(dev: &mut Dev, n: u16) {
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
        h.join().unwrap();
    }
}

/// Requests in flight when the back-end goes away all complete with errors, quickly.
pub fn in_flight_when_backend_dies(dev: &mut Dev, kill: impl FnOnce()) {
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
    // Later requests fail fast.
    let start = Instant::now();
    let e = q.read_at(0, &mut [0u8; 512]);
    assert!(matches!(e, Err(BlkError::Transport(ref e)) if e.is_disconnected()), "{e:?}");
    assert!(q.get_id().is_err());
    assert!(start.elapsed() < Duration::from_secs(2));
}
