//! A vhost-user front-end transport: a virtio device whose back-end runs in
//! another process behind a unix socket (qemu-storage-daemon, the embedded
//! vblk server, SPDK ...), driven through the `vhost` crate's [`Frontend`].
//!
//! * Memory shared with the back-end is memfd-backed: [`Transport::alloc_dma`]
//!   creates a [`MemFd`] and registers it (ADD_MEM_REG when the back-end offers
//!   CONFIGURE_MEM_SLOTS, otherwise the whole table with SET_MEM_TABLE).
//!   Device addresses are process addresses.
//! * The virtio status sequence is emulated on this side (the front-end has no
//!   SET_STATUS/GET_STATUS); features are sent at FEATURES_OK, with
//!   VHOST_USER_F_PROTOCOL_FEATURES added when offered.
//! * REPLY_ACK, CONFIG, MQ, RESET_DEVICE and CONFIGURE_MEM_SLOTS are used when
//!   offered.
//! * A back-end that dies, closes the socket or stops answering (no reply
//!   within [`VhostUserOptions::reply_timeout`]) turns every later call, and
//!   every completion wait ([`virtio_transport_api::Cleared::wait`]), into a
//!   [`Cause::Disconnected`] error; no call hangs and none panics. A
//!   watchdog thread notices the hang-up even while no request is being
//!   sent, and wakes every sleeping queue (see `watchdog.rs`).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue_core::RingFormat;
use virtio_transport_api::{
    Cause, CompletionEvent, DeviceStatus, DmaRegion, Error, EventFd, Hangup, MemFd, QueueSetup, Result, Step,
    Transport, VirtioFeatures,
};

mod watchdog;
use watchdog::Watchdog;

/// The transport name in errors.
pub const NAME: &str = "vhost-user";

/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit in the feature word, not a virtio one.
const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Most regions a SET_MEM_TABLE message carries (VHOST_MEMORY_BASELINE_NREGIONS).
const MAX_TABLE_REGIONS: usize = 8;

/// Largest device config space GET_CONFIG reads (vhost-user limits the payload).
const MAX_CONFIG: u32 = 256;

/// How to talk to the back-end.
#[derive(Clone, Debug)]
pub struct VhostUserOptions {
    /// The virtio device ID to report (vhost-user does not carry it); 2 = block.
    pub device_id: u32,
    /// A back-end that does not answer a request within this time is treated
    /// as gone: the socket is shut down and every later call fails.
    pub reply_timeout: Duration,
    /// Largest queue size to allow (vhost-user has no query; libvhost-user
    /// back-ends accept up to 1024).
    pub max_queue_size: u16,
    /// Use ADD_MEM_REG when the back-end offers CONFIGURE_MEM_SLOTS (`false`
    /// forces SET_MEM_TABLE, for testing both paths).
    pub use_mem_slots: bool,
    /// Ask for REPLY_ACK on every request when offered.
    pub use_reply_ack: bool,
}

impl Default for VhostUserOptions {
    fn default() -> Self {
        VhostUserOptions {
            device_id: 2,
            reply_timeout: Duration::from_secs(5),
            max_queue_size: 1024,
            use_mem_slots: true,
            use_reply_ack: true,
        }
    }
}

/// A memory region registered with the back-end.
#[derive(Clone, Copy, Debug)]
struct Region {
    addr: u64,
    len: u64,
    fd: RawFd,
    offset: u64,
}

impl Region {
    fn info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            // Device addresses are process addresses: GPA = user address.
            guest_phys_addr: self.addr,
            memory_size: self.len,
            userspace_addr: self.addr,
            mmap_offset: self.offset,
            mmap_handle: self.fd,
        }
    }

    fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr && addr.checked_add(len).is_some_and(|end| end <= self.addr + self.len)
    }
}

/// State shared by the transport and the DMA regions it handed out (they
/// unregister themselves on drop).
struct Shared {
    frontend: Mutex<Frontend>,
    sock: RawFd,
    watchdog: Arc<Watchdog>,
    timeout: Duration,
    /// Raised when the back-end is gone (see [`Shared::mark_disconnected`]
    /// and the watchdog); the queues' completion events share it.
    hangup: Hangup,
    /// Why, as this side found out; empty until then.
    why: Mutex<String>,
    mem_slots: bool,
    regions: Mutex<Vec<Region>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.watchdog.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn disconnected_error(&self, step: Step, what: &str) -> Error {
        let why = lock(&self.why).clone();
        let why = if why.is_empty() { "the back-end closed the connection".to_string() } else { why };
        Error::new(NAME, step, Cause::Disconnected(why)).with_context(what.to_string())
    }

    fn mark_disconnected(&self, why: String) {
        {
            let mut w = lock(&self.why);
            // The first reason given wins; the watchdog raises the flag
            // without one (a hang-up it saw, or its own shutdown).
            if w.is_empty() {
                *w = why;
            }
        }
        self.hangup.raise();
        // Make sure the back-end sees it too.
        // SAFETY: `sock` is the frontend's socket, open while `self` lives.
        unsafe { libc::shutdown(self.sock, libc::SHUT_RDWR) };
    }

    /// Whether the socket reports a hang-up (checked before each request).
    fn hung_up(&self) -> bool {
        let mut p = libc::pollfd { fd: self.sock, events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one live pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0
    }

    /// Runs one request on the frontend, failing fast when the back-end is
    /// gone and bounding the request by the reply timeout.
    fn call<R>(&self, step: Step, what: &str, f: impl FnOnce(&mut Frontend) -> vhost::Result<R>) -> Result<R> {
        if self.hangup.is_raised() {
            return Err(self.disconnected_error(step, what));
        }
        if self.hung_up() {
            self.mark_disconnected("the back-end closed the connection".into());
            return Err(self.disconnected_error(step, what));
        }
        let mut frontend = lock(&self.frontend);
        self.watchdog.arm(self.timeout);
        let r = f(&mut frontend);
        let fired = self.watchdog.disarm();
        drop(frontend);
        match r {
            Ok(v) if !fired => Ok(v),
            Ok(_) => {
                self.mark_disconnected(format!("no reply within {:?}", self.timeout));
                Err(self.disconnected_error(step, what))
            }
            Err(e) => {
                if fired {
                    self.mark_disconnected(format!("no reply within {:?}", self.timeout));
                    return Err(self.disconnected_error(step, what));
                }
                Err(self.map_error(step, what, e))
            }
        }
    }

    fn map_error(&self, step: Step, what: &str, e: vhost::Error) -> Error {
        use vhost::vhost_user::Error as U;
        let gone = |s: &Shared, why: String| {
            s.mark_disconnected(why);
            s.disconnected_error(step, what)
        };
        match e {
            vhost::Error::VhostUserProtocol(u) => match u {
                U::Disconnected => gone(self, "the back-end closed the connection".into()),
                U::PartialMessage => gone(self, "the connection broke in the middle of a message".into()),
                U::SocketBroken(io) => gone(self, format!("socket broken: {io}")),
                U::SocketError(io)
                    if matches!(
                        io.kind(),
                        std::io::ErrorKind::BrokenPipe
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::NotConnected
                    ) =>
                {
                    gone(self, format!("socket error: {io}"))
                }
                U::SocketError(io) | U::SocketRetry(io) | U::SocketConnect(io) => {
                    Error::os(NAME, step, io).with_context(what.to_string())
                }
                U::BackendInternalError => {
                    Error::new(NAME, step, Cause::Protocol("the back-end refused the request".into()))
                        .with_context(what.to_string())
                }
                U::InactiveOperation(_) | U::InactiveFeature(_) => {
                    Error::new(NAME, step, Cause::Unsupported(u.to_string())).with_context(what.to_string())
                }
                other => {
                    // The stream may be out of step with the back-end now.
                    let msg = other.to_string();
                    self.mark_disconnected(format!("protocol error: {msg}"));
                    Error::new(NAME, step, Cause::Protocol(msg)).with_context(what.to_string())
                }
            },
            other => Error::new(NAME, step, Cause::Protocol(other.to_string())).with_context(what.to_string()),
        }
    }

    fn register(&self, r: Region) -> Result<()> {
        let mut regions = lock(&self.regions);
        if regions.iter().any(|o| o.addr < r.addr + r.len && r.addr < o.addr + o.len) {
            return Err(Error::new(NAME, Step::Memory, Cause::InvalidArgument("memory already mapped".into())));
        }
        if self.mem_slots {
            self.call(Step::Memory, "ADD_MEM_REG", |f| f.add_mem_region(&r.info()))?;
            regions.push(r);
        } else {
            if regions.len() >= MAX_TABLE_REGIONS {
                return Err(Error::new(
                    NAME,
                    Step::Memory,
                    Cause::Unsupported(format!(
                        "the back-end lacks CONFIGURE_MEM_SLOTS and SET_MEM_TABLE holds at most {MAX_TABLE_REGIONS} regions"
                    )),
                ));
            }
            let mut infos: Vec<_> = regions.iter().map(Region::info).collect();
            infos.push(r.info());
            self.call(Step::Memory, "SET_MEM_TABLE", |f| f.set_mem_table(&infos))?;
            regions.push(r);
        }
        Ok(())
    }

    fn unregister(&self, addr: u64) -> Result<()> {
        let mut regions = lock(&self.regions);
        let Some(i) = regions.iter().position(|r| r.addr == addr) else {
            return Err(Error::new(NAME, Step::Memory, Cause::InvalidArgument(format!("{addr:#x} is not mapped"))));
        };
        let r = regions.remove(i);
        if self.hangup.is_raised() {
            return Ok(());
        }
        if self.mem_slots {
            self.call(Step::Memory, "REM_MEM_REG", |f| f.remove_mem_region(&r.info()))
        } else if regions.is_empty() {
            // SET_MEM_TABLE cannot send an empty table; the back-end keeps its
            // own mapping of the memfd, which no longer matters to us.
            Ok(())
        } else {
            let infos: Vec<_> = regions.iter().map(Region::info).collect();
            self.call(Step::Memory, "SET_MEM_TABLE", |f| f.set_mem_table(&infos)).map(|_| ())
        }
    }
}

/// Unregisters a DMA region from the back-end, then frees its memfd.
struct DmaOwner {
    shared: Arc<Shared>,
    addr: u64,
    _mem: MemFd,
}

impl Drop for DmaOwner {
    fn drop(&mut self) {
        // A back-end that is gone or refuses cannot be helped here; the memory
        // is ours to free either way (the back-end keeps its own mapping).
        let _ = self.shared.unregister(self.addr);
    }
}

/// A virtio device behind a vhost-user socket.
pub struct VhostUserTransport {
    shared: Arc<Shared>,
    options: VhostUserOptions,
    /// Virtio features offered (without VHOST_USER_F_PROTOCOL_FEATURES).
    offered: u64,
    /// Whether the back-end offered VHOST_USER_F_PROTOCOL_FEATURES.
    protocol: bool,
    protocol_features: VhostUserProtocolFeatures,
    status: DeviceStatus,
    driver_features: u64,
    queues: u16,
    started: Vec<bool>,
}

impl std::fmt::Debug for VhostUserTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserTransport")
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("protocol_features", &self.protocol_features)
            .field("status", &self.status)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl VhostUserTransport {
    /// Connects to the back-end listening at `path` and sets up the session:
    /// SET_OWNER, GET_FEATURES, protocol feature negotiation, GET_QUEUE_NUM
    /// (MQ). The device is not reset or negotiated yet (see
    /// [`virtio_transport_api::negotiate`]).
    pub fn connect(path: impl AsRef<Path>, options: VhostUserOptions) -> Result<Self> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .map_err(|e| Error::os(NAME, Step::Connect, e).with_context(path.display().to_string()))?;
        Self::from_stream(stream, options).map_err(|e| match e.context() {
            Some(c) => {
                let c = format!("{}: {c}", path.display());
                e.with_context(c)
            }
            None => e.with_context(path.display().to_string()),
        })
    }

    /// Like [`connect`](Self::connect), over an already connected socket.
    pub fn from_stream(stream: UnixStream, options: VhostUserOptions) -> Result<Self> {
        let sock = stream.as_raw_fd();
        let watch_fd = stream.try_clone().map_err(|e| Error::os(NAME, Step::Connect, e))?;
        let hangup = Hangup::new();
        let watchdog =
            Watchdog::spawn(OwnedFd::from(watch_fd), hangup.clone()).map_err(|e| Error::os(NAME, Step::Connect, e))?;
        let frontend = Frontend::from_stream(stream, 1);
        let mut shared = Shared {
            frontend: Mutex::new(frontend),
            sock,
            watchdog,
            timeout: options.reply_timeout,
            hangup,
            why: Mutex::new(String::new()),
            mem_slots: false,
            regions: Mutex::new(Vec::new()),
        };
        shared.call(Step::Connect, "SET_OWNER", |f| f.set_owner())?;
        let features = shared.call(Step::Connect, "GET_FEATURES", |f| f.get_features())?;
        let protocol = features & PROTOCOL_FEATURES_BIT != 0;
        let mut acked = VhostUserProtocolFeatures::empty();
        let mut queues = 1u16;
        if protocol {
            let offered = shared.call(Step::Connect, "GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
            let mut want = VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::RESET_DEVICE;
            if options.use_reply_ack {
                want |= VhostUserProtocolFeatures::REPLY_ACK;
            }
            if options.use_mem_slots {
                want |= VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
            }
            acked = offered & want;
            shared.call(Step::Connect, "SET_PROTOCOL_FEATURES", |f| f.set_protocol_features(acked))?;
            if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                lock(&shared.frontend).set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                let n = shared.call(Step::Connect, "GET_QUEUE_NUM", |f| f.get_queue_num())?;
                queues = u16::try_from(n).unwrap_or(u16::MAX).max(1);
            }
            shared.mem_slots = acked.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
        }
        Ok(VhostUserTransport {
            shared: Arc::new(shared),
            options,
            offered: features & !PROTOCOL_FEATURES_BIT,
            protocol,
            protocol_features: acked,
            status: DeviceStatus::empty(),
            driver_features: 0,
            queues,
            started: vec![false; queues as usize],
        })
    }

    /// The vhost-user protocol features in use.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Whether memory is registered region by region (CONFIGURE_MEM_SLOTS)
    /// rather than as a whole table (SET_MEM_TABLE).
    pub fn uses_mem_slots(&self) -> bool {
        self.shared.mem_slots
    }

    /// Whether the back-end is known to be gone.
    pub fn is_disconnected(&self) -> bool {
        self.shared.hangup.is_raised() || self.shared.hung_up()
    }

    fn check_alive(&self, step: Step) -> Result<()> {
        if self.is_disconnected() {
            self.shared.mark_disconnected("the back-end closed the connection".into());
            return Err(self.shared.disconnected_error(step, "connection check"));
        }
        Ok(())
    }

    fn invalid(step: Step, msg: String) -> Error {
        Error::new(NAME, step, Cause::InvalidArgument(msg))
    }
}

/// A `vmm_sys_util` eventfd on a duplicate of `fd`, for the `vhost` crate's API.
fn sys_eventfd(fd: &EventFd, step: Step) -> Result<vmm_sys_util::eventfd::EventFd> {
    fd.to_vmm_sys_util().map_err(|e| Error::os(NAME, step, e))
}

impl Transport for VhostUserTransport {
    type Notifier = EventFd;

    fn name(&self) -> &'static str {
        NAME
    }

    fn device_id(&self) -> u32 {
        self.options.device_id
    }

    fn reset(&mut self) -> Result<()> {
        if self.protocol_features.contains(VhostUserProtocolFeatures::RESET_DEVICE) {
            self.shared.call(Step::Reset, "RESET_DEVICE", |f| f.reset_device())?;
        } else {
            // Without RESET_DEVICE, GET_VRING_BASE stops each started ring.
            for i in 0..self.started.len() {
                if self.started[i] {
                    self.shared.call(Step::Reset, "GET_VRING_BASE", |f| f.get_vring_base(i))?;
                }
            }
        }
        self.started.iter_mut().for_each(|s| *s = false);
        self.status = DeviceStatus::empty();
        self.driver_features = 0;
        Ok(())
    }

    fn status(&mut self) -> Result<DeviceStatus> {
        self.check_alive(Step::Status)?;
        Ok(self.status)
    }

    fn set_status(&mut self, status: DeviceStatus) -> Result<()> {
        if status.is_empty() {
            return self.reset();
        }
        self.check_alive(Step::Status)?;
        let mut status = status;
        if status.contains(DeviceStatus::FEATURES_OK) && !self.status.contains(DeviceStatus::FEATURES_OK) {
            let features = self.driver_features;
            let accepted = features & !self.offered == 0 && features & VirtioFeatures::VERSION_1.bits() != 0;
            if accepted {
                let wire = features | if self.protocol { PROTOCOL_FEATURES_BIT } else { 0 };
                match self.shared.call(Step::Features, "SET_FEATURES", |f| f.set_features(wire)) {
                    Ok(()) => {}
                    Err(e) if e.is_disconnected() => return Err(e),
                    // The back-end refused (REPLY_ACK): like a device clearing FEATURES_OK.
                    Err(_) => status.remove(DeviceStatus::FEATURES_OK),
                }
            } else {
                status.remove(DeviceStatus::FEATURES_OK);
            }
        }
        self.status = status;
        Ok(())
    }

    fn device_features(&mut self) -> Result<u64> {
        self.check_alive(Step::Features)?;
        Ok(self.offered)
    }

    fn set_driver_features(&mut self, features: u64) -> Result<()> {
        if self.status.contains(DeviceStatus::FEATURES_OK) {
            return Err(Self::invalid(Step::Features, "features written after FEATURES_OK".into()));
        }
        self.driver_features = features;
        Ok(())
    }

    fn config_generation(&mut self) -> Result<u32> {
        // vhost-user has no generation counter; config changes arrive as
        // back-end messages, which this transport does not negotiate.
        self.check_alive(Step::Config)?;
        Ok(0)
    }

    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        if !self.protocol_features.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(Error::new(
                NAME,
                Step::Config,
                Cause::Unsupported("the back-end does not offer the CONFIG protocol feature".into()),
            ));
        }
        let end = u32::try_from(buf.len()).ok().and_then(|l| offset.checked_add(l)).filter(|&e| e <= MAX_CONFIG);
        let Some(end) = end else {
            return Err(Self::invalid(Step::Config, format!("{} bytes at {offset} exceed {MAX_CONFIG}", buf.len())));
        };
        if buf.is_empty() {
            return Ok(());
        }
        // Read from offset 0: qemu-storage-daemon's vhost-user-blk ignores the
        // offset of GET_CONFIG and always copies from the start.
        let zero = vec![0u8; end as usize];
        let (_, payload) = self
            .shared
            .call(Step::Config, "GET_CONFIG", |f| f.get_config(0, end, VhostUserConfigFlags::empty(), &zero))
            .map_err(|e| {
                // libvhost-user back-ends answer a read past the end of their
                // config space with an empty reply, which the vhost crate
                // waits on; say so, since the timeout alone hides it.
                e.with_context(format!(
                    "GET_CONFIG of {end} bytes (a back-end whose config space is shorter sends an empty reply)"
                ))
            })?;
        let src = payload
            .get(offset as usize..end as usize)
            .ok_or_else(|| Error::new(NAME, Step::Config, Cause::Protocol("short GET_CONFIG reply".into())))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn max_queues(&self) -> u16 {
        self.queues
    }

    fn max_queue_size(&mut self, index: u16) -> Result<u16> {
        if index >= self.queues {
            return Err(Self::invalid(Step::Queue(index), format!("the device has {} queues", self.queues)));
        }
        Ok(self.options.max_queue_size)
    }

    fn setup_queue(&mut self, index: u16, setup: &QueueSetup) -> Result<(EventFd, CompletionEvent)> {
        let step = Step::Queue(index);
        if index >= self.queues {
            return Err(Self::invalid(step, format!("the device has {} queues", self.queues)));
        }
        if !self.status.contains(DeviceStatus::FEATURES_OK) {
            return Err(Self::invalid(step, "queue set up before FEATURES_OK".into()));
        }
        if setup.size == 0 || setup.size > self.options.max_queue_size {
            return Err(Self::invalid(step, format!("size {} (at most {})", setup.size, self.options.max_queue_size)));
        }
        let packed = setup.format == RingFormat::Packed;
        if packed && self.driver_features & VirtioFeatures::RING_PACKED.bits() == 0 {
            return Err(Self::invalid(step, "packed ring without VIRTIO_F_RING_PACKED negotiated".into()));
        }
        let a = setup.addresses;
        for (what, addr) in [("descriptor area", a.desc), ("driver area", a.driver), ("device area", a.device)] {
            if self.translate(addr as *const u8, 1).is_none() {
                return Err(Self::invalid(step, format!("{what} at {addr:#x} is not in registered memory")));
            }
        }
        let i = index as usize;
        let sh = &self.shared;
        sh.call(step, "SET_VRING_NUM", |f| f.set_vring_num(i, setup.size))?;
        let config = VringConfigData {
            queue_max_size: self.options.max_queue_size,
            queue_size: setup.size,
            flags: 0,
            desc_table_addr: a.desc,
            used_ring_addr: a.device,
            avail_ring_addr: a.driver,
            log_addr: None,
        };
        sh.call(step, "SET_VRING_ADDR", |f| f.set_vring_addr(i, &config))?;
        // Packed (vhost-user spec, "Vring descriptor indices for packed virtqueues"): bits
        // 0-14 the next avail index, bit 15 its wrap counter, bits 16-30 the used index, bit
        // 31 its wrap counter. A fresh ring is 0x8000_8000, but `vhost` 0.18's front-end takes
        // a u16 and sends only the low half, 0x8000; back-ends that follow DPDK and the `vblk`
        // server start the used position where the avail position is, which is the same ring
        // state. Nothing here can send the upper half.
        sh.call(step, "SET_VRING_BASE", |f| f.set_vring_base(i, if packed { 0x8000 } else { 0 }))?;
        let kick = EventFd::new().map_err(|e| e.with_context("kick eventfd"))?;
        let call = EventFd::new().map_err(|e| e.with_context("call eventfd"))?;
        let call_sys = sys_eventfd(&call, step)?;
        sh.call(step, "SET_VRING_CALL", |f| f.set_vring_call(i, &call_sys))?;
        let kick_sys = sys_eventfd(&kick, step)?;
        sh.call(step, "SET_VRING_KICK", |f| f.set_vring_kick(i, &kick_sys))?;
        if self.protocol {
            sh.call(step, "SET_VRING_ENABLE", |f| f.set_vring_enable(i, true))?;
        }
        self.started[i] = true;
        Ok((kick, CompletionEvent::with_hangup(NAME, index, call, &self.shared.hangup)?))
    }

    fn alloc_dma(&self, len: usize) -> Result<DmaRegion> {
        let mem = MemFd::new("uvirtio-dma", len).map_err(|e| Error::os(NAME, Step::Memory, e).with_context("memfd"))?;
        let ptr = mem.as_non_null();
        let region = Region { addr: ptr.as_ptr() as u64, len: mem.len() as u64, fd: mem.as_raw_fd(), offset: 0 };
        self.shared.register(region)?;
        let len = mem.len();
        let owner = DmaOwner { shared: Arc::clone(&self.shared), addr: region.addr, _mem: mem };
        // SAFETY: the memfd mapping lives as long as `owner`, and the back-end
        // sees it at its process address (registered just above).
        unsafe { DmaRegion::new(ptr, len, region.addr, Box::new(owner)) }
            .ok_or_else(|| Self::invalid(Step::Memory, "memfd mapping not aligned".into()))
    }

    unsafe fn map_memory(&self, addr: *mut u8, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<u64> {
        if addr.is_null() || len == 0 {
            return Err(Self::invalid(Step::Memory, "null address or empty mapping".into()));
        }
        let region = Region { addr: addr as u64, len: len as u64, fd: fd.as_raw_fd(), offset };
        self.shared.register(region)?;
        Ok(region.addr)
    }

    unsafe fn unmap_memory(&self, addr: *mut u8) -> Result<()> {
        self.shared.unregister(addr as u64)
    }

    fn translate(&self, addr: *const u8, len: usize) -> Option<u64> {
        let (addr, len) = (addr as u64, len as u64);
        lock(&self.shared.regions).iter().any(|r| r.contains(addr, len)).then_some(addr)
    }
}

impl Drop for VhostUserTransport {
    fn drop(&mut self) {
        // The session ends with the transport: the back-end sees the socket
        // close, completion events see the hang-up, DMA regions that are still
        // alive stop talking to the back-end.
        self.shared.mark_disconnected("the transport was dropped".into());
    }
}
