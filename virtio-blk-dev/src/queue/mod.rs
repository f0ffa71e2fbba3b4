//! One request queue: the [`BlkQueue`] type, its device-visible memory and
//! its per-request state. The work is split by concept:
//!
//! - [`areas`]: where each request's header, status and extra buffers live;
//! - [`validate`]: the checks a request passes before it touches the ring;
//! - [`submit`]: headers, chains, the `submit_*` calls and `publish`;
//! - [`complete`]: status bytes, `poll`, `wait`, and failing every request
//!   in flight when the ring or the transport breaks;
//! - [`blocking`]: `read_at`/`write_at`/`flush`/`get_id` through the bounce
//!   buffer.

mod areas;
mod blocking;
mod complete;
mod spin;
mod submit;
mod validate;

use std::collections::VecDeque;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue_core::{
    Buffer, DriverQueue, IndirectTables, QueueConfig, RingFeatures, RingFormat, RingLayout, SharedMemory, Slot,
    SlotStorage, Virtqueue,
};
use virtio_transport_api::{Cause, CompletionEvent, DmaRegion, Error, QueueSetup, Step, Transport};

use crate::buf::DmaBuf;
use crate::error::{BlkError, Result};
use crate::spec::ID_LEN;
use areas::RequestAreas;

use validate::FastLimits;
pub(crate) use validate::Limits;

/// Preset into every status byte before submission: no device returns it.
const S_PRESET: u8 = 0xff;

/// Set in the status word, above the status byte (all the device writes),
/// of a request whose completion always takes the slow path (GET_ID, which
/// reads the ID): the hot path then tests the whole word against 0 (status
/// OK, no mark) in one comparison. A device that writes the rest of the word
/// only sends a request down the slow path, which goes by the status byte
/// and the request's own kind.
const W_SLOW: u64 = 1 << 8;

/// The kind of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read (VIRTIO_BLK_T_IN).
    Read,
    /// Write (VIRTIO_BLK_T_OUT).
    Write,
    /// Flush (VIRTIO_BLK_T_FLUSH).
    Flush,
    /// Get the device ID (VIRTIO_BLK_T_GET_ID).
    GetId,
    /// Discard (VIRTIO_BLK_T_DISCARD).
    Discard,
    /// Write zeroes (VIRTIO_BLK_T_WRITE_ZEROES).
    WriteZeroes,
    /// Secure erase (VIRTIO_BLK_T_SECURE_ERASE).
    SecureErase,
}

/// The buffers a request carried, handed back at completion.
#[derive(Debug, Default)]
pub enum Bufs {
    /// No caller buffer (flush, discard, raw submissions ...).
    #[default]
    None,
    /// One buffer (read, write).
    One(DmaBuf),
    /// Several buffers (readv, writev).
    Many(Vec<DmaBuf>),
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The caller's tag given at submission.
    pub tag: u64,
    /// What the request was.
    pub kind: RequestKind,
    /// `Ok` if the device returned `VIRTIO_BLK_S_OK`.
    pub result: Result<()>,
    /// The caller's buffers, back in the caller's hands.
    pub bufs: Bufs,
    /// The device ID, for a successful GET_ID.
    pub id: Option<[u8; ID_LEN]>,
    /// A request of the blocking layer (`read_at` ...), never handed to the
    /// caller by `wait_internal`.
    internal: bool,
}

/// A request refused before it touched the ring, with its buffers handed back.
#[derive(Debug)]
pub struct Rejected<B> {
    /// Why.
    pub error: BlkError,
    /// The buffers given to the submission.
    pub bufs: B,
}

/// Slot storage on the heap (allocated once per queue).
struct SlotBox(Box<[Slot<u16>]>);

// SAFETY: a boxed slice never changes length.
unsafe impl SlotStorage<u16> for SlotBox {
    fn slots(&self) -> &[Slot<u16>] {
        &self.0
    }
    fn slots_mut(&mut self) -> &mut [Slot<u16>] {
        &mut self.0
    }
}

/// Driver-private state of one request id.
struct ReqState {
    tag: u64,
    /// Always `Bufs::None` while the id is free: completion and `fail_all`
    /// take the buffers out, and submission puts them in only once the
    /// chain is in the ring.
    bufs: Bufs,
    kind: RequestKind,
    internal: bool,
}

impl Default for ReqState {
    fn default() -> Self {
        ReqState { tag: 0, bufs: Bufs::None, kind: RequestKind::Read, internal: false }
    }
}

/// The state of every request id.
///
/// A request's id is the id of its chain in the core queue
/// ([`Virtqueue::next_id`], taken just before the chain is added): below the
/// queue size, and unique among the chains in flight. The core hands the id
/// back, as the chain's token, exactly once (`pop_used` or `reset`) and only
/// after checking everything the device wrote, so a device can never make the
/// driver complete a request twice or reuse an id still in flight. `state`
/// and the device-visible areas have one entry per id.
struct Requests {
    /// One entry per id: exactly the core queue's size entries (checked in
    /// `BlkQueue::new`), never resized.
    state: Box<[ReqState]>,
}

impl Requests {
    fn new(size: u16) -> Self {
        Requests { state: (0..size).map(|_| ReqState::default()).collect() }
    }

    /// The state of `id` without a bounds check, for the hot paths
    /// (`submit_one`, `submit_reads`, `Requests::complete`), which reach the
    /// request's areas unchecked under the same contract
    /// ([`RequestAreas::write_header`]).
    ///
    /// # Safety
    ///
    /// `id` must be an id of this queue's core queue: one that its
    /// `next_id` returned, or a token it handed back (every token is such an
    /// id). Those are below the queue size, which is `state.len()`.
    #[inline(always)]
    unsafe fn ring_id(&mut self, id: u16) -> &mut ReqState {
        debug_assert!(usize::from(id) < self.state.len(), "id {id} of the core queue out of range");
        // SAFETY: `id < state.len()` by the caller's promise (see above).
        unsafe { self.state.get_unchecked_mut(usize::from(id)) }
    }
}

/// One request queue of a [`crate::BlkDevice`]. `Send`: move it to the thread that uses it.
///
/// Requests are submitted with the `submit_*` methods (which add them to the
/// ring without making them visible), made visible with [`BlkQueue::publish`]
/// (one kick at most, and only if the device asks for it; [`BlkQueue::poll`]
/// and [`BlkQueue::wait`] publish too), and completed with [`BlkQueue::poll`]
/// or [`BlkQueue::wait`]. [`BlkQueue::read_at`] and [`BlkQueue::write_at`]
/// are a blocking layer on top.
pub struct BlkQueue<T: Transport> {
    // Field order matters: the queue and the views below point into `mem`,
    // which is dropped last.
    vq: Virtqueue<'static, u16, SlotBox>,
    areas: RequestAreas,
    reqs: Requests,
    fast: FastLimits,
    /// Set by every submission, cleared by `publish` (and `fail_all`).
    unpublished: bool,
    /// `dead` or `broken` is set: the slow path of `check_live` decides.
    failed: bool,
    /// Completions that did not come from the ring (`fail_all`) or that
    /// `wait_internal` set aside; `poll` returns them first.
    ready: VecDeque<Completion>,
    bounce: SharedMemory<'static>,
    bounce_iova: u64,
    readable: Vec<Buffer>,
    writable: Vec<Buffer>,
    limits: Limits,
    notifier: T::Notifier,
    event: CompletionEvent,
    dead: Option<(&'static str, String)>,
    /// The device broke the ring protocol: the queue stays unusable (the
    /// core queue was reset to hand back the requests in flight).
    broken: Option<virtio_queue_core::Error>,
    io_timeout: Option<Duration>,
    /// `wait` asks for a notification only after most of the requests in
    /// flight have completed (EVENT_IDX), instead of after the first.
    batch_completions: bool,
    /// Hybrid waiting ([`BlkQueue::set_spin_before_sleep`]), if on.
    spin: Option<spin::SpinWait>,
    /// Kicks sent (notifier writes), for [`BlkQueue::kicks`].
    kicks: u64,
    /// Sleeps on the completion eventfd, for [`BlkQueue::waits`].
    waits: u64,
    name: &'static str,
    index: u16,
    mem: Retained,
}

/// Regions the device may still be using: queues that are dropped leave
/// their memory here, and the [`crate::BlkDevice`] frees it after the
/// transport (and with it the device's use of the rings) is gone.
pub(crate) type Graveyard = Arc<Mutex<Vec<DmaRegion>>>;

/// A queue's DMA region, handed to the [`Graveyard`] instead of being freed
/// when the queue is dropped: the device was given the ring's addresses and
/// may go on reading them until it is reset, which a queue alone cannot do.
struct Retained {
    region: ManuallyDrop<DmaRegion>,
    graveyard: Graveyard,
}

impl Drop for Retained {
    fn drop(&mut self) {
        // SAFETY: `region` is taken exactly once, here, and `self` is not
        // used afterwards.
        let region = unsafe { ManuallyDrop::take(&mut self.region) };
        match self.graveyard.lock() {
            Ok(mut g) => g.push(region),
            Err(poisoned) => poisoned.into_inner().push(region),
        }
    }
}

fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

impl<T: Transport> BlkQueue<T> {
    pub(crate) fn new(
        t: &mut T,
        index: u16,
        ring: RingFeatures,
        limits: &Limits,
        options: &crate::device::BlkOptions,
        graveyard: &Graveyard,
    ) -> Result<Self> {
        let name = t.name();
        let bad = |msg: String| BlkError::Transport(Error::new(name, Step::Queue(index), Cause::InvalidArgument(msg)));
        let format = if ring.contains(RingFeatures::RING_PACKED) { RingFormat::Packed } else { RingFormat::Split };
        let mut size = options.queue_size.min(t.max_queue_size(index)?);
        if format == RingFormat::Split && size > 0 {
            size = 1u16 << (15 - size.leading_zeros());
        }
        if size < 4 {
            return Err(bad(format!("queue size {size} too small")));
        }
        let layout = RingLayout::new(format, size).map_err(|e| bad(format!("{e:?}")))?;
        let indirect = ring.contains(RingFeatures::INDIRECT_DESC);
        let entries: u16 = if indirect { (limits.max_segments + 2).min(size as usize) as u16 } else { 0 };
        let mut limits = *limits;
        let chain_max = if indirect { entries as usize } else { size as usize };
        limits.max_segments = limits.max_segments.min(chain_max - 2).max(1);

        let ring_len = round_up(layout.size(), 64);
        let ind_off = ring_len;
        let ind_len = if indirect {
            round_up(IndirectTables::bytes_needed(size, entries).ok_or_else(|| bad("indirect tables".into()))?, 64)
        } else {
            0
        };
        let area_off = ind_off + ind_len;
        let area_len = RequestAreas::bytes(size);
        let bounce_off = round_up(area_off + area_len, 4096);
        let bs = limits.block_size as usize;
        let bounce_len = (options.bounce_size / bs).max(1) * bs;
        let mem = t.alloc_dma(bounce_off + bounce_len)?;
        let base = NonNull::new(mem.as_ptr()).ok_or_else(|| bad("null DMA region".into()))?;
        // SAFETY: `mem` maps `mem.len()` bytes until it is dropped; it is moved
        // into the returned queue and is its last field, so it outlives every
        // view made here (`vq`, `areas`, `bounce`). Moving the `DmaRegion`
        // value does not move the mapping. The memory is only accessed through
        // `SharedMemory` views.
        let shared = unsafe { SharedMemory::from_raw_parts(base, mem.len()) }
            .ok_or_else(|| bad("misaligned DMA region".into()))?;
        let slice = |off: usize, len: usize| shared.slice(off, len).ok_or_else(|| bad("DMA region too small".into()));
        let tables = if indirect {
            Some(
                IndirectTables::new(slice(ind_off, ind_len)?, mem.iova() + ind_off as u64, entries)
                    .map_err(|e| bad(format!("{e:?}")))?,
            )
        } else {
            None
        };
        let config = QueueConfig {
            queue_size: size,
            ring: slice(0, ring_len)?,
            ring_iova: mem.iova(),
            features: ring,
            indirect: tables,
        };
        let slots = SlotBox((0..size).map(|_| Slot::new()).collect());
        let mut vq = Virtqueue::new(config, slots).map_err(|e| bad(format!("{e:?}")))?;
        // `Requests::ring_id` relies on one request state per id of `vq`.
        if vq.queue_size() != size {
            return Err(bad(format!("queue size {} instead of {size}", vq.queue_size())));
        }
        // One-buffer reads and writes are framed chains: header and status in
        // the request's areas.
        let areas = RequestAreas::new(slice(area_off, area_len)?, mem.iova() + area_off as u64, size)
            .ok_or_else(|| bad("request areas too small".into()))?;
        vq.set_chain_frame(areas.frame()).map_err(|e| bad(format!("{e:?}")))?;
        let (notifier, event) = t.setup_queue(index, &QueueSetup::of::<u16, _>(&vq))?;
        let n = size as usize;
        Ok(BlkQueue {
            vq,
            areas,
            reqs: Requests::new(size),
            fast: FastLimits::new(&limits),
            unpublished: false,
            failed: false,
            ready: VecDeque::with_capacity(n),
            bounce: slice(bounce_off, bounce_len)?,
            bounce_iova: mem.iova() + bounce_off as u64,
            readable: Vec::with_capacity(limits.max_segments + 2),
            writable: Vec::with_capacity(limits.max_segments + 2),
            limits,
            notifier,
            event,
            dead: None,
            broken: None,
            io_timeout: options.io_timeout,
            name,
            index,
            batch_completions: false,
            spin: None,
            kicks: 0,
            waits: 0,
            mem: Retained { region: ManuallyDrop::new(mem), graveyard: graveyard.clone() },
        })
    }

    /// The queue's index on the device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Entries in the virtqueue.
    pub fn queue_size(&self) -> u16 {
        self.vq.queue_size()
    }

    /// Puts one-buffer reads and writes straight into the ring (`true`:
    /// three descriptors each) instead of into their indirect tables
    /// (`false`, the default with INDIRECT negotiated: one descriptor each).
    ///
    /// A device reads a direct chain without the extra lookup of a table.
    /// How much that matters depends on the device: `vblk bench` against
    /// `vblk serve`, 4 KiB random reads at queue depth 32 and 128, measured
    /// 0.96–0.99× the reference driver's IOPS direct and 0.86–0.93× through
    /// tables, while qemu-storage-daemon did 0.92–0.93× direct and 0.96–0.97×
    /// through tables in poll mode (2026-12-05, `cargo xtask compare --depths
    /// 32,128 --runs 6 --runtime 1`, with and without `--vblk-arg
    /// --all-indirect`; see the crate README). The price is ring capacity: a request still goes into a table while fewer
    /// than three descriptors are free, but a full ring of direct requests
    /// holds about a third as many, so size the queue to three descriptors
    /// per request in flight (`BlkOptions::queue_size`). Without INDIRECT
    /// every request is direct and this changes nothing; requests in flight
    /// keep their layout.
    pub fn set_direct_descriptors(&mut self, on: bool) {
        // The only failure is "no tables that hold a one-buffer request",
        // where requests are direct already.
        let _ = self.vq.set_framed_chains_indirect(!on);
    }

    /// Whether one-buffer reads and writes go straight into the ring (see
    /// [`BlkQueue::set_direct_descriptors`]).
    pub fn direct_descriptors(&self) -> bool {
        !self.vq.framed_chains_indirect()
    }

    /// Split or packed.
    pub fn format(&self) -> RingFormat {
        self.vq.layout().format()
    }

    /// Requests submitted and not yet completed (including ones completed
    /// with an error and not yet returned by [`BlkQueue::poll`]).
    pub fn in_flight(&self) -> usize {
        self.vq.in_flight() as usize + self.ready.len()
    }

    /// Most data segments one request may have on this queue.
    pub fn max_segments(&self) -> usize {
        self.limits.max_segments
    }

    /// The completion event, to add to the caller's own `poll`/`epoll` set.
    /// When the back-end goes away the event is signalled too and its
    /// [`hangup`](CompletionEvent::hangup) flag is raised; a
    /// [`BlkQueue::wait`] then completes everything in flight with errors.
    pub fn completion_event(&self) -> &CompletionEvent {
        &self.event
    }

    /// The DMA region holding the ring, request headers and bounce buffer.
    pub fn region(&self) -> &DmaRegion {
        &self.mem.region
    }

    /// Kicks sent to the device so far (each one a notifier write, made only
    /// when the device asked for it). For benchmarks and diagnostics.
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// Times [`BlkQueue::wait`] and the blocking helpers slept on the
    /// completion eventfd (each a `poll(2)` and, once signalled, a `read`).
    /// For benchmarks and diagnostics.
    pub fn waits(&self) -> u64 {
        self.waits
    }
}
