//! Against a real back-end nobody here wrote: `qemu-storage-daemon --export
//! type=vhost-user-blk` over a raw image file (Debian package `qemu-system-common` in bookworm; a backported `qemu-utils` also ships it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use transport_vhost_user::{VhostUserOptions, VhostUserTransport};
use virtio_queue_core::{Buffer, QueueConfig, RingLayout, Slot, SplitQueue};
use virtio_transport_api::{
    driver_ok, negotiate, read_config, DmaRegion, Notifier, QueueSetup, Step, Transport, VirtioFeatures, Wait,
};
use zerocopy::byteorder::little_endian::U64;

const QSD: &str = "qemu-storage-daemon";
const IMAGE_BYTES: u64 = 1 << 20;

struct Daemon {
    child: Child,
    sock: PathBuf,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(queues: u32) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        let sock = dir.path().join("vhost.sock");
        std::fs::File::create(&image).unwrap().set_len(IMAGE_BYTES).unwrap();
        let pidfile = dir.path().join("qsd.pid");
        let child = Command::new(QSD)
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=disk,filename={}", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                sock.display()
            ))
            // qsd writes its pid file after its exports listen and before it
            // accepts connections: the file's existence means "ready" (the
            // socket file alone appears between bind and listen).
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {QSD} ({e}): install the Debian package qemu-system-common (apt-get install qemu-system-common; a backported qemu-utils also ships it)")
            });
        let mut d = Daemon { child, sock, image, _dir: dir };
        let t = Instant::now();
        while !pidfile.exists() {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("{QSD} exited early: {status}");
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{QSD} did not get ready (pid file) within 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Offsets inside the buffer region.
const HDR: usize = 0;
const DATA: usize = 4096;
const STATUS: usize = 8192;
const ID: usize = 8192 + 64;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_GET_ID: u32 = 8;

struct Setup {
    t: VhostUserTransport,
    ring: DmaRegion,
    bufs: DmaRegion,
    features: u64,
}

fn connect(d: &Daemon, options: VhostUserOptions) -> Setup {
    let mut t = VhostUserTransport::connect(&d.sock, options).unwrap();
    let features = negotiate(&mut t, VirtioFeatures::EVENT_IDX.bits() | VirtioFeatures::RING_PACKED.bits(), 0).unwrap();
    assert_eq!(features & VirtioFeatures::RING_PACKED.bits(), 0, "qemu-storage-daemon offers split rings only");
    assert_ne!(features & VirtioFeatures::VERSION_1.bits(), 0);
    let ring = t.alloc_dma(RingLayout::split(128).unwrap().size()).unwrap();
    let bufs = t.alloc_dma(3 * 4096).unwrap();
    Setup { t, ring, bufs, features }
}

fn header(bufs: &DmaRegion, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    assert!(bufs.shared_memory().write_bytes(HDR, &h));
    // A status the device never returns, so a request it did not finish cannot look done.
    assert!(bufs.shared_memory().write_bytes(STATUS, &[0xff]));
}

fn status(bufs: &DmaRegion) -> u8 {
    let mut s = [0u8];
    assert!(bufs.shared_memory().read_bytes(STATUS, &mut s));
    s[0]
}

fn b(region: &DmaRegion, off: usize, len: u32) -> Buffer {
    Buffer::new(region.iova_at(off).unwrap(), len)
}

/// Submits one chain, kicks if needed, and waits (bounded) for its completion.
fn round_trip<N: Notifier>(
    q: &mut SplitQueue<'_, u32>,
    kick: &N,
    done: &virtio_transport_api::CompletionEvent,
    readable: &[Buffer],
    writable: &[Buffer],
    token: u32,
) -> u32 {
    q.add(readable, writable, token).map_err(|e| e.error).unwrap();
    if q.publish().unwrap() {
        kick.notify().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(used) = q.pop_used().unwrap() {
            assert_eq!(used.token, token);
            return used.len;
        }
        let cleared = done.clear().unwrap();
        if q.enable_used_notifications().unwrap() {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no completion within 10 s");
        let _ = cleared.wait(Some(left)).unwrap();
    }
}

fn read_file(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut v = vec![0u8; len];
    std::fs::File::open(path).unwrap().read_exact_at(&mut v, offset).unwrap();
    v
}

fn write_read_get_id(options: VhostUserOptions, expect_slots: Option<bool>) {
    let d = Daemon::start(2);
    let Setup { mut t, ring, bufs, features } = connect(&d, options);
    if let Some(slots) = expect_slots {
        assert_eq!(t.uses_mem_slots(), slots);
    }
    assert_eq!(t.max_queues(), 2);
    let capacity: U64 = read_config(&mut t, 0).unwrap();
    assert_eq!(capacity.get(), IMAGE_BYTES / 512, "capacity in 512-byte sectors");
    // A field at a non-zero offset: blk_size (offset 20) is 512 here when offered (bit 6).
    if features & (1 << 6) != 0 {
        let mut bs = [0u8; 4];
        t.read_config(20, &mut bs).unwrap();
        assert_eq!(u32::from_le_bytes(bs), 512);
    }

    let mut slots: Vec<Slot<u32>> = (0..128).map(|_| Slot::new()).collect();
    let config = QueueConfig {
        queue_size: 128,
        ring: ring.shared_memory(),
        ring_iova: ring.iova(),
        features: VirtioFeatures::ring_features_of(features),
        indirect: None,
    };
    let mut q = SplitQueue::new(config, &mut slots[..]).unwrap();
    let (kick, done) = t.setup_queue(0, &QueueSetup::of(&q)).unwrap();
    driver_ok(&mut t).unwrap();

    // OUT: one sector at sector 7.
    let sector = 7u64;
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    header(&bufs, T_OUT, sector);
    assert!(bufs.shared_memory().write_bytes(DATA, &pattern));
    round_trip(&mut q, &kick, &done, &[b(&bufs, HDR, 16), b(&bufs, DATA, 512)], &[b(&bufs, STATUS, 1)], 1);
    assert_eq!(status(&bufs), 0, "write status");
    assert_eq!(read_file(&d.image, sector * 512, 512), pattern, "the image file holds the written sector");

    // IN: the same sector, into a cleared buffer.
    header(&bufs, T_IN, sector);
    assert!(bufs.shared_memory().write_bytes(DATA, &[0u8; 512]));
    let len = round_trip(&mut q, &kick, &done, &[b(&bufs, HDR, 16)], &[b(&bufs, DATA, 512), b(&bufs, STATUS, 1)], 2);
    assert_eq!(status(&bufs), 0, "read status");
    assert_eq!(len, 513);
    let mut back = vec![0u8; 512];
    assert!(bufs.shared_memory().read_bytes(DATA, &mut back));
    assert_eq!(back, pattern);

    // GET_ID: 20 bytes of serial (qemu-storage-daemon: the export's node name).
    header(&bufs, T_GET_ID, 0);
    round_trip(&mut q, &kick, &done, &[b(&bufs, HDR, 16)], &[b(&bufs, ID, 20), b(&bufs, STATUS, 1)], 3);
    assert_eq!(status(&bufs), 0, "get-id status");
    let mut id = [0u8; 20];
    assert!(bufs.shared_memory().read_bytes(ID, &mut id));
    assert!(id.iter().any(|&c| c != 0), "an id was written: {id:?}");
}

#[test]
fn write_read_and_get_id_with_mem_slots() {
    write_read_get_id(VhostUserOptions::default(), Some(true));
}

#[test]
fn write_read_and_get_id_with_set_mem_table() {
    write_read_get_id(VhostUserOptions { use_mem_slots: false, ..Default::default() }, Some(false));
}

#[test]
fn a_killed_daemon_fails_everything_fast() {
    let mut d = Daemon::start(1);
    let Setup { mut t, ring, bufs, features } = connect(&d, VhostUserOptions::default());
    let mut slots: Vec<Slot<u32>> = (0..128).map(|_| Slot::new()).collect();
    let config = QueueConfig {
        queue_size: 128,
        ring: ring.shared_memory(),
        ring_iova: ring.iova(),
        features: VirtioFeatures::ring_features_of(features),
        indirect: None,
    };
    let mut q = SplitQueue::new(config, &mut slots[..]).unwrap();
    let (kick, done) = t.setup_queue(0, &QueueSetup::of(&q)).unwrap();
    driver_ok(&mut t).unwrap();

    // Requests outstanding: several reads published, then the daemon is killed.
    header(&bufs, T_IN, 0);
    for token in 0..8 {
        q.add(&[b(&bufs, HDR, 16)], &[b(&bufs, DATA, 512), b(&bufs, STATUS, 1)], token).map_err(|e| e.error).unwrap();
    }
    d.kill();
    if q.publish().unwrap() {
        kick.notify().unwrap(); // an eventfd write: it cannot tell, and must not hang
    }

    let start = Instant::now();
    let err = loop {
        let cleared = done.clear().unwrap();
        while q.pop_used().unwrap().is_some() {}
        match cleared.wait(Some(Duration::from_secs(5))) {
            Ok(Wait::Signalled) => continue,
            Ok(Wait::TimedOut) => panic!("wait timed out instead of reporting the dead back-end"),
            Err(e) => break e,
        }
    };
    assert!(err.is_disconnected(), "{err}");
    assert_eq!(err.step(), Step::Wait);
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());

    // Every later operation fails fast with the same kind of error.
    let start = Instant::now();
    let e = read_config::<U64, _>(&mut t, 0).unwrap_err();
    assert!(e.is_disconnected(), "{e}");
    let e = t.alloc_dma(4096).unwrap_err();
    assert!(e.is_disconnected(), "{e}");
    let e = t.setup_queue(0, &QueueSetup::of(&q)).unwrap_err();
    assert!(e.is_disconnected(), "{e}");
    let e = t.status().unwrap_err();
    assert!(e.is_disconnected(), "{e}");
    let e = done.clear().unwrap().wait(None).unwrap_err();
    assert!(e.is_disconnected(), "{e}");
    assert!(e.to_string().starts_with("vhost-user: wait for completion (queue 0): backend disconnected"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());
}

#[test]
fn a_stopped_daemon_times_out_instead_of_hanging() {
    let d = Daemon::start(1);
    let mut t = VhostUserTransport::connect(
        &d.sock,
        VhostUserOptions { reply_timeout: Duration::from_millis(500), ..Default::default() },
    )
    .unwrap();
    negotiate(&mut t, 0, 0).unwrap();
    // SIGSTOP: the socket stays open but nothing answers.
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc_kill(d.child.id() as i32, 19) }, 0);
    let start = Instant::now();
    let e = read_config::<U64, _>(&mut t, 0).unwrap_err();
    assert!(e.is_disconnected(), "{e}");
    assert!(e.to_string().contains("no reply within"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
    assert!(t.alloc_dma(4096).unwrap_err().is_disconnected());
    // SAFETY: as above; SIGCONT so the kill on drop is delivered promptly.
    unsafe { libc_kill(d.child.id() as i32, 18) };
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn connecting_to_a_missing_socket_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nobody-here.sock");
    let e = VhostUserTransport::connect(&path, VhostUserOptions::default()).unwrap_err();
    assert_eq!(e.step(), Step::Connect);
    assert_eq!(e.raw_os_error(), Some(2));
    let s = e.to_string();
    assert!(s.starts_with("vhost-user: connect ("), "{s}");
    assert!(s.contains("nobody-here.sock"), "{s}");
    assert!(s.contains("No such file or directory"), "{s}");
}
