//! One request queue: submission, validation, completion.

use std::collections::VecDeque;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue_core::{
    Buffer, DriverQueue, IndirectTables, QueueConfig, RingFeatures, RingFormat, RingLayout, SharedMemory, Slot,
    SlotStorage, Used, Virtqueue,
};
use virtio_transport_api::{Cause, CompletionEvent, DmaRegion, Error, Notifier, QueueSetup, Step, Transport, Wait};

use crate::buf::DmaBuf;
use crate::config::BlkFeatures;
use crate::device::BlkOptions;
use crate::error::{BlkError, DeviceStatus, Result};
use crate::spec::{
    segment as seg_bytes, HEADER_LEN, ID_LEN, SECTOR_SIZE, SEGMENT_LEN, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH,
    T_GET_ID, T_IN, T_OUT, T_SECURE_ERASE, T_WRITE_ZEROES, WRITE_ZEROES_FLAG_UNMAP,
};

/// Preset into every status byte before submission: no device returns it.
const S_PRESET: u8 = 0xff;

/// Per-request area in device-visible memory: header, discard/write-zeroes
/// segment, status byte, ID buffer.
const AREA: usize = 64;
const A_HDR: usize = 0;
const A_SEG: usize = 16;
const A_STATUS: usize = 32;
const A_ID: usize = 40;

const SECTOR: u64 = SECTOR_SIZE;

/// What the driver checks requests against.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) capacity_bytes: u64,
    pub(crate) block_size: u32,
    pub(crate) max_segments: usize,
    pub(crate) size_max: u64,
    pub(crate) features: BlkFeatures,
    pub(crate) max_discard_sectors: u32,
    pub(crate) max_write_zeroes_sectors: u32,
    pub(crate) max_secure_erase_sectors: u32,
}

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

/// Per-request driver state (driver-private memory).
struct ReqState {
    tag: u64,
    kind: RequestKind,
    internal: bool,
    bufs: Bufs,
}

impl Default for ReqState {
    fn default() -> Self {
        ReqState { tag: 0, kind: RequestKind::Read, internal: false, bufs: Bufs::None }
    }
}

/// The data buffers of a request being enqueued.
enum Data<'a> {
    /// No data (flush, get-id, discard-like).
    None,
    /// Several caller buffers (readv, writev).
    Many(&'a [DmaBuf]),
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
    areas: SharedMemory<'static>,
    areas_iova: u64,
    bounce: SharedMemory<'static>,
    bounce_iova: u64,
    reqs: Vec<ReqState>,
    free: Vec<u16>,
    ready: VecDeque<Completion>,
    readable: Vec<Buffer>,
    writable: Vec<Buffer>,
    limits: Limits,
    notifier: T::Notifier,
    event: CompletionEvent,
    unpublished: bool,
    /// `dead` or `broken` is set: the slow path of `check_live` decides.
    failed: bool,
    dead: Option<(&'static str, String)>,
    /// The device broke the ring protocol: the queue stays unusable (the
    /// core queue was reset to hand back the requests in flight).
    broken: Option<virtio_queue_core::Error>,
    io_timeout: Option<Duration>,
    /// `wait` asks for a notification only after most of the requests in
    /// flight have completed (EVENT_IDX), instead of after the first.
    batch_completions: bool,
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

/// The error of a status byte other than OK.
#[cold]
fn status_error(status: u8) -> BlkError {
    BlkError::Device(match status {
        S_IOERR => DeviceStatus::IoErr,
        S_UNSUPP => DeviceStatus::Unsupp,
        S_PRESET => DeviceStatus::NotWritten,
        v => DeviceStatus::Other(v),
    })
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
        options: &BlkOptions,
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
        let area_len = size as usize * AREA;
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
        let vq = Virtqueue::new(config, slots).map_err(|e| bad(format!("{e:?}")))?;
        let (notifier, event) = t.setup_queue(index, &QueueSetup::of::<u16, _>(&vq))?;
        let n = size as usize;
        Ok(BlkQueue {
            vq,
            areas: slice(area_off, area_len)?,
            areas_iova: mem.iova() + area_off as u64,
            bounce: slice(bounce_off, bounce_len)?,
            bounce_iova: mem.iova() + bounce_off as u64,
            reqs: (0..n).map(|_| ReqState::default()).collect(),
            free: (0..size).rev().collect(),
            ready: VecDeque::with_capacity(n),
            readable: Vec::with_capacity(limits.max_segments + 2),
            writable: Vec::with_capacity(limits.max_segments + 2),
            limits,
            notifier,
            event,
            unpublished: false,
            failed: false,
            dead: None,
            broken: None,
            io_timeout: options.io_timeout,
            name,
            index,
            batch_completions: false,
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
    pub fn completion_event(&self) -> &CompletionEvent {
        &self.event
    }

    /// The DMA region holding the ring, request headers and bounce buffer.
    pub fn region(&self) -> &DmaRegion {
        &self.mem.region
    }

    // ---- validation -------------------------------------------------------

    #[inline]
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        // The block size is a power of two (checked at open).
        let mask = u64::from(self.limits.block_size) - 1;
        if len == 0 || (offset | len) & mask != 0 {
            return Err(BlkError::Misaligned { offset, len, block_size: self.limits.block_size });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.limits.capacity_bytes => Ok(()),
            _ => Err(BlkError::OutOfRange { offset, len, capacity: self.limits.capacity_bytes }),
        }
    }

    #[inline]
    fn check_writable(&self) -> Result<()> {
        if self.limits.features.contains(BlkFeatures::RO) {
            return Err(BlkError::ReadOnly);
        }
        Ok(())
    }

    fn check_feature(&self, f: BlkFeatures) -> Result<()> {
        if !self.limits.features.contains(f) {
            return Err(BlkError::Unsupported(f));
        }
        Ok(())
    }

    fn check_segments<'b>(&self, lens: impl ExactSizeIterator<Item = &'b DmaBuf>) -> Result<u64> {
        let n = lens.len();
        if n == 0 || n > self.limits.max_segments {
            return Err(BlkError::TooManySegments { segments: n, max: self.limits.max_segments });
        }
        let mut total = 0u64;
        for b in lens {
            let len = b.len() as u64;
            if len > self.limits.size_max {
                return Err(BlkError::SegmentTooLarge { len, max: self.limits.size_max });
            }
            total += len;
        }
        if total > u64::from(u32::MAX) - 64 {
            return Err(BlkError::SegmentTooLarge { len: total, max: u64::from(u32::MAX) - 64 });
        }
        Ok(total)
    }

    #[inline]
    fn check_live(&self) -> Result<()> {
        // A ring the device broke sets `failed` too (every queue operation
        // that can see a device error goes through `fail_all`), and the core
        // queue refuses chains on a broken ring anyway.
        if self.failed {
            return Err(self.dead_error());
        }
        Ok(())
    }

    /// Why the queue refuses requests (a dead transport or a broken ring).
    #[cold]
    #[inline(never)]
    fn dead_error(&self) -> BlkError {
        match self.check_dead() {
            Err(e) => e,
            // Not reached: `failed` is only set with `dead` or `broken`.
            Ok(()) => {
                BlkError::Transport(Error::new(self.name, Step::Queue(self.index), Cause::Protocol("failed".into())))
            }
        }
    }

    fn check_dead(&self) -> Result<()> {
        if let Some((name, msg)) = &self.dead {
            return Err(BlkError::Transport(Error::new(
                name,
                Step::Queue(self.index),
                Cause::Disconnected(msg.clone()),
            )));
        }
        if let Some(e) = self.broken {
            return Err(BlkError::Queue(e));
        }
        if let Some(e) = self.vq.broken() {
            return Err(BlkError::Queue(virtio_queue_core::Error::Broken(e)));
        }
        Ok(())
    }

    fn check_discard_like(&self, offset: u64, len: u64, feature: BlkFeatures, max_sectors: u32) -> Result<()> {
        self.check_feature(feature)?;
        self.check_writable()?;
        self.check_range(offset, len)?;
        let max = if max_sectors == 0 { u64::from(u32::MAX) } else { u64::from(max_sectors) } * SECTOR;
        if len > max.min(u64::from(u32::MAX) * SECTOR) {
            return Err(BlkError::SegmentTooLarge { len, max });
        }
        Ok(())
    }

    // ---- submission -------------------------------------------------------

    /// The next free request id, if the queue is usable and not full.
    #[inline]
    fn next_id(&self) -> Result<u16> {
        self.check_live()?;
        match self.free.last() {
            Some(&id) => Ok(id),
            None => Err(BlkError::QueueFull),
        }
    }

    /// Writes request `id`'s header and presets its status byte: three
    /// 8-byte stores into its area (the status word holds only the status
    /// byte; the ID buffer starts after it).
    #[inline]
    fn write_header(&self, id: u16, ty: u32, sector: u64) {
        let area = id as usize * AREA;
        // In bounds: `id` is below the queue size and `areas` holds one area
        // per id; if it were not, nothing would be written and the request
        // would complete as "status not written".
        self.areas.write_le_u64(area + A_HDR, u64::from(ty));
        self.areas.write_le_u64(area + A_HDR + 8, sector);
        self.areas.write_le_u64(area + A_STATUS, u64::from(S_PRESET));
    }

    /// Records a request added to the ring under `id`.
    #[inline]
    /// Its `bufs` stay `Bufs::None` (a free id's always are: completion and
    /// `fail_all` take them) until [`BlkQueue::attach`].
    fn commit(&mut self, id: u16, kind: RequestKind, tag: u64, internal: bool) {
        self.free.pop();
        if let Some(r) = self.reqs.get_mut(id as usize) {
            r.tag = tag;
            r.kind = kind;
            r.internal = internal;
        }
        self.unpublished = true;
    }

    /// Adds a read or write of one data buffer: the hot path, with the chain
    /// built on the stack.
    #[inline(always)]
    fn enqueue_one(&mut self, write: bool, sector: u64, data: Buffer, tag: u64, internal: bool) -> Result<u16> {
        let id = self.next_id()?;
        let iova = self.areas_iova + (id as usize * AREA) as u64;
        let (kind, ty) = if write { (RequestKind::Write, T_OUT) } else { (RequestKind::Read, T_IN) };
        self.write_header(id, ty, sector);
        let header = Buffer::new(iova + A_HDR as u64, HEADER_LEN as u32);
        let status = Buffer::new(iova + A_STATUS as u64, 1);
        let added = if write {
            self.vq.add(&[header, data], &[status], id)
        } else {
            self.vq.add(&[header], &[data, status], id)
        };
        added.map_err(|e| BlkError::from(e.error))?;
        self.commit(id, kind, tag, internal);
        Ok(id)
    }

    /// Adds any request: header, `data` (device-readable for a write, else
    /// device-writable), the discard-like `segment`, the ID buffer of a
    /// GET_ID and the status byte.
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &mut self,
        kind: RequestKind,
        ty: u32,
        sector: u64,
        data: Data<'_>,
        segment: Option<(u64, u32, u32)>,
        tag: u64,
        internal: bool,
    ) -> Result<u16> {
        let id = self.next_id()?;
        let area = id as usize * AREA;
        let iova = self.areas_iova + area as u64;
        self.write_header(id, ty, sector);
        let write = kind == RequestKind::Write;
        let (readable, writable) = (&mut self.readable, &mut self.writable);
        readable.clear();
        writable.clear();
        readable.push(Buffer::new(iova + A_HDR as u64, HEADER_LEN as u32));
        let dir = if write { &mut *readable } else { &mut *writable };
        match data {
            Data::None => {}
            Data::Many(bufs) => dir.extend(bufs.iter().map(|b| Buffer::new(b.iova(), b.len() as u32))),
        }
        if let Some((s, n, flags)) = segment {
            self.areas.write_bytes(area + A_SEG, &seg_bytes(s, n, flags));
            readable.push(Buffer::new(iova + A_SEG as u64, SEGMENT_LEN as u32));
        }
        if kind == RequestKind::GetId {
            writable.push(Buffer::new(iova + A_ID as u64, ID_LEN as u32));
        }
        writable.push(Buffer::new(iova + A_STATUS as u64, 1));
        let added = self.vq.add(readable, writable, id);
        added.map_err(|e| BlkError::from(e.error))?;
        self.commit(id, kind, tag, internal);
        Ok(id)
    }

    #[inline(always)]
    fn attach(&mut self, id: u16, bufs: Bufs) {
        if let Some(r) = self.reqs.get_mut(id as usize) {
            r.bufs = bufs;
        }
    }

    /// The checks of a one-buffer read or write, in the order of
    /// [`BlkQueue::check_segments`] for one segment.
    #[inline]
    fn check_one(&self, offset: u64, len: u64, write: bool) -> Result<()> {
        if write {
            self.check_writable()?;
        }
        if len > self.limits.size_max || len > u64::from(u32::MAX) - 64 {
            return Err(self.segment_too_large(len));
        }
        self.check_range(offset, len)
    }

    /// The error for one segment of `len` bytes, over `size_max` or 4 GiB.
    #[cold]
    fn segment_too_large(&self, len: u64) -> BlkError {
        let max = if len > self.limits.size_max { self.limits.size_max } else { u64::from(u32::MAX) - 64 };
        BlkError::SegmentTooLarge { len, max }
    }

    #[inline]
    fn submit_one(&mut self, offset: u64, buf: DmaBuf, tag: u64, write: bool) -> Result<(), Rejected<DmaBuf>> {
        let len = buf.len() as u64;
        if let Err(error) = self.check_one(offset, len, write) {
            return Err(Rejected { error, bufs: buf });
        }
        // `len` fits in 32 bits (checked above).
        let data = Buffer::new(buf.iova(), len as u32);
        match self.enqueue_one(write, offset / SECTOR, data, tag, false) {
            Ok(id) => {
                self.attach(id, Bufs::One(buf));
                Ok(())
            }
            Err(error) => Err(Rejected { error, bufs: buf }),
        }
    }

    fn submit_many(
        &mut self,
        offset: u64,
        bufs: Vec<DmaBuf>,
        tag: u64,
        write: bool,
    ) -> Result<(), Rejected<Vec<DmaBuf>>> {
        let checks = || -> Result<()> {
            if write {
                self.check_writable()?;
            }
            let total = self.check_segments(bufs.iter())?;
            self.check_range(offset, total)
        };
        if let Err(error) = checks() {
            return Err(Rejected { error, bufs });
        }
        let (kind, ty) = if write { (RequestKind::Write, T_OUT) } else { (RequestKind::Read, T_IN) };
        match self.enqueue(kind, ty, offset / SECTOR, Data::Many(&bufs), None, tag, false) {
            Ok(id) => {
                self.attach(id, Bufs::Many(bufs));
                Ok(())
            }
            Err(error) => Err(Rejected { error, bufs }),
        }
    }

    /// Reads `buf.len()` bytes at byte `offset` into `buf`. The buffer comes
    /// back in the [`Completion`] (or with the error if it was refused).
    #[inline]
    pub fn submit_read(&mut self, offset: u64, buf: DmaBuf, tag: u64) -> Result<(), Rejected<DmaBuf>> {
        self.submit_one(offset, buf, tag, false)
    }

    /// Writes `buf` at byte `offset`.
    #[inline]
    pub fn submit_write(&mut self, offset: u64, buf: DmaBuf, tag: u64) -> Result<(), Rejected<DmaBuf>> {
        self.submit_one(offset, buf, tag, true)
    }

    /// Reads into several buffers, in order, starting at byte `offset`.
    pub fn submit_readv(&mut self, offset: u64, bufs: Vec<DmaBuf>, tag: u64) -> Result<(), Rejected<Vec<DmaBuf>>> {
        self.submit_many(offset, bufs, tag, false)
    }

    /// Writes several buffers, in order, starting at byte `offset`.
    pub fn submit_writev(&mut self, offset: u64, bufs: Vec<DmaBuf>, tag: u64) -> Result<(), Rejected<Vec<DmaBuf>>> {
        self.submit_many(offset, bufs, tag, true)
    }

    /// Reads `len` bytes at byte `offset` into device memory at `iova`.
    ///
    /// # Safety
    ///
    /// `iova .. iova + len` must be device-visible memory (mapped with
    /// [`Transport::map_memory`] or allocated with [`Transport::alloc_dma`])
    /// that stays mapped, and is neither freed, reused nor accessed through
    /// Rust references, until the [`Completion`] with `tag` has been returned
    /// by [`BlkQueue::poll`] or [`BlkQueue::wait`]. If the queue is dropped
    /// first, until the transport is dropped or the device reset.
    pub unsafe fn submit_read_raw(&mut self, offset: u64, iova: u64, len: u32, tag: u64) -> Result<()> {
        self.submit_raw(offset, iova, len, tag, false)
    }

    /// Writes `len` bytes from device memory at `iova` to byte `offset`.
    ///
    /// # Safety
    ///
    /// As for [`BlkQueue::submit_read_raw`]; the memory must also not be
    /// written while the request is in flight.
    pub unsafe fn submit_write_raw(&mut self, offset: u64, iova: u64, len: u32, tag: u64) -> Result<()> {
        self.submit_raw(offset, iova, len, tag, true)
    }

    fn submit_raw(&mut self, offset: u64, iova: u64, len: u32, tag: u64, write: bool) -> Result<()> {
        if write {
            self.check_writable()?;
        }
        if u64::from(len) > self.limits.size_max {
            return Err(BlkError::SegmentTooLarge { len: len.into(), max: self.limits.size_max });
        }
        self.check_range(offset, len.into())?;
        self.enqueue_one(write, offset / SECTOR, Buffer::new(iova, len), tag, false).map(drop)
    }

    /// Flushes the device's write cache (VIRTIO_BLK_F_FLUSH).
    pub fn submit_flush(&mut self, tag: u64) -> Result<()> {
        self.check_feature(BlkFeatures::FLUSH)?;
        self.enqueue(RequestKind::Flush, T_FLUSH, 0, Data::None, None, tag, false).map(drop)
    }

    /// Asks for the device ID (20 bytes, in [`Completion::id`]).
    pub fn submit_get_id(&mut self, tag: u64) -> Result<()> {
        self.enqueue(RequestKind::GetId, T_GET_ID, 0, Data::None, None, tag, false).map(drop)
    }

    /// Discards `len` bytes at byte `offset` (VIRTIO_BLK_F_DISCARD).
    pub fn submit_discard(&mut self, offset: u64, len: u64, tag: u64) -> Result<()> {
        self.check_discard_like(offset, len, BlkFeatures::DISCARD, self.limits.max_discard_sectors)?;
        let seg = (offset / SECTOR, (len / SECTOR) as u32, 0);
        self.enqueue(RequestKind::Discard, T_DISCARD, 0, Data::None, Some(seg), tag, false).map(drop)
    }

    /// Writes zeroes over `len` bytes at byte `offset`, letting the device
    /// deallocate them if `unmap` (VIRTIO_BLK_F_WRITE_ZEROES).
    pub fn submit_write_zeroes(&mut self, offset: u64, len: u64, unmap: bool, tag: u64) -> Result<()> {
        self.check_discard_like(offset, len, BlkFeatures::WRITE_ZEROES, self.limits.max_write_zeroes_sectors)?;
        let seg = (offset / SECTOR, (len / SECTOR) as u32, if unmap { WRITE_ZEROES_FLAG_UNMAP } else { 0 });
        self.enqueue(RequestKind::WriteZeroes, T_WRITE_ZEROES, 0, Data::None, Some(seg), tag, false).map(drop)
    }

    /// Securely erases `len` bytes at byte `offset` (VIRTIO_BLK_F_SECURE_ERASE).
    pub fn submit_secure_erase(&mut self, offset: u64, len: u64, tag: u64) -> Result<()> {
        self.check_discard_like(offset, len, BlkFeatures::SECURE_ERASE, self.limits.max_secure_erase_sectors)?;
        let seg = (offset / SECTOR, (len / SECTOR) as u32, 0);
        self.enqueue(RequestKind::SecureErase, T_SECURE_ERASE, 0, Data::None, Some(seg), tag, false).map(drop)
    }

    /// Makes the requests submitted since the last call visible to the
    /// device, and kicks it if it asked for that.
    pub fn publish(&mut self) -> Result<()> {
        if !self.unpublished {
            return Ok(());
        }
        self.unpublished = false;
        match self.vq.publish() {
            Ok(true) => {
                self.kicks += 1;
                if let Err(e) = self.notifier.notify() {
                    let err = BlkError::Transport(e);
                    self.fail_all(&err);
                    return Err(err);
                }
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => {
                let err = BlkError::Queue(e);
                self.fail_all(&err);
                Err(err)
            }
        }
    }

    // ---- completion -------------------------------------------------------

    #[inline]
    fn complete(&mut self, used: Used<u16>) -> Completion {
        let id = used.token;
        let area = id as usize * AREA;
        // The status byte is the low byte of its little-endian word (the rest
        // of the word is padding nobody writes). Unreadable: not written.
        let status = self.areas.read_le_u64(area + A_STATUS).map_or(S_PRESET, |w| w as u8);
        let result = match status {
            S_OK => Ok(()),
            other => Err(status_error(other)),
        };
        let (tag, kind, internal, bufs) = match self.reqs.get_mut(id as usize) {
            Some(r) => (r.tag, r.kind, r.internal, std::mem::take(&mut r.bufs)),
            None => (0, RequestKind::Read, false, Bufs::None),
        };
        let id_bytes = if kind == RequestKind::GetId && result.is_ok() { Some(self.read_id(area)) } else { None };
        self.free.push(id);
        Completion { tag, kind, result, bufs, id: id_bytes, internal }
    }

    /// The device ID written into the area at `area`.
    #[cold]
    fn read_id(&self, area: usize) -> [u8; ID_LEN] {
        let mut b = [0u8; ID_LEN];
        self.areas.read_bytes(area + A_ID, &mut b);
        b
    }

    /// Completes every request in flight with (a copy of) `err`, forgetting
    /// the ring: after a broken ring or a dead transport.
    fn fail_all(&mut self, err: &BlkError) {
        match err {
            BlkError::Transport(e) if self.dead.is_none() => self.dead = Some((e.transport(), e.to_string())),
            BlkError::Queue(e) if self.broken.is_none() => self.broken = Some(*e),
            _ => {}
        }
        self.failed = self.dead.is_some() || self.broken.is_some();
        let mut ids = Vec::new();
        self.vq.reset(|id| ids.push(id));
        for id in ids {
            let r = self.reqs.get_mut(id as usize).map(std::mem::take).unwrap_or_default();
            self.free.push(id);
            let result = Err(match err {
                BlkError::Transport(e) => {
                    BlkError::Transport(Error::new(e.transport(), e.step(), Cause::Disconnected(e.to_string())))
                }
                BlkError::Queue(e) => BlkError::Queue(*e),
                other => BlkError::Transport(Error::new(
                    "virtio-blk",
                    Step::Queue(self.index),
                    Cause::Protocol(other.to_string()),
                )),
            });
            self.ready.push_back(Completion {
                tag: r.tag,
                kind: r.kind,
                result,
                bufs: r.bufs,
                id: None,
                internal: r.internal,
            });
        }
        self.unpublished = false;
    }

    /// Pops one completion from the ring (no system call), after publishing
    /// what was submitted.
    #[inline]
    fn pop_ring(&mut self) -> Option<Completion> {
        if self.unpublished {
            let _ = self.publish();
        }
        match self.vq.pop_used() {
            Ok(Some(used)) => Some(self.complete(used)),
            Ok(None) => None,
            Err(e) => self.ring_broken(e),
        }
    }

    /// The device broke the ring: fail everything in flight, return the first.
    #[cold]
    #[inline(never)]
    fn ring_broken(&mut self, e: virtio_queue_core::Error) -> Option<Completion> {
        self.fail_all(&BlkError::Queue(e));
        self.ready.pop_front()
    }

    /// The next finished request, if any, without waiting or making a system
    /// call (other than a kick for requests not yet published).
    #[inline]
    pub fn poll(&mut self) -> Option<Completion> {
        if !self.ready.is_empty() {
            return self.ready.pop_front();
        }
        self.pop_ring()
    }

    /// Makes [`BlkQueue::wait`] batch completions: with EVENT_IDX negotiated
    /// it asks the device to signal only once about three quarters of the
    /// published requests in flight have completed (at least one), instead of
    /// after the first. A deep queue then takes one wake-up for many
    /// completions (drain them with [`BlkQueue::poll`] after `wait` returns),
    /// which saves CPU per request at the price of latency for the first
    /// completions of each batch. Without EVENT_IDX it changes nothing. Off by
    /// default.
    pub fn set_batch_completions(&mut self, on: bool) {
        self.batch_completions = on;
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

    /// Waits up to `timeout` (`None`: no limit) for the next finished
    /// request. Returns `None` on timeout or when nothing is in flight. A
    /// backend that goes away completes every request in flight with a
    /// [`BlkError::Transport`] error.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Option<Completion> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(c) = self.poll() {
                self.vq.disable_used_notifications();
                return Some(c);
            }
            if self.vq.in_flight() == 0 {
                return None;
            }
            // Request a notification, then re-check: a completion that raced
            // with the request is seen here instead of being waited for.
            let armed = if self.batch_completions {
                self.vq.enable_used_notifications_delayed()
            } else {
                self.vq.enable_used_notifications()
            };
            match armed {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    self.fail_all(&BlkError::Queue(e));
                    continue;
                }
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            self.waits += 1;
            match self.event.wait(left) {
                Ok(Wait::Signalled(_)) => {}
                Ok(Wait::TimedOut) => {
                    let c = self.poll();
                    self.vq.disable_used_notifications();
                    return c;
                }
                Err(e) => self.fail_all(&BlkError::Transport(e)),
            }
        }
    }

    /// Waits for the internal (bounce-buffer) request, keeping others for `poll`.
    fn wait_internal(&mut self) -> Result<()> {
        let deadline = self.io_timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(pos) = self.ready.iter().position(|c| c.internal) {
                if let Some(c) = self.ready.remove(pos) {
                    return c.result;
                }
            }
            if let Some(c) = self.pop_ring() {
                if c.internal {
                    self.vq.disable_used_notifications();
                    return c.result;
                }
                self.ready.push_back(c);
                continue;
            }
            match self.vq.enable_used_notifications() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    self.fail_all(&BlkError::Queue(e));
                    continue;
                }
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            self.waits += 1;
            match self.event.wait(left) {
                Ok(Wait::Signalled(_)) => {}
                Ok(Wait::TimedOut) => {
                    // The ring was re-checked after the notification was
                    // requested; nothing came before the deadline.
                    let why = format!("no completion within {:?}", self.io_timeout.unwrap_or_default());
                    let e = Error::new(self.name, Step::Wait, Cause::Disconnected(why))
                        .with_context(format!("queue {}", self.index));
                    self.fail_all(&BlkError::Transport(e));
                }
                Err(e) => self.fail_all(&BlkError::Transport(e)),
            }
        }
    }

    /// Reads `buf.len()` bytes at byte `offset` through the queue's bounce
    /// buffer and waits for them. Completions of other requests that arrive
    /// meanwhile are kept for [`BlkQueue::poll`].
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let chunk = self.bounce.len();
        let mut done = 0usize;
        while done < buf.len() {
            let n = chunk.min(buf.len() - done);
            let data = Buffer::new(self.bounce_iova, n as u32);
            self.enqueue_one(false, (offset + done as u64) / SECTOR, data, 0, true)?;
            self.publish()?;
            self.wait_internal()?;
            if let Some(out) = buf.get_mut(done..done + n) {
                self.bounce.read_bytes(0, out);
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at byte `offset` through the queue's bounce buffer and
    /// waits for the device to finish.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let chunk = self.bounce.len();
        let mut done = 0usize;
        while done < buf.len() {
            let n = chunk.min(buf.len() - done);
            if let Some(src) = buf.get(done..done + n) {
                self.bounce.write_bytes(0, src);
            }
            let data = Buffer::new(self.bounce_iova, n as u32);
            self.enqueue_one(true, (offset + done as u64) / SECTOR, data, 0, true)?;
            self.publish()?;
            self.wait_internal()?;
            done += n;
        }
        Ok(())
    }

    /// Flushes and waits.
    pub fn flush(&mut self) -> Result<()> {
        self.check_feature(BlkFeatures::FLUSH)?;
        self.enqueue(RequestKind::Flush, T_FLUSH, 0, Data::None, None, 0, true)?;
        self.publish()?;
        self.wait_internal()
    }

    /// Reads the device ID and waits.
    pub fn get_id(&mut self) -> Result<[u8; ID_LEN]> {
        let id = self.enqueue(RequestKind::GetId, T_GET_ID, 0, Data::None, None, 0, true)?;
        self.publish()?;
        self.wait_internal()?;
        let mut b = [0u8; ID_LEN];
        self.areas.read_bytes(id as usize * AREA + A_ID, &mut b);
        Ok(b)
    }
}
