//! An in-process transport (feature `loopback`): the device is a
//! [`LoopbackDevice`] written by the device crate, its virtqueues are served by
//! the core's device model ([`SplitDevice`], [`PackedDevice`]), and there is no
//! backend, socket or second process at all.
//!
//! It exists so that a device crate can be unit-tested and benchmarked
//! (callgrind instruction counts) with nothing but itself:
//!
//! * [`LoopbackTransport`] implements [`Transport`]: the status state machine
//!   (FEATURES_OK stays set only for a subset of the offered features that the
//!   device accepts), features and configuration space from the device,
//!   [`Transport::alloc_dma`] from a `memfd` (the IOVA is the process
//!   address), [`Transport::map_memory`] of caller memory (identity IOVA), and
//!   queue set-up that builds a device model over the driver's ring.
//! * The device side reads and writes guest buffers through [`DeviceMemory`]
//!   (by IOVA, with the same atomic accesses as the driver: never a Rust
//!   reference into shared memory) and answers each [`AvailChain`] with a
//!   [`Served`] value.
//! * Two ways to run the device ([`ServiceMode`]):
//!   - [`ServiceMode::Manual`]: nothing runs until the caller calls
//!     [`LoopbackHandle::process`], which serves every available chain of every
//!     queue in the calling thread and signals a queue's completion eventfd if
//!     the ring asks for it. Deterministic and single-threaded: for unit tests
//!     that poll, and for instruction counting, where the device's work is
//!     kept out of the driver-side functions being counted.
//!   - [`ServiceMode::Threaded`]: one device thread per queue, woken by the
//!     queue's kick eventfd (with the model's race-free re-check when it
//!     re-enables kicks), for tests that block in a completion wait.
//!
//! The driver-side hot path takes no lock and allocates nothing: a kick is one
//! eventfd write (threaded) or one relaxed counter increment (manual), and the
//! completion event is the usual [`CompletionEvent`]. Locks exist only on the
//! device side (the device, the memory table, each queue's model).
//!
//! A driver that breaks the ring protocol is reported, never a panic:
//! [`LoopbackHandle::process`] returns the [`ModelError`]; in threaded mode the
//! queue's thread stops serving, the device status gets DEVICE_NEEDS_RESET and
//! [`LoopbackHandle::error`] tells what happened.
//!
//! Limits: indirect tables must lie in memory from [`Transport::alloc_dma`]
//! that exists when the queue is set up (the model is given that memory list
//! once; the queue then keeps that memory alive until it is reset); at most
//! [`MAX_CHAIN`](virtio_queue_core::device::MAX_CHAIN) buffers per chain.
//!
//! ```
//! use virtio_transport_api::loopback::{DeviceMemory, LoopbackDevice, LoopbackTransport, Served, ServiceMode};
//! use virtio_transport_api::{negotiate, Transport, VirtioFeatures};
//! use virtio_queue_core::device::AvailChain;
//!
//! /// Writes 0x5a into every device-writable byte.
//! struct Filler;
//!
//! impl LoopbackDevice for Filler {
//!     fn device_id(&self) -> u32 { 42 }
//!     fn features(&self) -> u64 { VirtioFeatures::VERSION_1.bits() }
//!     fn config(&self) -> &[u8] { &[] }
//!     fn num_queues(&self) -> u16 { 1 }
//!     fn serve(&mut self, _queue: u16, mem: &DeviceMemory<'_>, chain: &AvailChain) -> Served {
//!         let mut written = 0;
//!         for d in chain.descriptors().iter().filter(|d| d.writable) {
//!             if mem.fill(d.addr, d.len as usize, 0x5a) {
//!                 written += d.len;
//!             }
//!         }
//!         Served::Used(written)
//!     }
//! }
//!
//! let mut t = LoopbackTransport::new(Filler, ServiceMode::Manual);
//! let features = negotiate(&mut t, 0, 0).unwrap();
//! assert_eq!(features, VirtioFeatures::VERSION_1.bits());
//! let handle = t.handle();
//! assert_eq!(handle.process().unwrap(), 0, "no queue, nothing to serve");
//! ```

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue_core::device::{AvailChain, DeviceConfig, MemoryRegion, ModelError, PackedDevice, SplitDevice};
use virtio_queue_core::{RingFeatures, RingFormat, RingLayout, SharedMemory};

use crate::dma::DmaRegion;
use crate::error::{Cause, Error, Result, Step};
use crate::event::{CompletionEvent, EventFd, Notifier};
use crate::features::{DeviceStatus, VirtioFeatures};
use crate::memfd::MemFd;
use crate::transport::{QueueSetup, Transport};

/// The transport name in errors and messages.
pub const NAME: &str = "loopback";

/// The device-specific part of a loopback device, written by the device crate
/// (a RAM disk for virtio-blk, for instance).
///
/// Everything the device learns from the driver arrives through
/// [`LoopbackDevice::serve`]; everything else (features, configuration space,
/// queue limits) is a description the transport reads when the driver asks.
pub trait LoopbackDevice: Send + 'static {
    /// The virtio device ID (2 = block ...).
    fn device_id(&self) -> u32;

    /// The 64-bit feature word the device offers (include
    /// [`VirtioFeatures::VERSION_1`]; the generic negotiation requires it).
    fn features(&self) -> u64;

    /// Whether the device accepts the features the driver wrote (a subset of
    /// [`LoopbackDevice::features`]). If not, FEATURES_OK does not stick.
    fn accept_features(&mut self, features: u64) -> bool {
        let _ = features;
        true
    }

    /// The device configuration space.
    fn config(&self) -> &[u8];

    /// The configuration generation (change it when the configuration changes).
    fn config_generation(&self) -> u32 {
        0
    }

    /// Number of virtqueues.
    fn num_queues(&self) -> u16;

    /// Largest queue size the device accepts.
    fn max_queue_size(&self, queue: u16) -> u16 {
        let _ = queue;
        256
    }

    /// Serves one chain the driver made available on `queue`: reads its
    /// readable buffers and writes its writable ones through `mem`, and says
    /// what to put in the used ring. Called in ring order; the transport
    /// pushes the used entry and publishes it.
    fn serve(&mut self, queue: u16, mem: &DeviceMemory<'_>, chain: &AvailChain) -> Served;

    /// Called when the driver resets the device.
    fn reset(&mut self) {}
}

/// What the device does with a chain it served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Served {
    /// Return the chain with this many bytes written into its writable buffers.
    Used(u32),
    /// Misbehaviour, for tests of a driver's defences: return a used entry
    /// carrying `id` instead of the chain's own id (split: the head index;
    /// packed: the buffer ID), with `len` bytes written.
    UsedAs {
        /// The used id to report.
        id: u16,
        /// The written length to report.
        len: u32,
    },
}

/// How the device side runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceMode {
    /// Only when the caller calls [`LoopbackHandle::process`], in its thread.
    /// Kicks are counted ([`LoopbackHandle::kicks`]), nothing else.
    Manual,
    /// One thread per queue, woken by the queue's kick eventfd.
    Threaded,
}

/// One piece of device-visible memory: a memfd the transport allocated, or
/// caller memory registered with [`Transport::map_memory`].
struct Region {
    /// The first byte; its process address is the IOVA.
    ptr: NonNull<u8>,
    /// Process address = IOVA.
    addr: u64,
    len: usize,
    /// The memory, when the transport allocated it (freed when the last
    /// reference to the region goes); `None` for caller memory.
    owned: Option<MemFd>,
}

// SAFETY: a `Region` is an address range plus, for owned memory, the memfd
// that maps it; the pointer is only turned into atomic-access views.
unsafe impl Send for Region {}
// SAFETY: as for `Send`; nothing mutates through `&Region`.
unsafe impl Sync for Region {}

impl Region {
    /// An atomic-access view of the region.
    ///
    /// # Safety
    ///
    /// The region's memory must stay mapped while the view is used: for an
    /// owned region, keep an `Arc` of it at least as long; for caller memory,
    /// use the view only while the region is in the memory table (the
    /// contract of [`Transport::map_memory`] keeps it mapped until then).
    unsafe fn view(&self) -> Option<SharedMemory<'static>> {
        // SAFETY: forwarded caller contract; the memory is only accessed
        // atomically by this transport, and by the driver through
        // `SharedMemory` views (the contract of `DmaRegion`).
        unsafe { SharedMemory::from_raw_parts(self.ptr, self.len) }
    }

    fn contains(&self, addr: u64, len: usize) -> Option<usize> {
        let off = addr.checked_sub(self.addr)?;
        let end = off.checked_add(len as u64)?;
        (end <= self.len as u64).then_some(off as usize)
    }
}

/// The device-visible memory the transport knows, for the device to read and
/// write by device address (IOVA). Valid while the device serves a chain.
///
/// Every access is a copy made with atomic accesses
/// ([`SharedMemory::read_bytes`] and friends), so a driver touching the same
/// bytes at the same time cannot cause undefined behaviour on either side.
pub struct DeviceMemory<'a> {
    regions: &'a [Arc<Region>],
}

impl DeviceMemory<'_> {
    /// The view and offset of `len` bytes at `addr`, if one region holds them all.
    fn find(&self, addr: u64, len: usize) -> Option<(SharedMemory<'_>, usize)> {
        self.regions.iter().find_map(|r| {
            let off = r.contains(addr, len)?;
            // SAFETY: the region is in the memory table, which the caller of
            // `serve` holds locked for the life of `self`, so it stays mapped.
            let view = unsafe { r.view() }?;
            Some((view, off))
        })
    }

    /// Copies `out.len()` bytes at device address `addr` into `out`; `false`
    /// (and `out` untouched) if they are not all in one region.
    pub fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        self.find(addr, out.len()).is_some_and(|(m, off)| m.read_bytes(off, out))
    }

    /// Copies `data` to device address `addr`; `false` (and nothing written)
    /// if the bytes are not all in one region.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.find(addr, data.len()).is_some_and(|(m, off)| m.write_bytes(off, data))
    }

    /// Sets `len` bytes at device address `addr` to `value`; `false` (and
    /// nothing written) if they are not all in one region.
    pub fn fill(&self, addr: u64, len: usize, value: u8) -> bool {
        let Some((m, off)) = self.find(addr, len) else { return false };
        let block = [value; 512];
        let mut done = 0;
        while done < len {
            let n = block.len().min(len - done);
            if !m.write_bytes(off + done, block.get(..n).unwrap_or(&[])) {
                return false;
            }
            done += n;
        }
        true
    }

    /// Reads a little-endian `u32` at `addr`.
    pub fn read_u32(&self, addr: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b).then(|| u32::from_le_bytes(b))
    }

    /// Reads a little-endian `u64` at `addr`.
    pub fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b).then(|| u64::from_le_bytes(b))
    }
}

/// Why the device side stopped serving a queue: the driver broke the ring
/// protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopbackError {
    /// The queue.
    pub queue: u16,
    /// What the device model found.
    pub error: ModelError,
}

impl std::fmt::Display for LoopbackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "loopback queue {}: the driver broke the ring protocol: {}", self.queue, self.error)
    }
}

impl std::error::Error for LoopbackError {}

/// The kick of a loopback queue: an eventfd write that wakes the queue's
/// device thread ([`ServiceMode::Threaded`]), or a counter increment
/// ([`ServiceMode::Manual`]). No lock, no allocation.
#[derive(Debug)]
pub struct LoopbackNotifier {
    kind: NotifierKind,
}

#[derive(Debug)]
enum NotifierKind {
    Count(Arc<AtomicU64>),
    Event(EventFd),
}

impl Notifier for LoopbackNotifier {
    #[inline]
    fn notify(&self) -> Result<()> {
        match &self.kind {
            NotifierKind::Count(c) => {
                c.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            NotifierKind::Event(e) => e.notify(),
        }
    }
}

/// The device model of one ring format.
enum Model {
    Split(SplitDevice<'static>),
    Packed(PackedDevice<'static>),
}

impl Model {
    fn pop_avail(&mut self) -> std::result::Result<Option<AvailChain>, ModelError> {
        match self {
            Model::Split(m) => m.pop_avail(),
            Model::Packed(m) => m.pop_avail(),
        }
    }

    fn push(&mut self, chain: &AvailChain, served: Served) {
        match (self, served) {
            (Model::Split(m), Served::Used(len)) => m.push_used(u32::from(chain.id), len),
            (Model::Split(m), Served::UsedAs { id, len }) => m.push_used(u32::from(id), len),
            (Model::Packed(m), Served::Used(len)) => m.push_used(chain, len),
            (Model::Packed(m), Served::UsedAs { id, len }) => {
                let mut c = *chain;
                c.id = id;
                m.push_used(&c, len)
            }
        }
    }

    fn publish_used(&mut self) -> bool {
        match self {
            Model::Split(m) => m.publish_used(),
            Model::Packed(m) => m.publish_used(),
        }
    }

    fn disable_kicks(&mut self) {
        match self {
            Model::Split(m) => m.disable_kicks(),
            Model::Packed(m) => m.disable_kicks(),
        }
    }

    fn enable_kicks(&mut self) -> bool {
        match self {
            Model::Split(m) => m.enable_kicks(),
            Model::Packed(m) => m.enable_kicks(),
        }
    }
}

/// The device side of one queue.
struct QueueModel {
    // Field order matters: `model` points into `memory` and into the regions
    // in `keep`, so it is dropped first.
    model: Model,
    _memory: Box<[MemoryRegion<'static>]>,
    /// The regions the model's views point into, kept mapped.
    _keep: Vec<Arc<Region>>,
    index: u16,
    call: EventFd,
    /// The driver broke the protocol on this queue: it is no longer served.
    failed: Option<ModelError>,
}

/// What the transport and its handles share.
struct Shared<D> {
    device: Mutex<D>,
    /// The memory table, also held by the owner of each `DmaRegion` handed out.
    regions: Arc<Mutex<Vec<Arc<Region>>>>,
    queues: Mutex<Vec<Arc<Mutex<QueueModel>>>>,
    kicks: Arc<AtomicU64>,
    needs_reset: AtomicBool,
    error: Mutex<Option<LoopbackError>>,
}

/// Locks, ignoring poisoning (a panicking test thread must not hide the state).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<D: LoopbackDevice> Shared<D> {
    /// Serves every available chain of `q`, publishes, and signals the
    /// completion eventfd if the ring asks. Returns the chains served.
    fn serve_queue(&self, q: &mut QueueModel) -> std::result::Result<usize, LoopbackError> {
        if let Some(error) = q.failed {
            return Err(LoopbackError { queue: q.index, error });
        }
        let regions = lock(&self.regions);
        let mem = DeviceMemory { regions: &regions };
        let mut device = lock(&self.device);
        let mut served = 0;
        let result = loop {
            match q.model.pop_avail() {
                Ok(Some(chain)) => {
                    let reply = device.serve(q.index, &mem, &chain);
                    q.model.push(&chain, reply);
                    served += 1;
                }
                Ok(None) => break Ok(served),
                Err(error) => break Err(error),
            }
        };
        drop(device);
        drop(regions);
        if q.model.publish_used() {
            // A full counter (2^64 - 2 signals not consumed) cannot happen in a test.
            let _ = q.call.signal();
        }
        result.map_err(|error| {
            q.failed = Some(error);
            let e = LoopbackError { queue: q.index, error };
            self.needs_reset.store(true, Ordering::Relaxed);
            lock(&self.error).get_or_insert(e);
            e
        })
    }
}

/// A handle on the device side of a [`LoopbackTransport`]: serve the queues
/// in manual mode, look at the device, read what went wrong. `Clone` and
/// `Send`; it stays valid across resets and after the transport is dropped
/// (with no queues then).
pub struct LoopbackHandle<D> {
    shared: Arc<Shared<D>>,
}

impl<D> Clone for LoopbackHandle<D> {
    fn clone(&self) -> Self {
        LoopbackHandle { shared: self.shared.clone() }
    }
}

impl<D: LoopbackDevice> LoopbackHandle<D> {
    /// Serves every chain available on every queue set up (in queue order),
    /// publishes the used entries and signals each queue's completion eventfd
    /// if its ring asks for a notification. Returns the number of chains
    /// served, or the first protocol violation found (the other queues are
    /// still served; a queue with a violation is not served again until a
    /// reset).
    ///
    /// Meant for [`ServiceMode::Manual`]; in threaded mode it competes with
    /// the queue threads, which is allowed (each queue's model is locked) but
    /// rarely useful.
    pub fn process(&self) -> std::result::Result<usize, LoopbackError> {
        let queues = lock(&self.shared.queues).clone();
        let mut total = 0;
        let mut first_error = None;
        for q in &queues {
            match self.shared.serve_queue(&mut lock(q)) {
                Ok(n) => total += n,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// Runs `f` on the device (to look at a RAM disk, or change its behaviour
    /// between requests).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        f(&mut lock(&self.shared.device))
    }

    /// Kicks received in manual mode (threaded mode's kicks go to the threads).
    pub fn kicks(&self) -> u64 {
        self.shared.kicks.load(Ordering::Relaxed)
    }

    /// The first protocol violation the device side found since the last reset.
    pub fn error(&self) -> Option<LoopbackError> {
        *lock(&self.shared.error)
    }
}

/// The owner of a [`DmaRegion`] from [`LoopbackTransport::alloc_dma`]: removes
/// the region from the memory table when the `DmaRegion` is dropped. The memory
/// itself goes when the last queue that kept it (for indirect tables) does.
struct RegionGuard {
    regions: Arc<Mutex<Vec<Arc<Region>>>>,
    region: Arc<Region>,
}

impl Drop for RegionGuard {
    fn drop(&mut self) {
        lock(&self.regions).retain(|r| !Arc::ptr_eq(r, &self.region));
    }
}

/// A device thread of [`ServiceMode::Threaded`].
struct Worker {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// The in-process transport. See the [module documentation](self).
pub struct LoopbackTransport<D: LoopbackDevice> {
    shared: Arc<Shared<D>>,
    mode: ServiceMode,
    status: DeviceStatus,
    driver_features: u64,
    workers: Vec<Worker>,
    device_id: u32,
    num_queues: u16,
}

impl<D: LoopbackDevice> std::fmt::Debug for LoopbackTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackTransport")
            .field("mode", &self.mode)
            .field("status", &self.status)
            .field("driver_features", &format_args!("{:#x}", self.driver_features))
            .finish_non_exhaustive()
    }
}

impl<D: LoopbackDevice> LoopbackTransport<D> {
    /// A transport to `device`, in its reset state, served as `mode` says.
    pub fn new(device: D, mode: ServiceMode) -> Self {
        let device_id = device.device_id();
        let num_queues = device.num_queues();
        let shared = Arc::new(Shared {
            device: Mutex::new(device),
            regions: Arc::new(Mutex::new(Vec::new())),
            queues: Mutex::new(Vec::new()),
            kicks: Arc::new(AtomicU64::new(0)),
            needs_reset: AtomicBool::new(false),
            error: Mutex::new(None),
        });
        LoopbackTransport {
            shared,
            mode,
            status: DeviceStatus::empty(),
            driver_features: 0,
            workers: Vec::new(),
            device_id,
            num_queues,
        }
    }

    /// A handle on the device side (serve, inspect).
    pub fn handle(&self) -> LoopbackHandle<D> {
        LoopbackHandle { shared: self.shared.clone() }
    }

    /// The service mode.
    pub fn mode(&self) -> ServiceMode {
        self.mode
    }

    /// The features the driver wrote.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    fn stop_workers(&mut self) {
        for w in &self.workers {
            w.stop.store(true, Ordering::Release);
            let _ = w.wake.signal();
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        self.workers.clear();
    }

    fn err(step: Step, msg: impl Into<String>) -> Error {
        Error::new(NAME, step, Cause::InvalidArgument(msg.into()))
    }
}

impl<D: LoopbackDevice> Drop for LoopbackTransport<D> {
    fn drop(&mut self) {
        self.stop_workers();
        lock(&self.shared.queues).clear();
    }
}

/// Runs a queue's device thread until `stop`.
fn worker_loop<D: LoopbackDevice>(
    shared: Arc<Shared<D>>,
    q: Arc<Mutex<QueueModel>>,
    kick: EventFd,
    stop: Arc<AtomicBool>,
) {
    let wait = CompletionEvent::new(NAME, 0, kick);
    while !stop.load(Ordering::Acquire) {
        // Kicks so far are answered by the serving below; one after this
        // clear ends the wait.
        let cleared = wait.clear();
        {
            let mut q = lock(&q);
            loop {
                q.model.disable_kicks();
                if shared.serve_queue(&mut q).is_err() {
                    // Reported through the handle; the queue is not served again.
                    return;
                }
                if !q.model.enable_kicks() {
                    break;
                }
            }
        }
        // A stop or a kick wakes the wait; the timeout is a safety net only.
        // An eventfd that cannot be cleared cannot be slept on: the queue is
        // then looked at every millisecond instead of the thread stopping.
        match cleared {
            Ok(c) => {
                let _ = c.wait(Some(Duration::from_millis(500)));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

impl<D: LoopbackDevice> Transport for LoopbackTransport<D> {
    type Notifier = LoopbackNotifier;

    fn name(&self) -> &'static str {
        NAME
    }

    fn device_id(&self) -> u32 {
        self.device_id
    }

    fn reset(&mut self) -> Result<()> {
        self.stop_workers();
        lock(&self.shared.queues).clear();
        self.status = DeviceStatus::empty();
        self.driver_features = 0;
        self.shared.needs_reset.store(false, Ordering::Relaxed);
        *lock(&self.shared.error) = None;
        lock(&self.shared.device).reset();
        Ok(())
    }

    fn status(&mut self) -> Result<DeviceStatus> {
        let mut s = self.status;
        if self.shared.needs_reset.load(Ordering::Relaxed) {
            s |= DeviceStatus::DEVICE_NEEDS_RESET;
        }
        Ok(s)
    }

    fn set_status(&mut self, status: DeviceStatus) -> Result<()> {
        if status.is_empty() {
            return self.reset();
        }
        let mut status = status - DeviceStatus::DEVICE_NEEDS_RESET;
        if status.contains(DeviceStatus::FEATURES_OK) && !self.status.contains(DeviceStatus::FEATURES_OK) {
            let offered = lock(&self.shared.device).features();
            let ok =
                self.driver_features & !offered == 0 && lock(&self.shared.device).accept_features(self.driver_features);
            if !ok {
                status.remove(DeviceStatus::FEATURES_OK);
            }
        }
        self.status = status;
        Ok(())
    }

    fn device_features(&mut self) -> Result<u64> {
        Ok(lock(&self.shared.device).features())
    }

    fn set_driver_features(&mut self, features: u64) -> Result<()> {
        if self.status.contains(DeviceStatus::FEATURES_OK) {
            return Err(Error::new(NAME, Step::Features, Cause::Protocol("features written after FEATURES_OK".into())));
        }
        self.driver_features = features;
        Ok(())
    }

    fn config_generation(&mut self) -> Result<u32> {
        Ok(lock(&self.shared.device).config_generation())
    }

    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        let device = lock(&self.shared.device);
        let config = device.config();
        let src = (offset as usize)
            .checked_add(buf.len())
            .and_then(|end| config.get(offset as usize..end))
            .ok_or_else(|| {
                Self::err(
                    Step::Config,
                    format!("{} bytes at {offset} past the {}-byte config space", buf.len(), config.len()),
                )
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn max_queues(&self) -> u16 {
        self.num_queues
    }

    fn max_queue_size(&mut self, index: u16) -> Result<u16> {
        if index >= self.num_queues {
            return Err(Self::err(Step::Queue(index), format!("the device has {} queues", self.num_queues)));
        }
        Ok(lock(&self.shared.device).max_queue_size(index))
    }

    fn setup_queue(&mut self, index: u16, setup: &QueueSetup) -> Result<(LoopbackNotifier, CompletionEvent)> {
        let step = Step::Queue(index);
        let max = self.max_queue_size(index)?;
        if !self.status.contains(DeviceStatus::FEATURES_OK) || self.status.contains(DeviceStatus::DRIVER_OK) {
            return Err(Self::err(step, "queues are set up after FEATURES_OK and before DRIVER_OK"));
        }
        if setup.size > max {
            return Err(Self::err(step, format!("queue size {} above the maximum {max}", setup.size)));
        }
        if lock(&self.shared.queues).iter().any(|q| lock(q).index == index) {
            return Err(Self::err(step, "queue set up twice"));
        }
        let layout = RingLayout::new(setup.format, setup.size).map_err(|e| Self::err(step, format!("{e:?}")))?;
        let a = setup.addresses;
        if a.driver != a.desc + layout.driver_offset() as u64 || a.device != a.desc + layout.device_offset() as u64 {
            return Err(Error::new(
                NAME,
                step,
                Cause::Unsupported("ring areas placed other than by RingLayout".into()),
            ));
        }
        let table = lock(&self.shared.regions).clone();
        let ring_region = table
            .iter()
            .find(|r| r.owned.is_some() && r.contains(a.desc, layout.size()).is_some())
            .cloned()
            .ok_or_else(|| Self::err(step, "ring not in memory from alloc_dma"))?;
        let offset = ring_region.contains(a.desc, layout.size()).unwrap_or(0);
        // SAFETY: the region is owned (a memfd) and `keep` below holds it for
        // as long as the model that uses the view.
        let ring = unsafe { ring_region.view() }
            .and_then(|m| m.slice(offset, layout.size()))
            .ok_or_else(|| Self::err(step, "ring not 16-byte aligned"))?;
        let keep: Vec<Arc<Region>> = table.iter().filter(|r| r.owned.is_some()).cloned().collect();
        let memory: Box<[MemoryRegion<'static>]> = keep
            .iter()
            // SAFETY: owned regions, kept alive by `keep` as long as the model.
            .filter_map(|r| Some(MemoryRegion { addr: r.addr, mem: unsafe { r.view() }? }))
            .collect();
        // SAFETY: the boxed slice's heap memory neither moves nor is freed
        // while the `QueueModel` that owns it lives, and the model (the only
        // user of this reference) is dropped before it (field order).
        let memory_ref: &'static [MemoryRegion<'static>] = unsafe { &*(&*memory as *const [MemoryRegion<'static>]) };
        let features: RingFeatures = VirtioFeatures::ring_features_of(self.driver_features);
        let cfg = DeviceConfig { layout, ring, features, memory: memory_ref };
        let model = match setup.format {
            RingFormat::Split => SplitDevice::new(cfg).map(Model::Split),
            RingFormat::Packed => PackedDevice::new(cfg).map(Model::Packed),
        }
        .map_err(|e| Self::err(step, e.to_string()))?;
        let call = EventFd::new()?;
        let completion = CompletionEvent::new(NAME, index, call.try_clone().map_err(|e| Error::os(NAME, step, e))?);
        let q = Arc::new(Mutex::new(QueueModel { model, _memory: memory, _keep: keep, index, call, failed: None }));
        lock(&self.shared.queues).push(q.clone());
        let notifier = match self.mode {
            ServiceMode::Manual => LoopbackNotifier { kind: NotifierKind::Count(self.shared.kicks.clone()) },
            ServiceMode::Threaded => {
                let kick = EventFd::new()?;
                let wake = kick.try_clone().map_err(|e| Error::os(NAME, step, e))?;
                let thread_kick = kick.try_clone().map_err(|e| Error::os(NAME, step, e))?;
                let stop = Arc::new(AtomicBool::new(false));
                let (shared, thread_stop) = (self.shared.clone(), stop.clone());
                let thread = std::thread::Builder::new()
                    .name(format!("loopback-q{index}"))
                    .spawn(move || worker_loop(shared, q, thread_kick, thread_stop))
                    .map_err(|e| Error::os(NAME, step, e))?;
                self.workers.push(Worker { stop, wake, thread: Some(thread) });
                LoopbackNotifier { kind: NotifierKind::Event(kick) }
            }
        };
        Ok((notifier, completion))
    }

    fn alloc_dma(&self, len: usize) -> Result<DmaRegion> {
        let m = MemFd::new("loopback-dma", len.max(1)).map_err(|e| Error::os(NAME, Step::Memory, e))?;
        let (ptr, len) = (m.as_non_null(), m.len());
        let region = Arc::new(Region { ptr, addr: ptr.as_ptr() as u64, len, owned: Some(m) });
        lock(&self.shared.regions).push(region.clone());
        let guard = RegionGuard { regions: self.shared.regions.clone(), region };
        // SAFETY: the memfd mapping lives as long as the `Region`, which the
        // guard (the owner) holds; the IOVA is the process address, which is
        // what the device side uses.
        unsafe { DmaRegion::new(ptr, len, ptr.as_ptr() as u64, Box::new(guard)) }
            .ok_or_else(|| Self::err(Step::Memory, "memfd mapping not 64-byte aligned"))
    }

    unsafe fn map_memory(&self, addr: *mut u8, len: usize, _fd: BorrowedFd<'_>, _offset: u64) -> Result<u64> {
        let Some(ptr) = NonNull::new(addr).filter(|_| len != 0 && (addr as u64).checked_add(len as u64).is_some())
        else {
            return Err(Self::err(Step::Memory, "empty or null mapping"));
        };
        lock(&self.shared.regions).push(Arc::new(Region { ptr, addr: addr as u64, len, owned: None }));
        Ok(addr as u64)
    }

    unsafe fn unmap_memory(&self, addr: *mut u8) -> Result<()> {
        let mut table = lock(&self.shared.regions);
        let before = table.len();
        table.retain(|r| r.owned.is_some() || r.addr != addr as u64);
        let removed = table.len() != before;
        drop(table);
        if removed {
            Ok(())
        } else {
            Err(Self::err(Step::Memory, format!("{addr:p} was not mapped")))
        }
    }

    fn translate(&self, addr: *const u8, len: usize) -> Option<u64> {
        lock(&self.shared.regions).iter().find_map(|r| r.contains(addr as u64, len).map(|_| addr as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Wait;
    use crate::transport::{driver_ok, negotiate, read_config};
    use virtio_queue_core::{Buffer, DriverQueue, QueueConfig, Slot, Virtqueue};

    const V1: u64 = VirtioFeatures::VERSION_1.bits();
    const RING: u64 = VirtioFeatures::EVENT_IDX.bits()
        | VirtioFeatures::RING_PACKED.bits()
        | VirtioFeatures::INDIRECT_DESC.bits()
        | VirtioFeatures::IN_ORDER.bits();

    /// Copies the readable bytes, reversed, into the writable buffers.
    /// A chain whose first readable byte is 0xee is answered with a used id
    /// the driver never gave out.
    struct Reverser {
        config: [u8; 8],
        served: u32,
        refuse: u64,
        resets: u32,
    }

    impl Reverser {
        fn new() -> Self {
            Reverser { config: [1, 2, 3, 4, 5, 6, 7, 8], served: 0, refuse: 0, resets: 0 }
        }
    }

    impl LoopbackDevice for Reverser {
        fn device_id(&self) -> u32 {
            99
        }
        fn features(&self) -> u64 {
            V1 | RING | 1
        }
        fn accept_features(&mut self, features: u64) -> bool {
            features & self.refuse == 0
        }
        fn config(&self) -> &[u8] {
            &self.config
        }
        fn num_queues(&self) -> u16 {
            2
        }
        fn max_queue_size(&self, _queue: u16) -> u16 {
            16
        }
        fn serve(&mut self, _queue: u16, mem: &DeviceMemory<'_>, chain: &AvailChain) -> Served {
            self.served += 1;
            let mut input = Vec::new();
            for d in chain.descriptors().iter().filter(|d| !d.writable) {
                let mut b = vec![0u8; d.len as usize];
                assert!(mem.read(d.addr, &mut b), "readable buffer in device memory");
                input.extend(b);
            }
            if input.first() == Some(&0xee) {
                return Served::UsedAs { id: 15, len: 0 };
            }
            input.reverse();
            let mut at = 0;
            for d in chain.descriptors().iter().filter(|d| d.writable) {
                let n = (d.len as usize).min(input.len() - at);
                assert!(mem.write(d.addr, &input[at..at + n]));
                at += n;
            }
            Served::Used(at as u32)
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    /// A driver queue on the loopback transport, with a data region.
    struct Rig {
        // Drop order: the queue before the memory it points into.
        q: Virtqueue<'static, u32, &'static mut [Slot<u32>]>,
        notifier: LoopbackNotifier,
        done: CompletionEvent,
        data: DmaRegion,
        _ring: Box<DmaRegion>,
        t: LoopbackTransport<Reverser>,
    }

    fn rig(mode: ServiceMode, ring: u64) -> Rig {
        let mut t = LoopbackTransport::new(Reverser::new(), mode);
        let features = negotiate(&mut t, ring, 0).unwrap();
        let rf = VirtioFeatures::ring_features_of(features);
        let format = if rf.contains(RingFeatures::RING_PACKED) { RingFormat::Packed } else { RingFormat::Split };
        let layout = RingLayout::new(format, 16).unwrap();
        let ring = Box::new(t.alloc_dma(layout.size()).unwrap());
        let data = t.alloc_dma(4096).unwrap();
        // SAFETY: the queue is dropped before `_ring` (field order).
        let mem: SharedMemory<'static> = unsafe { std::mem::transmute(ring.shared_memory()) };
        let config = QueueConfig { queue_size: 16, ring: mem, ring_iova: ring.iova(), features: rf, indirect: None };
        let slots: &'static mut [Slot<u32>] = Box::leak((0..16).map(|_| Slot::new()).collect());
        let q = Virtqueue::new(config, slots).unwrap();
        let (notifier, done) = t.setup_queue(0, &QueueSetup::of(&q)).unwrap();
        driver_ok(&mut t).unwrap();
        Rig { q, notifier, done, data, _ring: ring, t }
    }

    impl Rig {
        /// Adds "abc" (readable) and a 3-byte writable buffer, publishes, kicks.
        fn submit(&mut self, token: u32, first: u8) {
            let d = self.data.shared_memory();
            assert!(d.write_bytes(0, &[first, b'b', b'c']));
            let iova = self.data.iova();
            self.q.add(&[Buffer::new(iova, 3)], &[Buffer::new(iova + 64, 3)], token).unwrap();
            if self.q.publish().unwrap() {
                self.notifier.notify().unwrap();
            }
        }

        fn answer(&self) -> [u8; 3] {
            let mut out = [0u8; 3];
            assert!(self.data.shared_memory().read_bytes(64, &mut out));
            out
        }
    }

    #[test]
    fn negotiation_status_and_config_come_from_the_device() {
        let mut t = LoopbackTransport::new(Reverser::new(), ServiceMode::Manual);
        assert_eq!(t.device_id(), 99);
        assert_eq!(t.max_queues(), 2);
        assert_eq!(t.max_queue_size(1).unwrap(), 16);
        assert!(t.max_queue_size(2).is_err());
        let f = negotiate(&mut t, VirtioFeatures::EVENT_IDX.bits(), 0).unwrap();
        assert_eq!(f, V1 | VirtioFeatures::EVENT_IDX.bits());
        assert_eq!(t.driver_features(), f);
        let c: [u8; 4] = read_config(&mut t, 4).unwrap();
        assert_eq!(c, [5, 6, 7, 8]);
        let e = read_config::<[u8; 4], _>(&mut t, 6).unwrap_err();
        assert_eq!(e.step(), Step::Config);
        // Features the device refuses: FEATURES_OK does not stick.
        t.handle().with_device(|d| d.refuse = VirtioFeatures::EVENT_IDX.bits());
        let e = negotiate(&mut t, VirtioFeatures::EVENT_IDX.bits(), 0).unwrap_err();
        assert!(matches!(e.cause(), Cause::FeaturesNotAccepted { .. }), "{e}");
        assert!(t.status().unwrap().contains(DeviceStatus::FAILED));
        assert_eq!(t.handle().with_device(|d| d.resets), 2, "negotiate resets");
        // Features never offered are refused as well.
        t.reset().unwrap();
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER).unwrap();
        t.set_driver_features(V1 | (1 << 5)).unwrap();
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK).unwrap();
        assert!(!t.status().unwrap().contains(DeviceStatus::FEATURES_OK));
    }

    #[test]
    fn manual_mode_serves_only_when_asked_split_and_packed() {
        for ring in [VirtioFeatures::EVENT_IDX.bits(), RING, 0, VirtioFeatures::RING_PACKED.bits()] {
            let mut r = rig(ServiceMode::Manual, ring);
            let h = r.t.handle();
            r.submit(7, b'a');
            assert_eq!(h.kicks(), 1, "the device asked for the first kick");
            assert!(r.q.pop_used().unwrap().is_none(), "nothing runs by itself");
            assert!(!r.done.try_consume().unwrap());
            assert_eq!(h.process().unwrap(), 1);
            assert_eq!(r.answer(), *b"cba");
            assert!(r.done.try_consume().unwrap(), "the driver asked for used-buffer notifications");
            let used = r.q.pop_used().unwrap().unwrap();
            assert_eq!((used.token, used.len), (7, 3));
            // Notifications off: served, but the eventfd stays quiet.
            r.q.disable_used_notifications();
            r.submit(8, b'x');
            assert_eq!(h.process().unwrap(), 1);
            assert!(!r.done.try_consume().unwrap());
            assert_eq!(r.q.pop_used().unwrap().unwrap().token, 8);
            assert_eq!(h.process().unwrap(), 0);
            assert_eq!(h.with_device(|d| d.served), 2);
            assert_eq!(h.error(), None);
        }
    }

    #[test]
    fn threaded_mode_answers_kicks() {
        for ring in [VirtioFeatures::EVENT_IDX.bits(), RING] {
            let mut r = rig(ServiceMode::Threaded, ring);
            for token in 0..50u32 {
                r.submit(token, b'a' + (token % 20) as u8);
                let used = loop {
                    if let Some(u) = r.q.pop_used().unwrap() {
                        break u;
                    }
                    let cleared = r.done.clear().unwrap();
                    if !r.q.enable_used_notifications().unwrap() {
                        let w = cleared.wait(Some(Duration::from_secs(10))).unwrap();
                        assert!(matches!(w, Wait::Signalled), "token {token}: no completion");
                    }
                };
                assert_eq!((used.token, used.len), (token, 3));
                assert_eq!(r.answer(), [b'c', b'b', b'a' + (token % 20) as u8]);
            }
            assert_eq!(r.t.handle().with_device(|d| d.served), 50);
            assert_eq!(r.t.handle().kicks(), 0, "threaded kicks go to the eventfd");
        }
    }

    #[test]
    fn a_hostile_reply_breaks_the_driver_queue() {
        for ring in [0, VirtioFeatures::RING_PACKED.bits()] {
            let mut r = rig(ServiceMode::Manual, ring);
            r.submit(1, 0xee);
            r.t.handle().process().unwrap();
            let e = r.q.pop_used().unwrap_err();
            assert!(matches!(e, virtio_queue_core::Error::Broken(_)), "{e:?}");
        }
    }

    #[test]
    fn a_driver_breaking_the_protocol_is_reported_not_a_panic() {
        let mut r = rig(ServiceMode::Manual, 0);
        let layout = RingLayout::split(16).unwrap();
        let ring = r._ring.shared_memory();
        // avail.idx jumps by 100 (an off-by-lots driver).
        let at = layout.driver_offset() + 2;
        assert!(ring.write_bytes(at, &100u16.to_le_bytes()));
        let e = r.t.handle().process().unwrap_err();
        assert_eq!(e.queue, 0);
        assert!(matches!(e.error, ModelError::AvailIndexJump { avail_idx: 100, .. }), "{e}");
        assert_eq!(r.t.handle().error(), Some(e));
        assert!(r.t.status().unwrap().contains(DeviceStatus::DEVICE_NEEDS_RESET));
        // The queue is not served again; a reset clears it all.
        assert!(r.t.handle().process().is_err());
        r.t.reset().unwrap();
        assert_eq!(r.t.handle().process().unwrap(), 0);
        assert_eq!(r.t.handle().error(), None);
        assert!(!r.t.status().unwrap().contains(DeviceStatus::DEVICE_NEEDS_RESET));
    }

    #[test]
    fn memory_table_follows_regions_and_mappings() {
        let t = LoopbackTransport::new(Reverser::new(), ServiceMode::Manual);
        let r = t.alloc_dma(100).unwrap();
        assert_eq!(r.iova(), r.as_ptr() as u64, "identity IOVA");
        assert_eq!(r.len(), page_size());
        assert_eq!(t.translate(r.as_ptr(), r.len()), Some(r.iova()));
        assert_eq!(t.translate(r.as_ptr(), r.len() + 1), None);
        let p = r.as_ptr();
        drop(r);
        assert_eq!(t.translate(p, 1), None, "a dropped region leaves the table");
        let m = MemFd::new("caller", 4096).unwrap();
        // SAFETY: the memfd stays mapped until it is unmapped below.
        let iova = unsafe { t.map_memory(m.as_ptr(), m.len(), m.fd(), 0) }.unwrap();
        assert_eq!(iova, m.as_ptr() as u64);
        assert_eq!(t.translate(m.as_ptr(), 4096), Some(iova));
        // SAFETY: nothing in flight.
        unsafe { t.unmap_memory(m.as_ptr()) }.unwrap();
        assert_eq!(t.translate(m.as_ptr(), 1), None);
        // SAFETY: as above.
        assert!(unsafe { t.unmap_memory(m.as_ptr()) }.is_err());
    }

    #[test]
    fn queue_setup_is_checked() {
        let mut t = LoopbackTransport::new(Reverser::new(), ServiceMode::Manual);
        let ring = t.alloc_dma(4096).unwrap();
        let layout = RingLayout::split(16).unwrap();
        let addresses = layout.addresses(ring.iova());
        let setup = QueueSetup { size: 16, format: RingFormat::Split, addresses };
        assert!(t.setup_queue(0, &setup).is_err(), "before FEATURES_OK");
        negotiate(&mut t, 0, 0).unwrap();
        assert!(t.setup_queue(0, &QueueSetup { size: 32, ..setup }).is_err(), "above the maximum");
        assert!(t.setup_queue(2, &setup).is_err(), "no such queue");
        let elsewhere = QueueSetup { addresses: layout.addresses(0x1000), ..setup };
        assert!(t.setup_queue(0, &elsewhere).is_err(), "ring not in device memory");
        t.setup_queue(0, &setup).unwrap();
        assert!(t.setup_queue(0, &setup).is_err(), "twice");
    }

    use crate::memfd::page_size;
}
