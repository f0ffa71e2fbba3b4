//! The embedded vhost-user-blk server driven by a real vhost-user front-end: the `vhost`
//! crate's `Frontend` over the unix socket, memfd-backed memory registered with
//! SET_MEM_TABLE, and `virtio_queue_core::SplitQueue` as the driver-side ring.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use vblk::server::{Server, ServerHandle, ServerOptions, Storage};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_blk_dev::spec::{S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES};
use virtio_blk_dev::BlkFeatures;
use virtio_queue_core::{Buffer, QueueConfig, RingFeatures, SharedMemory, Slot, SplitQueue};
use virtio_transport_api::VirtioFeatures;
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 128;
const MEM_SIZE: usize = 8 << 20;
/// Per-queue area: ring at the start, request buffers from `RING_AREA` on.
const QUEUE_AREA: usize = 1 << 20;
const RING_AREA: usize = 64 << 10;

const F_RO: u64 = BlkFeatures::RO.bits();
const F_FLUSH: u64 = BlkFeatures::FLUSH.bits();
const F_MQ: u64 = BlkFeatures::MQ.bits();
const F_DISCARD: u64 = BlkFeatures::DISCARD.bits();
const F_WRITE_ZEROES: u64 = BlkFeatures::WRITE_ZEROES.bits();
const F_EVENT_IDX: u64 = VirtioFeatures::EVENT_IDX.bits();
/// VHOST_USER_F_PROTOCOL_FEATURES.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_VERSION_1: u64 = VirtioFeatures::VERSION_1.bits();

/// memfd memory mapped shared, registered with the back-end at guest address = process address.
struct Memory {
    file: File,
    shared: SharedMemory<'static>,
    base: u64,
}

impl Memory {
    fn new() -> Memory {
        // SAFETY: a valid NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"vblk-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM_SIZE as u64).unwrap();
        // SAFETY: maps the whole memfd shared; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        let base = NonNull::new(p.cast::<u8>()).unwrap();
        // SAFETY: the mapping is never unmapped (leaked for 'static), and this process only
        // touches it through `SharedMemory`; the back-end is the "device".
        let shared = unsafe { SharedMemory::from_raw_parts(base, MEM_SIZE) }.unwrap();
        Memory { file, shared, base: p as u64 }
    }
}

/// One driver-side queue with its eventfds and buffer area.
struct Queue {
    ring: SplitQueue<'static, u32>,
    kick: EventFd,
    call: EventFd,
    mem: SharedMemory<'static>,
    /// Offset of this queue's buffer area in `mem`, and its guest address.
    area: usize,
    area_iova: u64,
    next_token: u32,
    /// Kicks sent: publishes the server did not suppress.
    kicks: u32,
}

/// What a request came back with.
#[derive(Debug)]
struct Reply {
    status: u8,
    data: Vec<u8>,
    used_len: u32,
}

impl Queue {
    /// Submits a chain made of `readable` then `writable` (offset, length) pieces of the buffer
    /// area and waits for it; returns the used length.
    fn submit(&mut self, readable: &[(usize, u32)], writable: &[(usize, u32)]) -> u32 {
        let buf = |&(off, len): &(usize, u32)| Buffer::new(self.area_iova + off as u64, len);
        let r: Vec<Buffer> = readable.iter().map(buf).collect();
        let w: Vec<Buffer> = writable.iter().map(buf).collect();
        let token = self.next_token;
        self.next_token += 1;
        self.ring.add(&r, &w, token).map_err(|e| format!("{e:?}")).unwrap();
        if self.ring.publish().unwrap() {
            self.kick.write(1).unwrap();
            self.kicks += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(used) = self.ring.pop_used().unwrap() {
                assert_eq!(used.token, token);
                return used.len;
            }
            if self.ring.enable_used_notifications().unwrap() {
                continue;
            }
            assert!(Instant::now() < deadline, "request not completed within 10 s");
            let mut pfd = libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let _ = self.call.read();
        }
    }

    fn write_area(&self, off: usize, bytes: &[u8]) {
        assert!(self.mem.write_bytes(self.area + off, bytes));
    }

    fn read_area(&self, off: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        assert!(self.mem.read_bytes(self.area + off, &mut v));
        v
    }

    /// A well-formed request: header, `out` data, then `in_len` bytes of data-in and status.
    fn request(&mut self, kind: u32, sector: u64, out: &[u8], in_len: u32) -> Reply {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.write_area(0, &hdr);
        let out_off = 64;
        let in_off = out_off + out.len().next_multiple_of(64);
        let status_off = in_off + (in_len as usize).next_multiple_of(64);
        self.write_area(out_off, out);
        self.write_area(status_off, &[0xff]);
        let mut readable = vec![(0, 16)];
        if !out.is_empty() {
            readable.push((out_off, out.len() as u32));
        }
        let mut writable = Vec::new();
        if in_len > 0 {
            writable.push((in_off, in_len));
        }
        writable.push((status_off, 1));
        let used_len = self.submit(&readable, &writable);
        Reply { status: self.read_area(status_off, 1)[0], data: self.read_area(in_off, in_len as usize), used_len }
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.request(T_OUT, sector, data, 0).status
    }

    fn read(&mut self, sector: u64, len: u32) -> Reply {
        self.request(T_IN, sector, &[], len)
    }
}

/// A connected, configured front-end.
struct Client {
    frontend: Frontend,
    features: u64,
    config: Vec<u8>,
    queues: Vec<Queue>,
    _mem: Memory,
}

impl Client {
    fn connect(path: &Path, nqueues: usize) -> Client {
        let mut fe = Frontend::connect(path, nqueues as u64).unwrap();
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        assert!(offered & F_PROTOCOL_FEATURES != 0);
        let proto = fe.get_protocol_features().unwrap();
        for p in [
            VhostUserProtocolFeatures::MQ,
            VhostUserProtocolFeatures::REPLY_ACK,
            VhostUserProtocolFeatures::CONFIG,
            VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        ] {
            assert!(proto.contains(p), "protocol feature {p:?} not offered");
        }
        fe.set_protocol_features(
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG,
        )
        .unwrap();
        let wanted = F_VERSION_1
            | F_EVENT_IDX
            | F_PROTOCOL_FEATURES
            | F_FLUSH
            | F_MQ
            | F_DISCARD
            | F_WRITE_ZEROES
            | F_RO
            | (1 << 2)
            | (1 << 6);
        let features = offered & wanted;
        fe.set_features(features).unwrap();
        assert!(fe.get_queue_num().unwrap() >= nqueues as u64);
        let (_, config) = fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60]).unwrap();

        let mem = Memory::new();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: mem.base,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem.base,
            mmap_offset: 0,
            mmap_handle: mem.file.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).unwrap();

        let ring_features = if features & F_EVENT_IDX != 0 { RingFeatures::EVENT_IDX } else { RingFeatures::empty() };
        let mut queues = Vec::new();
        for q in 0..nqueues {
            let area = q * QUEUE_AREA;
            let slots: &'static mut [Slot<u32>] =
                Box::leak((0..QUEUE_SIZE).map(|_| Slot::new()).collect::<Vec<_>>().into_boxed_slice());
            let ring = SplitQueue::new(
                QueueConfig {
                    queue_size: QUEUE_SIZE,
                    ring: mem.shared.slice(area, RING_AREA).unwrap(),
                    ring_iova: mem.base + area as u64,
                    features: ring_features,
                    indirect: None,
                },
                slots,
            )
            .unwrap();
            let a = ring.addresses();
            fe.set_vring_num(q, QUEUE_SIZE).unwrap();
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: a.desc,
                    used_ring_addr: a.device,
                    avail_ring_addr: a.driver,
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_base(q, 0).unwrap();
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            fe.set_vring_call(q, &call).unwrap();
            fe.set_vring_kick(q, &kick).unwrap();
            fe.set_vring_enable(q, true).unwrap();
            queues.push(Queue {
                ring,
                kick,
                call,
                mem: mem.shared,
                area: area + RING_AREA,
                area_iova: mem.base + (area + RING_AREA) as u64,
                next_token: 0,
                kicks: 0,
            });
        }
        Client { frontend: fe, features, config, queues, _mem: mem }
    }

    fn capacity(&self) -> u64 {
        u64::from_le_bytes(self.config[..8].try_into().unwrap())
    }

    fn q(&mut self) -> &mut Queue {
        &mut self.queues[0]
    }
}

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("vblk.sock")
}

fn start(dir: &tempfile::TempDir, options: ServerOptions) -> ServerHandle {
    Server::start(socket_in(dir), options).unwrap()
}

fn ram(size: u64) -> ServerOptions {
    ServerOptions { storage: Storage::Ram { size }, ..ServerOptions::default() }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn write_flush_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, ram(16 << 20));
    let mut c = Client::connect(server.socket_path(), 1);
    assert_eq!(c.capacity(), (16 << 20) / 512);
    assert_eq!(c.features & F_RO, 0);
    // Config: seg_max, blk_size, num_queues.
    assert_eq!(u32::from_le_bytes(c.config[12..16].try_into().unwrap()), 254);
    assert_eq!(u32::from_le_bytes(c.config[20..24].try_into().unwrap()), 512);
    assert_eq!(u16::from_le_bytes(c.config[34..36].try_into().unwrap()), 1);

    let data = pattern(7, 4096);
    assert_eq!(c.q().write(100, &data), S_OK);
    assert_eq!(c.q().request(T_FLUSH, 0, &[], 0).status, S_OK);
    let r = c.q().read(100, 4096);
    assert_eq!(r.status, S_OK);
    assert_eq!(r.used_len, 4097);
    assert_eq!(r.data, data);
    // Never-written sectors of the sparse RAM disk read as zeros.
    assert_eq!(c.q().read(5000, 512).data, vec![0u8; 512]);
}

/// The workers' poll window (`ServerOptions::poll`): a request published within it after the
/// last one is found without a kick (the server leaves `avail_event` behind while it polls);
/// with no window the server asks for kicks again as soon as its queue is empty.
#[test]
fn a_polling_worker_needs_no_kick_within_its_window() {
    // (window, pause between a completion and the next request, kicks expected of 10)
    let cases =
        [(Duration::from_millis(300), Duration::from_millis(1), 0), (Duration::ZERO, Duration::from_millis(50), 10)];
    for (window, pause, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let server = start(&dir, ServerOptions { poll: window, ..ram(1 << 20) });
        let mut c = Client::connect(server.socket_path(), 1);
        assert_ne!(c.features & F_EVENT_IDX, 0);
        let data = pattern(3, 512);
        // The worker sleeps until the first request: that one is kicked.
        assert_eq!(c.q().write(0, &data), S_OK);
        assert_eq!(c.q().kicks, 1);
        for i in 1..=10 {
            std::thread::sleep(pause);
            assert_eq!(c.q().write(i, &data), S_OK);
        }
        assert_eq!(c.q().kicks - 1, expected, "window {window:?}, {pause:?} between requests");
    }
}

#[test]
fn image_file_holds_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0xAAu8; 1 << 20]).unwrap();
    let server = start(&dir, ServerOptions { storage: Storage::Image(image.clone()), ..ServerOptions::default() });
    let mut c = Client::connect(server.socket_path(), 1);
    assert_eq!(c.capacity(), 2048);
    let data = pattern(3, 8192);
    assert_eq!(c.q().write(16, &data), S_OK);
    assert_eq!(c.q().request(T_FLUSH, 0, &[], 0).status, S_OK);
    let content = std::fs::read(&image).unwrap();
    assert_eq!(&content[16 * 512..16 * 512 + 8192], &data[..]);
    assert!(content[..16 * 512].iter().all(|&b| b == 0xAA));
    assert!(content[16 * 512 + 8192..].iter().all(|&b| b == 0xAA));

    // Write-zeroes with unmap, then discard: both read back as zeros in the file.
    let seg = |sector: u64, num: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        s
    };
    assert_eq!(c.q().request(T_WRITE_ZEROES, 0, &seg(16, 8, 1), 0).status, S_OK);
    assert_eq!(c.q().request(T_WRITE_ZEROES, 0, &seg(24, 8, 0), 0).status, S_OK);
    let content = std::fs::read(&image).unwrap();
    assert!(content[16 * 512..32 * 512].iter().all(|&b| b == 0));
    assert_eq!(c.q().request(T_DISCARD, 0, &seg(0, 8, 0), 0).status, S_OK);
    // Unknown flags are unsupported; a range past the end is an I/O error.
    assert_eq!(c.q().request(T_DISCARD, 0, &seg(0, 8, 1), 0).status, S_UNSUPP);
    assert_eq!(c.q().request(T_WRITE_ZEROES, 0, &seg(2040, 16, 0), 0).status, S_IOERR);
}

#[test]
fn get_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, ServerOptions { serial: "serial-42".into(), ..ram(1 << 20) });
    let mut c = Client::connect(server.socket_path(), 1);
    let r = c.q().request(T_GET_ID, 0, &[], 20);
    assert_eq!(r.status, S_OK);
    assert_eq!(r.used_len, 21);
    assert_eq!(&r.data[..9], b"serial-42");
    assert!(r.data[9..].iter().all(|&b| b == 0));
}

#[test]
fn read_only_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ro.img");
    std::fs::write(&image, pattern(9, 1 << 16)).unwrap();
    let server = start(
        &dir,
        ServerOptions { storage: Storage::Image(image.clone()), read_only: true, ..ServerOptions::default() },
    );
    let mut c = Client::connect(server.socket_path(), 1);
    assert_ne!(c.features & F_RO, 0);
    assert_eq!(c.features & (F_DISCARD | F_WRITE_ZEROES), 0);
    assert_eq!(c.q().write(0, &[0u8; 512]), S_IOERR);
    assert_eq!(c.q().read(0, 512).data, pattern(9, 512));
    // Not negotiated: unsupported.
    assert_eq!(c.q().request(T_DISCARD, 0, &[0u8; 16], 0).status, S_UNSUPP);
    assert_eq!(std::fs::read(&image).unwrap(), pattern(9, 1 << 16));
}

#[test]
fn bad_requests_get_a_status_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, ram(1 << 20));
    let mut c = Client::connect(server.socket_path(), 1);
    let sectors = c.capacity();
    let q = c.q();
    // Out of range, straddling the end, and a sector number that would overflow.
    assert_eq!(q.read(sectors, 512).status, S_IOERR);
    assert_eq!(q.read(sectors - 1, 1024).status, S_IOERR);
    assert_eq!(q.write(u64::MAX, &[0u8; 512]), S_IOERR);
    // Not a multiple of the sector size.
    assert_eq!(q.read(0, 100).status, S_IOERR);
    assert_eq!(q.write(0, &[1u8; 100]), S_IOERR);
    // Unknown type.
    assert_eq!(q.request(99, 0, &[], 0).status, S_UNSUPP);
    // Header shorter than 16 bytes.
    q.write_area(512, &[0xff]);
    assert_eq!(q.submit(&[(0, 8)], &[(512, 1)]), 1);
    assert_eq!(q.read_area(512, 1)[0], S_IOERR);
    // No writable status byte at all: completed with length 0, nothing written.
    assert_eq!(q.submit(&[(0, 16)], &[]), 0);
    // Data-in buffer on a write: I/O error.
    q.write_area(0, &{
        let mut h = [0u8; 16];
        h[0] = T_OUT as u8;
        h
    });
    q.write_area(1024, &[0xff]);
    assert_eq!(q.submit(&[(0, 16), (2048, 512)], &[(512, 512), (1024, 1)]), 1);
    assert_eq!(q.read_area(1024, 1)[0], S_IOERR);
    // The device still works.
    assert_eq!(q.write(1, &[5u8; 512]), S_OK);
    assert_eq!(q.read(1, 512).data, vec![5u8; 512]);
}

#[test]
fn two_queues_from_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, ServerOptions { queues: 2, ..ram(8 << 20) });
    let mut c = Client::connect(server.socket_path(), 2);
    assert_eq!(u16::from_le_bytes(c.config[34..36].try_into().unwrap()), 2);
    std::thread::scope(|s| {
        for (i, q) in c.queues.iter_mut().enumerate() {
            s.spawn(move || {
                let base = i as u64 * 4096;
                for round in 0..200u64 {
                    let sector = base + (round % 64) * 8;
                    let data = pattern((i as u8).wrapping_mul(100).wrapping_add(round as u8), 4096);
                    assert_eq!(q.write(sector, &data), S_OK);
                    assert_eq!(q.read(sector, 4096).data, data);
                }
            });
        }
    });
}

#[test]
fn disconnect_then_new_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, ram(1 << 20));
    let data = pattern(42, 1024);
    {
        let mut c = Client::connect(server.socket_path(), 1);
        assert_eq!(c.q().write(8, &data), S_OK);
        drop(c.frontend);
    }
    // The server accepts the next front-end and the data is still there.
    let mut c = Client::connect(server.socket_path(), 1);
    assert_eq!(c.q().read(8, 1024).data, data);
    drop(c);
    let mut c = Client::connect(server.socket_path(), 1);
    assert_eq!(c.q().read(8, 1024).data, data);
    // Shutting down with a front-end still connected returns promptly.
    let t = Instant::now();
    server.shutdown();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(!socket_in(&dir).exists());
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for o in [
        ServerOptions { queues: 0, ..ram(1 << 20) },
        ServerOptions { queue_size: 100, ..ram(1 << 20) },
        ram(1000),
        ServerOptions { storage: Storage::Image(dir.path().join("missing.img")), ..ServerOptions::default() },
    ] {
        let e = Server::start(socket_in(&dir), o).unwrap_err();
        assert!(!e.to_string().is_empty());
    }
}

fn vblk(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vblk")).args(args).output().unwrap()
}

#[test]
fn cli_bad_arguments_give_one_line() {
    for args in [
        &["serve"][..],
        &["serve", "--socket", "/tmp/x.sock", "--size", "12Q"],
        &["serve", "--socket", "/tmp/x.sock", "--queues", "0"],
        &["serve", "--socket", "/tmp/x.sock", "--bogus"],
        &["serve", "--socket", "/tmp/x.sock", "--image", "/nonexistent/vblk.img"],
        &["frobnicate"],
    ] {
        let out = vblk(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{args:?}: {err:?}");
        assert!(err.starts_with("vblk: "), "{args:?}: {err:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Packed rings written by hand: a front-end that may break the rules on purpose.

/// VIRTIO_F_RING_PACKED.
const F_RING_PACKED: u64 = VirtioFeatures::RING_PACKED.bits();
const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;
const D_INDIRECT: u16 = 4;
const D_AVAIL: u16 = 1 << 7;
const D_USED: u16 = 1 << 15;
const PACKED_SIZE: u16 = 8;

/// One packed queue on a raw vhost-user connection; descriptors are written byte by byte,
/// so any of them can be malformed.
struct PackedClient {
    frontend: Frontend,
    mem: Memory,
    /// Offset of the driver event suppression area in `mem`.
    driver_at: usize,
    kick: EventFd,
    call: EventFd,
    /// Driver positions: next descriptor to write, next used descriptor to read.
    pos: u16,
    wrap: bool,
    used_pos: u16,
    used_wrap: bool,
}

/// Buffer area (offset in the memory) after the ring.
const PACKED_AREA: usize = 64 << 10;

/// Where a packed ring's event suppression areas go.
#[derive(Clone, Copy, Debug)]
enum Areas {
    /// Where `RingLayout::packed` puts them, right after the descriptor ring.
    Layout,
    /// At these offsets from the start of the memory (driver area, device area).
    At(usize, usize),
}

impl PackedClient {
    /// Connects and sets up queue 0 as a packed ring, its descriptor ring at the start of
    /// the memory and its event suppression areas as `areas` says.
    fn connect(path: &Path, areas: Areas) -> PackedClient {
        let mut fe = Frontend::connect(path, 1).unwrap();
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        assert!(offered & F_RING_PACKED != 0, "RING_PACKED not offered: {offered:#x}");
        fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK).unwrap();
        let features = offered & (F_VERSION_1 | F_PROTOCOL_FEATURES | F_RING_PACKED | F_FLUSH);
        fe.set_features(features).unwrap();
        let mem = Memory::new();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: mem.base,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem.base,
            mmap_offset: 0,
            mmap_handle: mem.file.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).unwrap();
        let layout = virtio_queue_core::RingLayout::packed(PACKED_SIZE).unwrap();
        let (driver_at, device_at) = match areas {
            Areas::Layout => (layout.driver_offset(), layout.device_offset()),
            Areas::At(d, v) => (d, v),
        };
        let a = virtio_queue_core::QueueAddresses {
            desc: mem.base,
            driver: mem.base + driver_at as u64,
            device: mem.base + device_at as u64,
        };
        fe.set_vring_num(0, PACKED_SIZE).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: PACKED_SIZE,
                queue_size: PACKED_SIZE,
                flags: 0,
                desc_table_addr: a.desc,
                used_ring_addr: a.device,
                avail_ring_addr: a.driver,
                log_addr: None,
            },
        )
        .unwrap();
        // Position 0, avail wrap counter set (bit 15).
        fe.set_vring_base(0, 0x8000).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        PackedClient { frontend: fe, mem, driver_at, kick, call, pos: 0, wrap: true, used_pos: 0, used_wrap: true }
    }

    /// Guest address of byte `off` of the buffer area.
    fn addr(&self, off: usize) -> u64 {
        self.mem.base + (PACKED_AREA + off) as u64
    }

    fn write_area(&self, off: usize, bytes: &[u8]) {
        assert!(self.mem.shared.write_bytes(PACKED_AREA + off, bytes));
    }

    fn read_area(&self, off: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        assert!(self.mem.shared.read_bytes(PACKED_AREA + off, &mut v));
        v
    }

    /// Makes the chain `(addr, len, flags)` available with buffer id `id` (NEXT is up to the
    /// caller) and kicks: every descriptor but the head first, then a release fence, then the
    /// head's flags.
    fn add(&mut self, id: u16, chain: &[(u64, u32, u16)]) {
        let wrap_bits = |wrap: bool| if wrap { D_AVAIL } else { D_USED };
        let (head_pos, head_wrap) = (self.pos, self.wrap);
        for (k, &(addr, len, flags)) in chain.iter().enumerate() {
            let at = usize::from(self.pos) * 16;
            let s = &self.mem.shared;
            assert!(s.write_bytes(at, &addr.to_le_bytes()));
            assert!(s.write_bytes(at + 8, &len.to_le_bytes()));
            assert!(s.write_bytes(at + 12, &id.to_le_bytes()));
            if k > 0 {
                assert!(s.write_bytes(at + 14, &(flags | wrap_bits(self.wrap)).to_le_bytes()));
            }
            self.pos += 1;
            if self.pos == PACKED_SIZE {
                self.pos = 0;
                self.wrap = !self.wrap;
            }
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        let head_flags = chain[0].2 | wrap_bits(head_wrap);
        assert!(self.mem.shared.write_bytes(usize::from(head_pos) * 16 + 14, &head_flags.to_le_bytes()));
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.kick.write(1).unwrap();
    }

    /// Waits up to `limit` for the next used descriptor: `(id, len)`; the used position moves
    /// on by `ring_descs`.
    fn used(&mut self, ring_descs: u16, limit: Duration) -> Option<(u16, u32)> {
        let deadline = Instant::now() + limit;
        let at = usize::from(self.used_pos) * 16;
        loop {
            let mut f = [0u8; 2];
            assert!(self.mem.shared.read_bytes(at + 14, &mut f));
            let flags = u16::from_le_bytes(f);
            let done = if self.used_wrap { D_AVAIL | D_USED } else { 0 };
            if flags & (D_AVAIL | D_USED) == done {
                std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
                let mut b = [0u8; 6];
                assert!(self.mem.shared.read_bytes(at + 8, &mut b));
                for _ in 0..ring_descs {
                    self.used_pos += 1;
                    if self.used_pos == PACKED_SIZE {
                        self.used_pos = 0;
                        self.used_wrap = !self.used_wrap;
                    }
                }
                return Some((u16::from_le_bytes([b[4], b[5]]), u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A read of `len` bytes at `sector` into buffer-area offset 4096: header, data, status.
    fn read(&mut self, id: u16, sector: u64, data_addr: u64, len: u32) -> Option<(u16, u32)> {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&T_IN.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.write_area(0, &hdr);
        self.write_area(64, &[0xff]);
        let chain = [(self.addr(0), 16, D_NEXT), (data_addr, len, D_WRITE | D_NEXT), (self.addr(64), 1, D_WRITE)];
        self.add(id, &chain);
        self.used(3, Duration::from_secs(10))
    }

    fn status(&self) -> u8 {
        self.read_area(64, 1)[0]
    }

    /// Writes the driver event suppression flags (0 enable, 1 disable).
    fn set_driver_event_flags(&self, flags: u16) {
        assert!(self.mem.shared.write_bytes(self.driver_at + 2, &flags.to_le_bytes()));
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the call eventfd was signalled since the last look (non-blocking).
    fn called(&self) -> bool {
        self.call.read().is_ok()
    }
}

fn packed_server(dir: &tempfile::TempDir) -> ServerHandle {
    start(dir, ServerOptions { packed: true, ..ram(1 << 20) })
}

#[test]
fn packed_ring_by_hand_serves_requests_across_laps() {
    let dir = tempfile::tempdir().unwrap();
    let server = packed_server(&dir);
    let mut c = PackedClient::connect(server.socket_path(), Areas::Layout);
    // 3 ring positions per request on a ring of 8: the wrap counters flip many times.
    for id in 0..41u16 {
        let data = c.addr(4096);
        assert_eq!(c.read(id, u64::from(id), data, 512), Some((id, 513)));
        assert_eq!(c.status(), S_OK);
    }
    // GET_VRING_BASE stops the ring and reports where it stands: the avail index in bits
    // 0-14 and its wrap counter in bit 15 (123 positions: index 3, 15 laps, counter clear).
    assert_eq!((c.pos, c.wrap), (3, false));
    assert_eq!(c.frontend.get_vring_base(0).unwrap(), 3);
}

/// The event suppression areas where `RingLayout` puts them, and elsewhere (4-byte but not
/// 16-byte aligned, pages away from the descriptor ring, device area before driver area): the
/// server reads the driver's settings and writes its own where the front-end said.
#[test]
fn packed_used_buffer_notification_only_when_the_driver_asks() {
    for areas in [Areas::Layout, Areas::At(3 * 4096 + 20, 2 * 4096 + 4)] {
        used_buffer_notification(areas);
    }
}

fn used_buffer_notification(areas: Areas) {
    let dir = tempfile::tempdir().unwrap();
    // No poll window: the flags checked below are those of a worker gone back to sleep.
    let server = start(&dir, ServerOptions { packed: true, poll: Duration::ZERO, ..ram(1 << 20) });
    let mut c = PackedClient::connect(server.socket_path(), areas);
    let data = c.addr(4096);
    if let Areas::At(_, device_at) = areas {
        // The server's kick suppression goes to the device area it was given (it ends a batch
        // with flags Enable, 0, as EVENT_IDX is not negotiated here), not where RingLayout
        // would have put it.
        let layout_device = virtio_queue_core::RingLayout::packed(PACKED_SIZE).unwrap().device_offset();
        assert!(c.mem.shared.write_bytes(device_at, &[0xff; 4]));
        assert!(c.mem.shared.write_bytes(layout_device, &[0xff; 4]));
        assert_eq!(c.read(100, 0, data, 512), Some((100, 513)));
        let mut f = [0u8; 4];
        assert!(c.mem.shared.read_bytes(device_at, &mut f));
        assert_eq!(f[2..], [0, 0], "device area flags");
        assert!(c.mem.shared.read_bytes(layout_device, &mut f));
        assert_eq!(f, [0xff; 4], "RingLayout's device area untouched");
    }
    for id in 0..6u16 {
        let enable = id % 2 == 0;
        c.set_driver_event_flags(if enable { 0 } else { 1 });
        let _ = c.called();
        assert_eq!(c.read(id, 0, data, 512), Some((id, 513)));
        // The server signals (or not) just after it marks the chain used.
        let deadline = Instant::now() + if enable { Duration::from_secs(5) } else { Duration::from_millis(50) };
        let mut called = false;
        while !called && Instant::now() < deadline {
            called = c.called();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(called, enable, "{areas:?}: request {id}, notifications enabled: {enable}");
    }
}

#[test]
fn packed_buffer_outside_memory_gets_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let server = packed_server(&dir);
    let mut c = PackedClient::connect(server.socket_path(), Areas::Layout);
    let outside = c.mem.base + MEM_SIZE as u64 + 4096;
    assert_eq!(c.read(5, 0, outside, 512), Some((5, 1)));
    assert_eq!(c.status(), S_IOERR);
    // The ring still works.
    let data = c.addr(4096);
    assert_eq!(c.read(6, 0, data, 512), Some((6, 513)));
    assert_eq!(c.status(), S_OK);
}

/// Chains that break the packed-ring rules: the server marks that ring broken (a log line),
/// completes nothing of it, does not panic, and serves the next connection.
#[test]
fn malformed_packed_chains_break_the_ring_not_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = packed_server(&dir);
    type Case = fn(&mut PackedClient);
    let cases: [(&str, Case); 6] = [
        ("zero-length buffer", |c| c.add(1, &[(c.addr(0), 16, D_NEXT), (c.addr(64), 0, D_WRITE)])),
        ("readable after writable", |c| {
            c.add(1, &[(c.addr(0), 16, D_NEXT), (c.addr(64), 1, D_WRITE | D_NEXT), (c.addr(128), 16, 0)])
        }),
        ("indirect not negotiated", |c| c.add(1, &[(c.addr(1024), 32, D_INDIRECT)])),
        ("chain longer than the ring", |c| {
            let all: Vec<(u64, u32, u16)> = (0..PACKED_SIZE).map(|_| (c.addr(0), 16, D_NEXT)).collect();
            c.add(1, &all);
        }),
        ("head made available before the rest of its chain", |c| {
            let at = usize::from(c.pos) * 16;
            let s = &c.mem.shared;
            assert!(s.write_bytes(at, &c.addr(0).to_le_bytes()));
            assert!(s.write_bytes(at + 8, &16u32.to_le_bytes()));
            assert!(s.write_bytes(at + 14, &(D_NEXT | D_AVAIL).to_le_bytes()));
            c.kick.write(1).unwrap();
        }),
        ("event area overlapping the descriptor ring", |c| {
            c.add(1, &[(c.addr(0), 16, D_NEXT), (c.addr(64), 1, D_WRITE)]);
        }),
    ];
    for (what, case) in cases {
        let areas = if what.starts_with("event area") { Areas::At(16, 4096) } else { Areas::Layout };
        let mut c = PackedClient::connect(server.socket_path(), areas);
        case(&mut c);
        assert_eq!(c.used(1, Duration::from_millis(300)), None, "{what}: nothing is completed");
        drop(c);
        // The server is alive and serves a well-formed front-end.
        let mut ok = PackedClient::connect(server.socket_path(), Areas::Layout);
        let data = ok.addr(4096);
        assert_eq!(ok.read(9, 0, data, 512), Some((9, 513)), "after {what}");
        assert_eq!(ok.status(), S_OK);
    }
}

#[test]
fn packed_is_offered_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, ram(1 << 20));
    let fe = Frontend::connect(server.socket_path(), 1).unwrap();
    fe.set_owner().unwrap();
    assert_eq!(fe.get_features().unwrap() & F_RING_PACKED, 0);
}

#[test]
fn vblk_serve_packed_offers_and_serves_packed_rings() {
    let dir = tempfile::tempdir().unwrap();
    let sock = socket_in(&dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vblk"))
        .args(["serve", "--packed", "--size", "1M", "--socket"])
        .arg(&sock)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // "serving ..." is printed once the socket listens (the file alone
    // appears between bind and listen); stderr is drained to the end.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("serving") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("vblk serve did not report listening within 10 s");
    let mut c = PackedClient::connect(&sock, Areas::Layout);
    let data = c.addr(4096);
    assert_eq!(c.read(1, 0, data, 512), Some((1, 513)));
    assert_eq!(c.status(), S_OK);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn vblk_info_packed_on_the_embedded_server_negotiates_packed_rings() {
    let out = vblk(&["info", "--packed", "--size", "4M"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    let format = stdout.lines().find(|l| l.starts_with("ring format:")).unwrap_or("");
    assert!(format.contains("packed"), "{stdout}");
}
