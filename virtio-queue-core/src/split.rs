//! The driver side of a split virtqueue (virtio 1.2 §2.7).
//!
//! Ownership of ring memory moves between driver and device through two
//! indices. The driver writes descriptors and available-ring entries, then
//! publishes them with one release store of `avail.idx`
//! ([`SplitQueue::publish`]); the device writes used elements and publishes
//! them with a release store of `used.idx`, which the driver reads with
//! acquire ([`SplitQueue::pop_used`]). Everything else (descriptors, ring
//! entries, used elements) is data ordered by those two stores.
//!
//! The descriptor free list is driver-private ([`crate::Slot`]), never the
//! descriptors' `next` fields, so a device scribbling on the table cannot make
//! the driver hand one descriptor to two chains.

use crate::error::{AddError, DeviceError, Error};
use crate::frame::{ChainFrame, Frame, FramedPaths};
use crate::layout::{off, AvailFlags, DescFlags, LayoutError, RingFeatures, RingFormat, RingLayout, UsedFlags};
use crate::notify::{need_event, UsedDelay};
use crate::shared::{fence_store_before_load, Ordering, SharedMemory};
use crate::slots::{check_chain, FreedBatch, IndirectTables, Slot, SlotStorage, SlotTable};
use crate::{Buffer, QueueAddresses, Used, UsedIdHint};

/// Everything a queue is built from except its slots.
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig<'a> {
    /// Entries in the queue.
    pub queue_size: u16,
    /// The ring area, at least [`RingLayout::size`] bytes.
    pub ring: SharedMemory<'a>,
    /// Device address of the ring area's first byte (16-byte aligned).
    pub ring_iova: u64,
    /// Negotiated features; only the [`RingFeatures`] bits matter here.
    pub features: RingFeatures,
    /// Indirect tables, used when `features` has INDIRECT_DESC.
    pub indirect: Option<IndirectTables<'a>>,
}

impl<'a> QueueConfig<'a> {
    /// Checks the configuration against the layout of `format`. Without
    /// INDIRECT_DESC the tables returned have no entries.
    pub(crate) fn layout(&self, format: RingFormat) -> Result<(RingLayout, IndirectTables<'a>), LayoutError> {
        let layout = RingLayout::new(format, self.queue_size)?;
        if self.ring.len() < layout.size() {
            return Err(LayoutError::AreaTooSmall { needed: layout.size(), given: self.ring.len() });
        }
        if self.ring_iova % crate::layout::DESC_ALIGN != 0 || self.ring_iova.checked_add(layout.size() as u64).is_none()
        {
            return Err(LayoutError::MisalignedAddress { addr: self.ring_iova, align: crate::layout::DESC_ALIGN });
        }
        match self.indirect {
            Some(t) if self.features.contains(RingFeatures::INDIRECT_DESC) => {
                t.check(self.queue_size)?;
                Ok((layout, t))
            }
            _ => Ok((layout, IndirectTables::none())),
        }
    }
}

/// Used-buffer notification state the driver last wrote, to skip redundant stores.
#[derive(Clone, Copy, PartialEq, Eq)]
enum UsedNotify {
    Enabled,
    Disabled,
}

/// IN_ORDER: chains of a used batch still to hand out.
#[derive(Clone, Copy, Default)]
struct InOrderBatch {
    remaining: u16,
    /// The used length the device reported for the batch's last chain.
    last_len: u32,
}

/// Driver side of a split virtqueue over caller-provided memory.
///
/// `T` is the caller's per-chain token, returned by [`pop_used`](Self::pop_used).
/// `S` holds the [`Slot`]s: `&mut [Slot<T>]` (the default) or, for callers
/// without a heap, an owned `[Slot<T>; N]` ([`OwnedSplitQueue`]).
pub struct SplitQueue<'a, T, S: SlotStorage<T> = &'a mut [Slot<T>]> {
    ring: SharedMemory<'a>,
    layout: RingLayout,
    iova: u64,
    slots: SlotTable<T, S, true>,
    /// Indirect tables; without INDIRECT_DESC they have no entries.
    indirect: IndirectTables<'a>,
    mask: u16,
    event_idx: bool,
    in_order: bool,
    /// Offsets of the ring parts, precomputed from the layout.
    used_event: usize,
    avail_event: usize,
    /// The driver (available ring) and device (used ring) areas, as windows
    /// of their own so the per-request accesses need no area offset.
    avail: SharedMemory<'a>,
    used: SharedMemory<'a>,
    /// Chains added, and chains published, over the queue's life. Every chain
    /// takes one available-ring entry, so their low 16 bits are the next
    /// `avail.idx` to fill and the `avail.idx` the device can see; `added -
    /// last_used` chains are in flight, `published - last_used` of them
    /// published. They are also the slots' publication counter: a chain's
    /// stamp is `added` after its add, published once `published` reaches it
    /// (64 bits, so a chain the device holds for any number of later
    /// submissions still compares right).
    added: u64,
    published: u64,
    /// Free-running index of the next used element to read.
    last_used: u16,
    /// The last `used.idx` read (and checked); entries before it are ready.
    /// Kept equal to `last_used` while the queue is broken and in IN_ORDER
    /// mode, so `used_seen != last_used` alone admits the fast path of
    /// [`pop_used`](SplitQueue::pop_used).
    used_seen: u16,
    batch: InOrderBatch,
    used_notify: UsedNotify,
    broken: Option<DeviceError>,
    /// The framed fast paths: the layout chosen (see
    /// [`set_framed_chains_indirect`](SplitQueue::set_framed_chains_indirect)) and
    /// each path's bound.
    framed: FramedPaths,
    /// Where framed chains keep their header and status ([`Frame::NONE`]
    /// until [`set_chain_frame`](SplitQueue::set_chain_frame)).
    frame: Frame,
    /// `added` minus this is the frame epoch (see `frame_epoch`), which
    /// changes whenever descriptors may have been written other than by
    /// [`add_framed`](SplitQueue::add_framed): every successful `add` moves
    /// `added` and so the epoch, at no cost of its own; a framed chain moves
    /// both; `reset` and frame changes move this.
    frame_offset: u64,
}

/// Where `publish` starts the frame epoch over (at 1, with every slot's
/// epoch cleared), so that it never wraps: between two publishes it moves at
/// most once per descriptor (a chain added holds its descriptors until it is
/// published and used), plus once per frame change, which checks too.
const FRAME_EPOCH_RESTART: u32 = 1 << 31;

/// What `check_and_write` wrote: a chain in the head's indirect table, or
/// in `descs` free descriptors `head ..= last`; and its writable bytes.
enum Written {
    Indirect { head: u16, writable: u32 },
    Direct { head: u16, last: u16, descs: u16, writable: u32 },
}

/// A split queue that owns its `N` slots (no heap needed).
pub type OwnedSplitQueue<'a, T, const N: usize> = SplitQueue<'a, T, [Slot<T>; N]>;

impl<'a, T, S: SlotStorage<T>> SplitQueue<'a, T, S> {
    /// Builds a queue and zeroes its ring area. `slots` must hold at least
    /// `config.queue_size` slots.
    pub fn new(config: QueueConfig<'a>, slots: S) -> Result<Self, LayoutError> {
        let (layout, indirect) = config.layout(RingFormat::Split)?;
        let n = config.queue_size as usize;
        let in_order = config.features.contains(RingFeatures::IN_ORDER);
        let slots = SlotTable::new(slots, config.queue_size, in_order)?;
        let ring = config.ring;
        if let Some(r) = ring.slice(0, layout.size()) {
            r.zero();
        }
        // Both areas lie inside the ring (checked by `config.layout`) and
        // start on 64-byte boundaries, so neither slice fails.
        let too_small = LayoutError::AreaTooSmall { needed: layout.size(), given: ring.len() };
        let avail = ring.slice(layout.driver_offset(), layout.driver_size()).ok_or(too_small)?;
        let used = ring.slice(layout.device_offset(), layout.device_size()).ok_or(too_small)?;
        Ok(SplitQueue {
            ring,
            layout,
            iova: config.ring_iova,
            slots,
            indirect,
            mask: config.queue_size - 1,
            event_idx: config.features.contains(RingFeatures::EVENT_IDX),
            in_order,
            used_event: layout.driver_offset() + off::AVAIL_RING + 2 * n,
            avail_event: layout.device_offset() + off::USED_RING + off::USED_ELEM_SIZE * n,
            avail,
            used,
            added: 0,
            published: 0,
            last_used: 0,
            used_seen: 0,
            batch: InOrderBatch::default(),
            used_notify: UsedNotify::Enabled,
            broken: None,
            frame: Frame::NONE,
            framed: FramedPaths::new(indirect.entries()),
            // Epoch 1 (`added` is 0).
            frame_offset: u64::MAX,
        })
    }

    /// The layout of the ring area.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Device addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> QueueAddresses {
        self.layout.addresses(self.iova)
    }

    /// Entries in the queue.
    pub fn queue_size(&self) -> u16 {
        self.layout.queue_size()
    }

    /// The id the next chain [`add`](Self::add)ed will have: the index of
    /// its head descriptor, below the queue size and different from the id of
    /// every chain in flight; `None` when no descriptor is free (an `add`
    /// would fail). The next `add` takes exactly this id, so a device crate
    /// can place per-chain memory (a request header, a status byte) by it
    /// before adding the chain. A read of two fields: nothing on the `add`
    /// path changes.
    #[inline(always)]
    pub fn next_id(&self) -> Option<u16> {
        if self.slots.num_free() == 0 {
            None
        } else {
            Some(self.slots.free_head())
        }
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> u16 {
        self.slots.num_free()
    }

    /// Chains added and not yet completed.
    pub fn in_flight(&self) -> u16 {
        (self.added as u16).wrapping_sub(self.last_used)
    }

    /// Published chains not yet completed: what the device may return.
    #[inline(always)]
    fn published_in_flight(&self) -> u16 {
        (self.published as u16).wrapping_sub(self.last_used)
    }

    /// The device error that broke the queue, if any.
    pub fn broken(&self) -> Option<DeviceError> {
        self.broken
    }

    /// Most buffers one chain may have.
    pub fn max_chain_buffers(&self) -> usize {
        (self.queue_size() as usize).max(self.indirect.entries() as usize)
    }

    #[inline(always)]
    fn check_broken(&self) -> Result<(), Error> {
        match self.broken {
            None => Ok(()),
            Some(e) => Err(Error::Broken(e)),
        }
    }

    #[cold]
    fn no_room(&self, n: usize) -> Error {
        if n > self.queue_size() as usize {
            Error::TooManyBuffers { buffers: n, max: self.max_chain_buffers() }
        } else {
            Error::QueueFull
        }
    }

    /// Breaks the queue. `used_seen = last_used` closes the fast path of
    /// `pop_used`, which therefore need not check `broken` itself.
    #[cold]
    fn fail(&mut self, e: DeviceError) -> Error {
        self.broken = Some(e);
        self.used_seen = self.last_used;
        self.framed.close();
        Error::Broken(e)
    }

    /// Adds a chain of `readable` then `writable` buffers, not yet visible to
    /// the device (see [`publish`](Self::publish)). With indirect tables, a
    /// chain of 2 or more buffers that fits its table takes one descriptor.
    ///
    /// On error nothing changed and the token comes back in the [`AddError`].
    #[inline]
    pub fn add(&mut self, readable: &[Buffer], writable: &[Buffer], token: T) -> Result<(), AddError<T>> {
        match self.check_and_write(readable, writable) {
            // The chain may have overwritten descriptors of framed chains:
            // `push_avail` moves `added`, and with it the frame epoch.
            Ok(Written::Indirect { head, writable }) => {
                self.push_avail(head, head, 1, writable, token);
                Ok(())
            }
            Ok(Written::Direct { head, last, descs, writable }) => {
                self.push_avail(head, last, descs, writable, token);
                Ok(())
            }
            Err(error) => Err(AddError { error, token }),
        }
    }

    /// Checks the chain, then writes it into free descriptors (or its slot's
    /// indirect table) and the next available-ring entry, and advances
    /// counts it. Everything is checked before anything is written, though
    /// writing free descriptors and an entry beyond `avail.idx` would be
    /// invisible to a correct device anyway.
    #[inline(always)]
    fn check_and_write(&mut self, readable: &[Buffer], writable: &[Buffer]) -> Result<Written, Error> {
        self.check_broken()?;
        let n = readable.len() + writable.len();
        // The chain's last buffer is written without NEXT; every other one
        // links to the next descriptor.
        let (last_buf, last_flags, rest_r, rest_w) = match writable.split_last() {
            Some((l, w)) => (l, DescFlags::WRITE.bits(), readable, w),
            None => match readable.split_last() {
                Some((l, r)) => (l, 0, r, &[][..]),
                None => return Err(Error::EmptyChain),
            },
        };
        let head = self.slots.free_head();
        if n > 1 && n <= self.indirect.entries() as usize {
            if self.slots.num_free() == 0 {
                return Err(Error::QueueFull);
            }
            let writable_len = check_chain(readable, writable)?;
            let t = self.indirect;
            let (toff, tiova) = t.table(head);
            let mem = t.mem();
            let mut at = toff;
            let mut i: u16 = 1;
            for b in rest_r {
                // SAFETY: `head < size` (index invariant) and fewer than
                // `entries` descriptors, inside the tables `check` measured.
                unsafe { write_desc_at(mem, at, b.addr, b.len, DescFlags::NEXT.bits(), i) };
                at += off::DESC_SIZE;
                i += 1;
            }
            for b in rest_w {
                // SAFETY: as above.
                unsafe { write_desc_at(mem, at, b.addr, b.len, (DescFlags::NEXT | DescFlags::WRITE).bits(), i) };
                at += off::DESC_SIZE;
                i += 1;
            }
            // SAFETY: as above: entry `n - 1 < entries` of the table.
            unsafe { write_desc_at(mem, at, last_buf.addr, last_buf.len, last_flags, 0) };
            // SAFETY: `head < size`, inside the descriptor table.
            unsafe { write_desc(&self.ring, head, tiova, (n * off::DESC_SIZE) as u32, DescFlags::INDIRECT.bits(), 0) };
            return Ok(Written::Indirect { head, writable: writable_len });
        }
        if n > self.slots.num_free() as usize {
            return Err(self.no_room(n));
        }
        let writable_len = check_chain(readable, writable)?;
        let ring = self.ring;
        let mut id = head;
        for b in rest_r {
            let next = self.slots.next_free(id);
            // SAFETY: `id` comes from the free list (index invariant), below size.
            unsafe { write_desc(&ring, id, b.addr, b.len, DescFlags::NEXT.bits(), next) };
            id = next;
        }
        for b in rest_w {
            let next = self.slots.next_free(id);
            // SAFETY: as above.
            unsafe { write_desc(&ring, id, b.addr, b.len, (DescFlags::NEXT | DescFlags::WRITE).bits(), next) };
            id = next;
        }
        // SAFETY: as above.
        unsafe { write_desc(&ring, id, last_buf.addr, last_buf.len, last_flags, 0) };
        Ok(Written::Direct { head, last: id, descs: n as u16, writable: writable_len })
    }

    /// Puts chain `head` (last descriptor `last`) into the next available-ring
    /// entry, invisible until `publish`, counts it in `added` and commits the
    /// chain's slots. The chain is published once `published` reaches the new
    /// `added`: that is its stamp.
    #[inline(always)]
    fn push_avail(&mut self, head: u16, last: u16, ring_descs: u16, writable: u32, token: T) {
        let slot = (self.added as u16 & self.mask) as usize;
        // SAFETY: `slot < size`, inside the available ring.
        unsafe { self.avail.write_u16(off::AVAIL_RING + 2 * slot, head) };
        let stamp = self.added + 1;
        self.added = stamp;
        let after = self.slots.next_free(last);
        self.slots.commit(head, last, after, ring_descs, token, writable, stamp);
    }

    /// Sets where framed chains ([`add_framed`](Self::add_framed)) keep their
    /// header and status. Checked against the queue size; may be called again
    /// (chains in flight keep the ends they were added with).
    pub fn set_chain_frame(&mut self, frame: ChainFrame) -> Result<(), LayoutError> {
        self.frame = Frame::new(frame, self.queue_size())?;
        self.frame_offset = self.frame_offset.wrapping_sub(1);
        if self.frame_epoch() >= FRAME_EPOCH_RESTART {
            self.restart_frame_epoch();
        }
        self.open_framed();
        Ok(())
    }

    /// The frame epoch: `added - frame_offset`, kept between 1 and
    /// [`FRAME_EPOCH_RESTART`] by `publish` and `set_chain_frame`.
    #[inline(always)]
    fn frame_epoch(&self) -> u32 {
        self.added.wrapping_sub(self.frame_offset) as u32
    }

    /// Starts the frame epoch over at 1 with every slot's epoch cleared: no
    /// framed chain's descriptors count as written any more.
    #[cold]
    #[inline(never)]
    fn restart_frame_epoch(&mut self) {
        self.slots.clear_frame_epochs();
        self.frame_offset = self.added.wrapping_sub(1);
    }

    /// Opens the framed fast path of the chosen layout (see [`FramedPaths`]).
    fn open_framed(&mut self) {
        self.framed.open(&self.frame, self.broken.is_some());
    }

    /// Whether framed chains go into indirect tables (one ring descriptor
    /// each) rather than straight into the ring (three): by default when the
    /// queue has tables of three or more entries (see
    /// [`set_framed_chains_indirect`](Self::set_framed_chains_indirect)).
    #[inline(always)]
    pub fn framed_chains_indirect(&self) -> bool {
        self.framed.in_tables
    }

    /// Chooses where framed chains go on a queue with indirect tables of
    /// three or more entries: into their id's table (`true`, the default: one
    /// ring descriptor each, so the ring holds as many framed chains as it has
    /// entries) or straight into the ring (`false`: three descriptors each, which
    /// a device reads without the extra lookup of a table; a framed chain
    /// goes into a table only while fewer than three descriptors are free, so the
    /// ring then holds about a third as many). `true` on a queue without such
    /// tables fails with [`LayoutError::IndirectTablesTooSmall`]. May be
    /// called at any time; chains in flight keep their layout.
    pub fn set_framed_chains_indirect(&mut self, on: bool) -> Result<(), LayoutError> {
        self.framed.choose(on, self.indirect.entries())?;
        // A slot's frame epoch means "this layout's fixed parts are in place":
        // a new layout starts a new epoch.
        self.frame_offset = self.frame_offset.wrapping_sub(1);
        if self.frame_epoch() >= FRAME_EPOCH_RESTART {
            self.restart_frame_epoch();
        }
        self.open_framed();
        Ok(())
    }

    /// Adds the framed chain of the id [`next_id`](Self::next_id) names: that
    /// id's header (device-readable), `data` (device-writable if
    /// `data_writable`) and that id's status (device-writable), as set with
    /// [`set_chain_frame`](Self::set_chain_frame). The same chain as
    /// [`add`](Self::add) with those three buffers, with the same errors
    /// (and [`Error::NoChainFrame`] without a frame), but cheaper. It takes
    /// one ring descriptor and its head's indirect table while
    /// [`framed_chains_indirect`](Self::framed_chains_indirect), as `add`
    /// would; else three descriptors straight in the ring, or, while fewer
    /// than three are free, a table as `add` would.
    ///
    /// # Frame invariant
    ///
    /// A framed chain records the current frame epoch in its head's slot when
    /// it writes the chain's fixed parts, and finds them still in place while
    /// that epoch holds. Everything that can write descriptors or tables
    /// otherwise changes the epoch (`add`, `reset`, `set_chain_frame`).
    ///
    /// *Direct* (three descriptors): the chain takes the three descriptors at
    /// the head of the free list, `head`, `mid` and `last`, like `add` would,
    /// writes the header into `head` (linked to `mid`), the status into
    /// `last`, and records `last` and the run's length in `head`'s slot. When
    /// the chain completes, its run goes back onto the free list whole (`head`
    /// first, links inside the run untouched), and nothing but an add takes a
    /// free descriptor. So while the epoch has not changed and `head` is free
    /// with that epoch recorded, `head`, `next_free(head)` and
    /// `next_free(next_free(head))` still hold that frame, and `head`'s slot
    /// its `last` and length (only a commit on `head` changes them): a framed
    /// chain on `head` then writes only `mid`, the data descriptor. The framed
    /// slow path clears the epoch of the `mid` and `last` it overwrites (a run
    /// that could hold one of them after its own head is one with `head` or
    /// `mid` as its head).
    ///
    /// *Indirect* (one descriptor): the chain takes `head` alone, which points
    /// at `head`'s table, whose entries 0 and 2 are the header (linked to 1)
    /// and the status. Only `add` writes a table or a free descriptor, so
    /// while the epoch holds a framed chain on `head` writes only table entry
    /// 1, the data.
    ///
    /// A device that writes the descriptor table or the indirect tables
    /// (which it must not do, §2.7.5) can only garble its own view of later
    /// framed chains, never the driver's state: the driver reads nothing back
    /// from either.
    #[inline]
    pub fn add_framed(&mut self, data: Buffer, data_writable: bool, token: T) -> Result<(), AddError<T>> {
        if self.framed.indirect != 0 {
            self.add_framed_indirect(data, data_writable, token)
        } else {
            self.add_framed_direct(data, data_writable, token)
        }
    }

    /// [`add_framed`](Self::add_framed) for a caller that knows the queue
    /// puts framed chains in the ring (see
    /// [`framed_chains_indirect`](Self::framed_chains_indirect)), to decide
    /// that once for many chains: on a queue with indirect tables the chain
    /// still goes into one, only more slowly.
    #[inline(always)]
    pub fn add_framed_direct(&mut self, data: Buffer, data_writable: bool, token: T) -> Result<(), AddError<T>> {
        if !((data.len.wrapping_sub(1) < self.framed.direct) & (self.slots.num_free() >= 3)) {
            return self.add_framed_slow(data, data_writable, token);
        }
        let head = self.slots.free_head();
        let mid = self.slots.next_free(head);
        let last = self.slots.next_free(mid);
        if self.slots.frame_epoch(head) != self.frame_epoch() {
            self.write_frame(head, mid, last);
        }
        let flags = if data_writable { (DescFlags::NEXT | DescFlags::WRITE).bits() } else { DescFlags::NEXT.bits() };
        // SAFETY: `mid` comes from the free list (index invariant), below size.
        unsafe { write_desc(&self.ring, mid, data.addr, data.len, flags, last) };
        let after = self.slots.next_free(last);
        self.push_framed(head, after, 3, self.frame.writable(&data, data_writable), token);
        Ok(())
    }

    /// [`add_framed`](Self::add_framed) for a caller that knows the queue
    /// puts framed chains in indirect tables (see
    /// [`framed_chains_indirect`](Self::framed_chains_indirect)), to decide
    /// that once for many chains: on a queue without such tables the chain
    /// still goes into the ring, only more slowly.
    #[inline(always)]
    pub fn add_framed_indirect(&mut self, data: Buffer, data_writable: bool, token: T) -> Result<(), AddError<T>> {
        if !((data.len.wrapping_sub(1) < self.framed.indirect) & (self.slots.num_free() >= 1)) {
            return self.add_framed_slow(data, data_writable, token);
        }
        let head = self.slots.free_head();
        if self.slots.frame_epoch(head) != self.frame_epoch() {
            self.write_frame_indirect(head);
        }
        let flags = if data_writable { (DescFlags::NEXT | DescFlags::WRITE).bits() } else { DescFlags::NEXT.bits() };
        let (toff, _) = self.indirect.table(head);
        // SAFETY: `head < size` (index invariant) and entry 1 of a table of at
        // least three (the indirect path opens only with such tables),
        // inside the tables `check` measured.
        unsafe { write_desc_at(self.indirect.mem(), toff + off::DESC_SIZE, data.addr, data.len, flags, 2) };
        let after = self.slots.next_free(head);
        self.push_framed(head, after, 1, self.frame.writable(&data, data_writable), token);
        Ok(())
    }

    /// The end of a framed add: `push_avail` without the run's `last` and
    /// length, which `write_frame` recorded in the head's slot.
    #[inline(always)]
    fn push_framed(&mut self, head: u16, after: u16, descs: u16, writable: u32, token: T) {
        let slot = (self.added as u16 & self.mask) as usize;
        // SAFETY: `slot < size`, inside the available ring.
        unsafe { self.avail.write_u16(off::AVAIL_RING + 2 * slot, head) };
        let stamp = self.added + 1;
        self.added = stamp;
        // A framed chain leaves the frame epoch as it was.
        self.frame_offset = self.frame_offset.wrapping_add(1);
        self.slots.commit_run(head, after, descs, token, writable, stamp);
    }

    /// Writes the fixed ends of a direct framed chain on `head ..= last` and
    /// records them (see the frame invariant at [`add_framed`](Self::add_framed)).
    #[cold]
    #[inline(never)]
    fn write_frame(&mut self, head: u16, mid: u16, last: u16) {
        let (h, s) = (self.frame.header(head), self.frame.status(head));
        // SAFETY: `head` and `last` come from the free list (index invariant), below size.
        unsafe {
            write_desc(&self.ring, head, h.addr, h.len, DescFlags::NEXT.bits(), mid);
            write_desc(&self.ring, last, s.addr, s.len, DescFlags::WRITE.bits(), 0);
        }
        self.slots.set_frame_epoch(mid, 0);
        self.slots.set_frame_epoch(last, 0);
        self.slots.set_frame_epoch(head, self.frame_epoch());
        self.slots.set_run(head, last, 3);
    }

    /// Writes the fixed parts of an indirect framed chain on `head`: the ring
    /// descriptor pointing at `head`'s table, and the table's header and status
    /// entries; and records them (see the frame invariant at
    /// [`add_framed`](Self::add_framed)). Only called with tables of at least
    /// three entries.
    #[cold]
    #[inline(never)]
    fn write_frame_indirect(&mut self, head: u16) {
        let (h, s) = (self.frame.header(head), self.frame.status(head));
        let (toff, tiova) = self.indirect.table(head);
        let mem = self.indirect.mem();
        // SAFETY: `head` comes from the free list (index invariant), below
        // size; entries 0 and 2 lie in its table of at least three, inside the
        // tables `check` measured.
        unsafe {
            write_desc_at(mem, toff, h.addr, h.len, DescFlags::NEXT.bits(), 1);
            write_desc_at(mem, toff + 2 * off::DESC_SIZE, s.addr, s.len, DescFlags::WRITE.bits(), 0);
            write_desc(&self.ring, head, tiova, 3 * off::DESC_SIZE as u32, DescFlags::INDIRECT.bits(), 0);
        }
        self.slots.set_frame_epoch(head, self.frame_epoch());
        self.slots.set_run(head, head, 1);
    }

    /// [`add_framed`](Self::add_framed) through `add`: no frame, a refused
    /// chain, too few free descriptors, or a broken queue.
    #[cold]
    #[inline(never)]
    fn add_framed_slow(&mut self, data: Buffer, data_writable: bool, token: T) -> Result<(), AddError<T>> {
        if !self.frame.is_set() {
            return Err(AddError { error: Error::NoChainFrame, token });
        }
        // With no free descriptor `free_head` names none; `add` then fails
        // before using the buffers.
        let id = self.slots.free_head();
        let (h, s) = (self.frame.header(id), self.frame.status(id));
        if data_writable {
            self.add(&[h], &[data, s], token)
        } else {
            self.add(&[h, data], &[s], token)
        }
    }

    /// Makes every chain added since the last call visible to the device with
    /// one release store of `avail.idx`, and says whether the device must be
    /// notified: EVENT_IDX's `avail_event` fell inside the published batch, or
    /// (without EVENT_IDX) the device did not set `VIRTQ_USED_F_NO_NOTIFY`.
    #[inline]
    pub fn publish(&mut self) -> Result<bool, Error> {
        self.check_broken()?;
        if self.added == self.published {
            return Ok(false);
        }
        let new = self.added as u16;
        let old = self.published as u16;
        // Release: descriptors and ring entries written before are visible
        // to a device that acquires this index.
        // SAFETY: the avail header is inside the checked layout.
        unsafe { self.ring.store_u16(self.layout.driver_offset() + off::AVAIL_IDX, new, Ordering::Release) };
        self.published = self.added;
        if self.frame_epoch() >= FRAME_EPOCH_RESTART {
            self.restart_frame_epoch();
        }
        fence_store_before_load();
        if self.event_idx {
            // SAFETY: `avail_event` is inside the used area of the checked layout.
            let event = unsafe { self.ring.load_u16(self.avail_event, Ordering::Relaxed) };
            Ok(need_event(event, new, old))
        } else {
            // SAFETY: the used header is inside the checked layout.
            let flags = unsafe { self.ring.load_u16(self.layout.device_offset() + off::USED_FLAGS, Ordering::Relaxed) };
            Ok(flags & UsedFlags::NO_NOTIFY.bits() == 0)
        }
    }

    #[inline(always)]
    fn used_idx(&self) -> u16 {
        // Acquire: the used elements the device wrote before this index are visible.
        // SAFETY: the used header is inside the checked layout.
        unsafe { self.used.load_u16(off::USED_IDX, Ordering::Acquire) }
    }

    #[inline(always)]
    fn used_elem(&self, idx: u16) -> (u32, u32) {
        let e = off::USED_RING + ((idx & self.mask) as usize) * off::USED_ELEM_SIZE;
        // SAFETY: `idx & mask < size`, inside the used ring.
        unsafe { (self.used.read_u32(e + off::USED_ELEM_ID), self.used.read_u32(e + off::USED_ELEM_LEN)) }
    }

    /// Takes the next chain the device has used, if any. Every value the
    /// device wrote is checked first; a bad one breaks the queue.
    #[inline]
    pub fn pop_used(&mut self) -> Result<Option<Used<T>>, Error> {
        self.pop_used_into(&mut FreedBatch::new())
    }

    /// `pop_used`, freeing the chain's run after those `batch` freed.
    #[inline]
    fn pop_used_into(&mut self, batch: &mut FreedBatch) -> Result<Option<Used<T>>, Error> {
        let last_used = self.last_used;
        if self.used_seen == last_used {
            // Also where a broken queue and an IN_ORDER queue always come
            // (`fail` and `pop_used_in_order` keep `used_seen == last_used`).
            self.check_broken()?;
            if self.in_order {
                return self.pop_used_in_order();
            }
            let used_idx = self.used_idx();
            if used_idx == last_used {
                return Ok(None);
            }
            // Checked once per new index value: the entries up to it are
            // then consumed one by one without re-reading it.
            let in_flight = self.published_in_flight();
            if used_idx.wrapping_sub(last_used) > in_flight {
                return Err(self.fail(DeviceError::UsedIndexJump { used_idx, last_used, in_flight }));
            }
            self.used_seen = used_idx;
        }
        let (id, len) = self.used_elem(last_used);
        match self.slots.complete(id, len, self.published, batch) {
            Ok(done) => {
                self.last_used = last_used.wrapping_add(1);
                Ok(Some(Used { token: done.token, len }))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Takes every chain the device has used so far, in used-ring order,
    /// hands each to `f`, and returns how many: `pop_used` until it returns
    /// `None`, with the same checks, but the entries below one `used.idx`
    /// value are taken in a loop of their own. On a device error the chains
    /// before the bad entry have gone to `f`, and the queue is broken.
    #[inline]
    pub fn drain_used(&mut self, mut f: impl FnMut(Used<T>)) -> Result<usize, Error> {
        let mut n = 0;
        // The drained chains are reused in the order they were used (see
        // the reuse order at `FreedBatch`).
        let mut batch = FreedBatch::new();
        loop {
            let seen = self.used_seen;
            let mut last_used = self.last_used;
            while last_used != seen {
                let (id, len) = self.used_elem(last_used);
                let done = match self.slots.complete(id, len, self.published, &mut batch) {
                    Ok(done) => done,
                    Err(e) => return Err(self.fail(e)),
                };
                last_used = last_used.wrapping_add(1);
                // Before `f`, which may unwind: the slot is free already.
                self.last_used = last_used;
                f(Used { token: done.token, len });
                n += 1;
            }
            // Reads `used.idx` again (or takes an IN_ORDER batch).
            match self.pop_used_into(&mut batch)? {
                Some(used) => {
                    f(used);
                    n += 1;
                }
                None => return Ok(n),
            }
        }
    }

    /// Hands `f` the id of every used entry the device has published and
    /// the queue not taken yet, in ring order, unchecked (see
    /// [`UsedIdHint`]); takes nothing. At most one ring's worth, whatever
    /// `used.idx` says. Under IN_ORDER a batch has one entry, so one id.
    #[inline]
    pub fn peek_used_ids(&self, mut f: impl FnMut(UsedIdHint)) {
        let ready = self.used_idx().wrapping_sub(self.last_used).min(self.queue_size());
        let mut at = self.last_used;
        for _ in 0..ready {
            f(UsedIdHint(self.used_elem(at).0));
            at = at.wrapping_add(1);
        }
    }

    /// IN_ORDER: the device may answer a batch of chains with one used element
    /// carrying the id of the batch's last chain and move `used.idx` by the
    /// batch size (§2.7.8 with VIRTIO_F_IN_ORDER); that element sits at the
    /// batch's first used-ring position.
    fn pop_used_in_order(&mut self) -> Result<Option<Used<T>>, Error> {
        if self.batch.remaining == 0 {
            let used_idx = self.used_idx();
            let ready = used_idx.wrapping_sub(self.last_used);
            if ready == 0 {
                return Ok(None);
            }
            let in_flight = self.published_in_flight();
            if ready > in_flight {
                return Err(self.fail(DeviceError::UsedIndexJump { used_idx, last_used: self.last_used, in_flight }));
            }
            let (id, len) = self.used_elem(self.last_used);
            match self.slots.in_order_batch(id, len, ready) {
                Ok(k) => self.batch = InOrderBatch { remaining: k, last_len: len },
                Err(e) => return Err(self.fail(e)),
            }
        }
        let Some(done) = self.slots.complete_oldest() else {
            // `in_order_batch` counted published chains in flight; none can be missing.
            return Ok(None);
        };
        self.batch.remaining -= 1;
        let len = if self.batch.remaining == 0 { self.batch.last_len } else { done.writable };
        self.last_used = self.last_used.wrapping_add(1);
        // Keeps `pop_used` off its fast path (see `used_seen`).
        self.used_seen = self.last_used;
        Ok(Some(Used { token: done.token, len }))
    }

    /// Asks the device not to send used-buffer notifications (a hint; the
    /// device may still send some).
    #[inline]
    pub fn disable_used_notifications(&mut self) {
        if self.used_notify == UsedNotify::Disabled {
            return;
        }
        self.used_notify = UsedNotify::Disabled;
        if self.event_idx {
            // An event index half the counter space behind: the device only
            // crosses it again after ~65536 completions (one spurious
            // notification at worst).
            // SAFETY: `used_event` is inside the avail area of the checked layout.
            unsafe { self.ring.store_u16(self.used_event, self.last_used.wrapping_sub(0x8000), Ordering::Relaxed) };
        } else {
            // SAFETY: the avail header is inside the checked layout.
            unsafe {
                self.ring.store_u16(
                    self.layout.driver_offset() + off::AVAIL_FLAGS,
                    AvailFlags::NO_INTERRUPT.bits(),
                    Ordering::Relaxed,
                )
            };
        }
    }

    /// Asks for a notification at the next used chain. Returns `true` if used
    /// chains are already waiting (arrived before the device could see the
    /// request), in which case the caller must poll instead of waiting.
    ///
    /// The request (`used_event` or the flag) is stored, then a full fence
    /// orders it before the re-read of `used.idx`: either the device sees the
    /// request, or the driver sees the device's new index.
    #[inline]
    pub fn enable_used_notifications(&mut self) -> Result<bool, Error> {
        self.arm_used_notification(0)
    }

    /// Like [`enable_used_notifications`](Self::enable_used_notifications), but
    /// with EVENT_IDX asks for the notification only after about three
    /// quarters of the published chains in flight have completed. Returns
    /// `true` if that many have already completed.
    #[inline]
    pub fn enable_used_notifications_delayed(&mut self) -> Result<bool, Error> {
        self.enable_used_notifications_delayed_by(UsedDelay::ThreeQuarters)
    }

    /// [`enable_used_notifications_delayed`](Self::enable_used_notifications_delayed)
    /// with the delay chosen: the notification comes once `delay`'s share of
    /// the published chains in flight has completed.
    #[inline]
    pub fn enable_used_notifications_delayed_by(&mut self, delay: UsedDelay) -> Result<bool, Error> {
        let bufs = if self.event_idx { delay.entries(self.published_in_flight()) } else { 0 };
        self.arm_used_notification(bufs)
    }

    fn arm_used_notification(&mut self, bufs: u16) -> Result<bool, Error> {
        self.check_broken()?;
        if self.event_idx {
            // SAFETY: `used_event` is inside the avail area of the checked layout.
            unsafe { self.ring.store_u16(self.used_event, self.last_used.wrapping_add(bufs), Ordering::Relaxed) };
        } else if self.used_notify == UsedNotify::Disabled {
            // SAFETY: the avail header is inside the checked layout.
            unsafe { self.ring.store_u16(self.layout.driver_offset() + off::AVAIL_FLAGS, 0, Ordering::Relaxed) };
        }
        self.used_notify = UsedNotify::Enabled;
        fence_store_before_load();
        let ready = self.used_idx().wrapping_sub(self.last_used);
        Ok(ready > bufs || self.batch.remaining > 0)
    }

    /// Forgets every chain (giving each token to `each`), clears the broken
    /// state and zeroes the ring, as after a device reset. Call it only once
    /// the device has stopped using the queue (reset or queue disabled); a
    /// device that goes on anyway cannot make the driver misbehave, but its
    /// writes are lost.
    pub fn reset(&mut self, each: impl FnMut(T)) {
        self.slots.reset(each);
        if let Some(r) = self.ring.slice(0, self.layout.size()) {
            r.zero();
        }
        self.added = 0;
        self.published = 0;
        self.last_used = 0;
        self.used_seen = 0;
        self.batch = InOrderBatch::default();
        self.used_notify = UsedNotify::Enabled;
        self.broken = None;
        // The table was zeroed, and the slots' epochs were cleared: epoch 1.
        self.frame_offset = u64::MAX;
        self.open_framed();
    }
}

// `write_desc_at` stores `len`, `flags` and `next` as one 64-bit field.
const _: () =
    assert!(off::SPLIT_DESC_FLAGS == off::SPLIT_DESC_LEN + 4 && off::SPLIT_DESC_NEXT == off::SPLIT_DESC_LEN + 6);

/// Writes one split descriptor: the address, then the length, flags and
/// `next` together (adjacent data fields, one 64-bit store).
///
/// # Safety
///
/// `at` is 16-aligned and `at + 16 <= mem.len()`.
#[inline(always)]
unsafe fn write_desc_at(mem: &SharedMemory<'_>, at: usize, addr: u64, len: u32, flags: u16, next: u16) {
    // SAFETY: forwarded contract; the fields are at their natural alignment.
    unsafe {
        mem.write_u64(at + off::SPLIT_DESC_ADDR, addr);
        mem.write_u64(at + off::SPLIT_DESC_LEN, u64::from(len) | u64::from(flags) << 32 | u64::from(next) << 48);
    }
}

/// Writes descriptor `id` of the table at the start of `mem`.
///
/// # Safety
///
/// `id` is below the queue size of the layout checked against `mem`.
#[inline(always)]
unsafe fn write_desc(mem: &SharedMemory<'_>, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
    // SAFETY: forwarded contract: descriptor `id` lies inside the table.
    unsafe { write_desc_at(mem, id as usize * off::DESC_SIZE, addr, len, flags, next) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::SharedLine;

    /// The frame epoch never wraps: `publish` starts it over once it passes
    /// `FRAME_EPOCH_RESTART`, clearing every slot's epoch, so a slot marked
    /// long ago can never match again.
    #[test]
    fn frame_epoch_restarts_before_it_wraps() {
        let layout = RingLayout::new(RingFormat::Split, 8).unwrap();
        let lines: Vec<SharedLine> = (0..layout.lines()).map(|_| SharedLine::new()).collect();
        let ring = SharedMemory::new(&lines);
        let mut slots: Vec<Slot<u32>> = (0..8).map(|_| Slot::new()).collect();
        let config =
            QueueConfig { queue_size: 8, ring, ring_iova: 0x1000, features: RingFeatures::empty(), indirect: None };
        let mut q = SplitQueue::new(config, slots.as_mut_slice()).unwrap();
        let frame = ChainFrame { iova: 0x10_0000, stride: 64, header_len: 16, status_offset: 32, status_len: 1 };
        q.set_chain_frame(frame).unwrap();
        let head = q.next_id().unwrap();
        q.add_framed(Buffer::new(0x20_0000, 512), true, 1).unwrap();
        let epoch = q.frame_epoch();
        assert_eq!(q.slots.frame_epoch(head), epoch, "the framed chain's head is marked");
        // As if 2^31 plain adds had happened since.
        q.frame_offset = q.added.wrapping_sub(u64::from(FRAME_EPOCH_RESTART));
        assert_eq!(q.frame_epoch(), FRAME_EPOCH_RESTART);
        q.publish().unwrap();
        assert_eq!(q.frame_epoch(), 1);
        assert_eq!(q.slots.frame_epoch(head), 0, "every mark is cleared");
        // A frame change near the limit restarts too.
        q.frame_offset = q.added.wrapping_sub(u64::from(FRAME_EPOCH_RESTART) - 1);
        q.set_chain_frame(frame).unwrap();
        assert_eq!(q.frame_epoch(), 1);
    }
}
