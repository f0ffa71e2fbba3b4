//! The embedded vhost-user-blk server.
//!
//! [`Server::start`] binds a unix socket and serves one vhost-user front-end at a time from
//! background threads: one thread accepts connections, and for each connection the
//! `vhost-user-backend` crate runs a protocol thread plus one worker thread per queue. The
//! device is a virtio-blk device backed by sparse RAM (a memfd) or by an image file.
//!
//! Offered virtio features: VERSION_1, RING_INDIRECT_DESC, RING_EVENT_IDX, SEG_MAX, BLK_SIZE
//! (512), FLUSH, MQ, and DISCARD + WRITE_ZEROES (with unmap) when writable, RO when read-only;
//! RING_PACKED when [`ServerOptions::packed`] is set (`vblk serve --packed`). Offered
//! vhost-user protocol features: MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS, RESET_DEVICE.
//!
//! ## Ring formats
//!
//! Split rings are served by `virtio-queue` 0.18. It has no device side for packed rings, so
//! when a front-end negotiates RING_PACKED its queues are served by
//! `virtio_queue_core::device::PackedDevice`, the device model of our ring crate, over views
//! of the memory the front-end registered (rebuilt when the memory table changes): EVENT_IDX
//! and the event suppression areas work as the model implements them, and the call eventfd
//! is signalled only when the driver's suppression settings ask for it. Both formats hand
//! each request, as a list of (address, length, writable) buffers, to one executor, so every
//! request type behaves the same on either.
//!
//! The three areas of a packed ring may be anywhere in the registered memory (descriptor
//! ring 16-byte aligned, event suppression areas 4-byte aligned). Packed rings are still off
//! by default, because offering them costs every front-end something: a chain of the model
//! holds at most 64 buffers, so `seg_max` is 62 while packed rings are offered, whichever
//! format a front-end then picks; and queue sizes must be powers of two (the `virtio-queue`
//! state that keeps SET_VRING_NUM refuses other sizes), which the packed format itself does
//! not require, so a front-end that picks packed with another size finds its ring refused
//! (with a log line), where without the offer it would have run on split rings.
//!
//! SET_VRING_BASE for a packed ring carries the avail index in bits 0-14 and its wrap
//! counter in bit 15; the used position starts at the same place (neither the `vhost`
//! front-end nor `vhost-user-backend` carries the upper 16 bits), and GET_VRING_BASE reports
//! the avail position in the same encoding.
//!
//! ## Kicks and used-buffer notifications
//!
//! A kick wakes the queue's worker, which serves every request it finds with kicks
//! suppressed (EVENT_IDX: `avail_event` left behind; otherwise NO_NOTIFY), then keeps looking
//! at the queue for [`ServerOptions::poll`] (default [`DEFAULT_POLL`]) after the last request
//! it found, serving what comes, before it asks for kicks again, looks once more and sleeps.
//! A front-end that submits within the window sends no kick, and the worker takes no
//! wake-up; qemu's iothreads poll the same way. With EVENT_IDX the worker looks at the
//! driver's `used_event` after each used entry, as qemu does, and signals as soon as it is
//! passed, not at the end of the pass: a driver that asks to hear after half of its batch
//! hears then, and refills the queue while the other half is served.
//!
//! The memory table is taken after the requests are seen available (once per look at
//! `avail.idx`, for the requests published up to it): a front-end adds the memory a request
//! uses (ADD_MEM_REG, acknowledged) before it publishes the request, so only a table taken
//! after that holds it.
//!
//! ## Requests
//!
//! Requests IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES are served. Every request is
//! checked (chain shape, header, data length, sector range, writable status byte); a bad one
//! completes with `VIRTIO_BLK_S_IOERR`, an unknown or un-negotiated one with
//! `VIRTIO_BLK_S_UNSUPP`. A chain with no writable status byte completes with length 0. A
//! packed chain that breaks the ring rules (zero length, readable after writable, indirect
//! without the feature, a chain that never ends) cannot be completed at all: that ring is
//! marked broken with a log line and no longer served; the server and other queues go on.

mod device;
mod disk;
mod packed;

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::warn;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use device::{BlkBackend, Device};
use disk::Disk;
pub use disk::SECTOR_SIZE;
use virtio_blk_dev::spec::ID_LEN;

/// Default size of RAM storage: 1 GiB, sparse (untouched pages cost nothing).
pub const DEFAULT_RAM_SIZE: u64 = 1 << 30;
/// Default maximum queue size offered to the front-end.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Largest queue count accepted (one worker thread each).
pub const MAX_QUEUES: u16 = 64;

/// Where the device keeps its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// Sparse anonymous memory (a memfd) of this many bytes, a multiple of 512.
    Ram {
        /// Size in bytes.
        size: u64,
    },
    /// An existing image file; its size (rounded down to 512 bytes) is the capacity.
    Image(PathBuf),
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Backing store.
    pub storage: Storage,
    /// Number of request queues (1..=[`MAX_QUEUES`]); one worker thread each.
    pub queues: u16,
    /// Maximum queue size offered (a power of two, 2..=32768).
    pub queue_size: u16,
    /// Offer VIRTIO_BLK_F_RO and refuse writes with `VIRTIO_BLK_S_IOERR`.
    pub read_only: bool,
    /// Device id returned by GET_ID (at most 20 bytes).
    pub serial: String,
    /// Offer VIRTIO_F_RING_PACKED as well as split rings: each front-end then picks the
    /// format. Off by default: while packed rings are offered `seg_max` drops to 62, and a
    /// front-end that picks packed with a queue size that is not a power of two has its ring
    /// refused. See the module documentation.
    pub packed: bool,
    /// How long each worker keeps looking at its queue, with the front-end's kicks
    /// suppressed, after the last request it found, before it asks for kicks again and
    /// sleeps. A front-end that submits again within the window skips the kick (a system
    /// call, and a wake-up of the worker); the worker spins that long once the load stops.
    /// [`DEFAULT_POLL`] by default (qemu's iothreads poll adaptively up to 32 µs); zero
    /// sleeps as soon as the queue is empty.
    pub poll: Duration,
}

/// The default [`ServerOptions::poll`].
pub const DEFAULT_POLL: Duration = Duration::from_micros(50);

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            storage: Storage::Ram { size: DEFAULT_RAM_SIZE },
            queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            read_only: false,
            serial: "uvirtio-vblk".to_owned(),
            packed: false,
            poll: DEFAULT_POLL,
        }
    }
}

/// Why the server could not start.
#[derive(Debug)]
pub enum Error {
    /// An option is out of range.
    Options(String),
    /// The RAM storage could not be created.
    Ram(io::Error),
    /// The image file could not be opened.
    Image {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The socket could not be created or bound.
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A thread could not be started.
    Thread(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Options(m) => write!(f, "invalid server option: {m}"),
            Error::Ram(e) => write!(f, "cannot create RAM storage: {e}"),
            Error::Image { path, source } => write!(f, "cannot use image {}: {source}", path.display()),
            Error::Socket { path, reason } => write!(f, "cannot listen on {}: {reason}", path.display()),
            Error::Thread(e) => write!(f, "cannot start server thread: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Ram(e) | Error::Image { source: e, .. } | Error::Thread(e) => Some(e),
            _ => None,
        }
    }
}

/// The embedded vhost-user-blk server.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Binds `path` (replacing a stale socket file) and serves front-ends, one connection at a
    /// time, from background threads until the returned handle is dropped.
    pub fn start(path: impl AsRef<Path>, options: ServerOptions) -> Result<ServerHandle, Error> {
        let path = path.as_ref().to_path_buf();
        let dev = Arc::new(build_device(&options)?);
        let socket_err = |reason: String| Error::Socket { path: path.clone(), reason };
        let listener = Listener::new(&path, true).map_err(|e| socket_err(e.to_string()))?;
        let stop = Arc::new(Stop {
            flag: AtomicBool::new(false),
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::Thread)?,
            conn: Mutex::new(None),
        });
        let capacity = dev.disk.sectors();
        let thread = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("vblk-accept".to_owned())
                .spawn(move || accept_loop(listener, dev, &stop))
                .map_err(Error::Thread)?
        };
        Ok(ServerHandle { socket: path, capacity, stop, thread: Some(thread) })
    }
}

fn build_device(o: &ServerOptions) -> Result<Device, Error> {
    if o.queues == 0 || o.queues > MAX_QUEUES {
        return Err(Error::Options(format!("queues must be 1..={MAX_QUEUES}, got {}", o.queues)));
    }
    if o.queue_size < 2 || !o.queue_size.is_power_of_two() {
        return Err(Error::Options(format!("queue size must be a power of two >= 2, got {}", o.queue_size)));
    }
    if o.serial.len() > ID_LEN {
        return Err(Error::Options(format!("serial must be at most {ID_LEN} bytes")));
    }
    let disk = match &o.storage {
        Storage::Ram { size } => {
            if *size == 0 || size % SECTOR_SIZE != 0 {
                return Err(Error::Options(format!("size must be a non-zero multiple of 512 bytes, got {size}")));
            }
            Disk::ram(*size).map_err(Error::Ram)?
        }
        Storage::Image(path) => {
            let disk = Disk::image(path, o.read_only).map_err(|source| Error::Image { path: path.clone(), source })?;
            if disk.sectors() == 0 {
                return Err(Error::Image {
                    path: path.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidInput, "image is smaller than one 512-byte sector"),
                });
            }
            disk
        }
    };
    let mut id = [0u8; ID_LEN];
    id[..o.serial.len()].copy_from_slice(o.serial.as_bytes());
    Ok(Device {
        disk,
        queues: o.queues,
        queue_size: o.queue_size,
        read_only: o.read_only,
        packed: o.packed,
        id,
        poll: o.poll,
    })
}

/// Shared between the handle and the accept thread.
struct Stop {
    flag: AtomicBool,
    event: EventFd,
    conn: Mutex<Option<ShutdownHandle>>,
}

impl Stop {
    fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.event.write(1);
        if let Some(conn) = self.conn.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            conn.shutdown();
        }
    }

    fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// A running server. Dropping it (or calling [`ServerHandle::shutdown`]) closes the current
/// connection, stops every server thread, waits for them and removes the socket file.
pub struct ServerHandle {
    socket: PathBuf,
    capacity: u64,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle").field("socket", &self.socket).field("capacity", &self.capacity).finish()
    }
}

impl ServerHandle {
    /// The unix socket the server listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Device capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    /// Stops the server and waits for its threads.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    /// Blocks until the server stops (which only happens on an internal error or when another
    /// thread cannot reach this handle; `vblk serve` uses it to run until killed).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn stop_and_join(&mut self) {
        self.stop.request();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Waits until the listener has a connection (`true`) or a stop was requested (`false`).
fn wait_for_connection(listener: &Listener, stop: &Stop) -> io::Result<bool> {
    loop {
        if stop.requested() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.event.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structures for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if stop.requested() || fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

fn accept_loop(mut listener: Listener, dev: Arc<Device>, stop: &Stop) {
    loop {
        match wait_for_connection(&listener, stop) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!("vblk server: poll failed, stopping: {e}");
                return;
            }
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = BlkBackend::new(dev.clone(), mem.clone());
        let mut daemon = match VhostUserDaemon::new("vblk-conn".to_owned(), backend, mem) {
            Ok(d) => d,
            Err(e) => {
                warn!("vblk server: cannot set up a connection, stopping: {e}");
                return;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            warn!("vblk server: accept failed: {e}");
            continue;
        }
        {
            let mut conn = stop.conn.lock().unwrap_or_else(|p| p.into_inner());
            *conn = daemon.shutdown_handle();
            if stop.requested() {
                daemon.request_shutdown();
            }
        }
        if let Err(e) = daemon.wait() {
            if !stop.requested() {
                log::info!("vblk server: connection ended: {e}");
            }
        }
        stop.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Dropping the daemon stops and joins this connection's queue workers.
        drop(daemon);
    }
}
