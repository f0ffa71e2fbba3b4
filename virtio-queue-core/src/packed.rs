//! The driver side of a packed virtqueue (virtio 1.2 §2.8).
//!
//! One descriptor ring carries both directions. A descriptor is available
//! when its `AVAIL` flag equals the driver's wrap counter and its `USED` flag
//! does not; the device marks it used by making both equal its own wrap
//! counter. The flags word is the synchronising field: the driver stores it
//! with release after the descriptor's other fields, the device loads it
//! with acquire, and the other way round for used descriptors.
//!
//! Batched publication: within a batch every descriptor is written with its
//! final flags except the very first head, whose flags are stored last, with
//! release, by [`PackedQueue::publish`]. The device reads descriptors in ring
//! order and cannot get past that head, so the whole batch becomes visible
//! with that one store.
//!
//! Buffer IDs come from a driver-private free list ([`crate::Slot`]); the
//! device's used ID is only looked up after a range and in-flight check.

use crate::error::{AddError, DeviceError, Error};
use crate::frame::{ChainFrame, Frame, FramedPaths};
use crate::layout::{off, DescFlags, LayoutError, PackedEventFlags, RingFeatures, RingFormat, RingLayout};
use crate::notify::{need_event, packed_event_position, UsedDelay};
use crate::shared::{fence_store_before_load, Ordering, SharedMemory};
use crate::slots::{check_chain, FreedBatch, IndirectTables, Slot, SlotStorage, SlotTable};
use crate::split::QueueConfig;
use crate::{Buffer, QueueAddresses, Used, UsedIdHint};

/// Driver side of a packed virtqueue over caller-provided memory.
///
/// `T` is the caller's per-chain token; `S` holds one [`Slot`] per buffer ID,
/// borrowed (`&mut [Slot<T>]`, the default) or owned ([`OwnedPackedQueue`]).
pub struct PackedQueue<'a, T, S: SlotStorage<T> = &'a mut [Slot<T>]> {
    ring: SharedMemory<'a>,
    layout: RingLayout,
    iova: u64,
    slots: SlotTable<T, S, false>,
    /// Indirect tables; without INDIRECT_DESC they have no entries.
    indirect: IndirectTables<'a>,
    size: u16,
    event_idx: bool,
    in_order: bool,
    /// Ring position the next descriptor goes to, and the `AVAIL`/`USED` bits
    /// that mark a descriptor available in the current lap (`AVAIL` when
    /// the driver's wrap counter is 1, `USED` when it is 0).
    next_avail: u16,
    avail_bits: u16,
    /// Ring positions not occupied by chains in flight.
    free_positions: u16,
    /// Ring position of the next used descriptor, and the used wrap counter.
    next_used: u16,
    used_wrap: bool,
    /// `AVAIL | USED` bits of a descriptor used in the current used lap, or
    /// a value no descriptor matches ([`NEVER_USED`]) while the queue is
    /// broken or in IN_ORDER mode, so that a match alone admits the fast path
    /// of [`pop_used`](PackedQueue::pop_used).
    used_bits: u16,
    /// Chains added, and chains published (free-running): the slots'
    /// publication counter. A chain's stamp is `next_seq` after its add.
    next_seq: u64,
    published_seq: u64,
    /// Position and flags of the batch's first head, stored by `publish`
    /// (meaningful while chains are unpublished: `next_seq != published_seq`).
    batch_head: u16,
    batch_head_flags: u16,
    /// IN_ORDER: chains of a used batch still to hand out, and the length
    /// reported for its last chain.
    batch_remaining: u16,
    batch_last_len: u32,
    /// The driver event suppression flags the device can see.
    driver_event_flags: u16,
    broken: Option<DeviceError>,
    /// The framed fast paths: the layout chosen (see
    /// [`set_framed_chains_indirect`](PackedQueue::set_framed_chains_indirect)) and
    /// each path's bound.
    framed: FramedPaths,
    /// Ring positions at which a direct framed chain fits before the end of
    /// the ring: `size - 2` (none below a size of 3).
    framed_end: u16,
    /// Where framed chains keep their header and status ([`Frame::NONE`]
    /// until [`set_chain_frame`](PackedQueue::set_chain_frame)).
    frame: Frame,
    /// Which frame the queue has: moved by every `set_chain_frame`, never 0.
    /// An ID whose slot records this generation has the frame's header and
    /// status in entries 0 and 2 of its indirect table (see
    /// [`add_framed`](PackedQueue::add_framed)).
    frame_generation: u32,
}

/// The flag bits that say "used" when both equal the used wrap counter.
const USED_BITS: u16 = DescFlags::AVAIL.bits() | DescFlags::USED.bits();

/// A `used_bits` no descriptor matches: it has bits outside `USED_BITS`, and
/// so has `NEVER_USED ^ USED_BITS` (what `advance_used` may make of it).
const NEVER_USED: u16 = !USED_BITS;

/// A packed queue that owns its `N` slots (no heap needed).
pub type OwnedPackedQueue<'a, T, const N: usize> = PackedQueue<'a, T, [Slot<T>; N]>;

impl<'a, T, S: SlotStorage<T>> PackedQueue<'a, T, S> {
    /// Builds a queue and zeroes its ring area (all descriptors then read as
    /// not available for the first lap, whose wrap counter is 1).
    pub fn new(config: QueueConfig<'a>, slots: S) -> Result<Self, LayoutError> {
        let (layout, indirect) = config.layout(RingFormat::Packed)?;
        let in_order = config.features.contains(RingFeatures::IN_ORDER);
        let slots = SlotTable::new(slots, config.queue_size, in_order)?;
        if let Some(r) = config.ring.slice(0, layout.size()) {
            r.zero();
        }
        Ok(PackedQueue {
            ring: config.ring,
            layout,
            iova: config.ring_iova,
            slots,
            indirect,
            size: config.queue_size,
            event_idx: config.features.contains(RingFeatures::EVENT_IDX),
            in_order,
            next_avail: 0,
            avail_bits: DescFlags::AVAIL.bits(),
            free_positions: config.queue_size,
            next_used: 0,
            used_wrap: true,
            used_bits: if in_order { NEVER_USED } else { USED_BITS },
            next_seq: 0,
            published_seq: 0,
            batch_head: 0,
            batch_head_flags: 0,
            batch_remaining: 0,
            batch_last_len: 0,
            driver_event_flags: PackedEventFlags::Enable as u16,
            broken: None,
            frame: Frame::NONE,
            framed: FramedPaths::new(indirect.entries()),
            framed_end: config.queue_size.saturating_sub(2),
            frame_generation: 1,
        })
    }

    /// The layout of the ring area.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Device addresses of the descriptor ring and the driver and device
    /// event suppression structures.
    pub fn addresses(&self) -> QueueAddresses {
        self.layout.addresses(self.iova)
    }

    /// Entries in the queue.
    pub fn queue_size(&self) -> u16 {
        self.size
    }

    /// The id the next chain [`add`](Self::add)ed will have: its buffer ID,
    /// below the queue size and different from the id of every chain in
    /// flight; `None` when no ID is free (an `add` would fail). The next
    /// `add` takes exactly this id, so a device crate can place per-chain
    /// memory (a request header, a status byte) by it before adding the
    /// chain. A read of two fields: nothing on the `add` path changes.
    #[inline(always)]
    pub fn next_id(&self) -> Option<u16> {
        if self.slots.num_free() == 0 {
            None
        } else {
            Some(self.slots.free_head())
        }
    }

    /// Free ring positions.
    pub fn free_descriptors(&self) -> u16 {
        self.free_positions
    }

    /// Chains added and not yet completed: one buffer ID each.
    pub fn in_flight(&self) -> u16 {
        self.size - self.slots.num_free()
    }

    /// Published chains not yet completed: what the device may return.
    #[inline(always)]
    fn published_in_flight(&self) -> u16 {
        // Chains added since the last publish: the stamps handed out since
        // then (fewer than 2^16, as they are all in flight).
        // (fewer than 2^16: they are all in flight).
        self.in_flight() - (self.next_seq - self.published_seq) as u16
    }

    /// The device error that broke the queue, if any.
    pub fn broken(&self) -> Option<DeviceError> {
        self.broken
    }

    /// Most buffers one chain may have.
    pub fn max_chain_buffers(&self) -> usize {
        (self.size as usize).max(self.indirect.entries() as usize)
    }

    #[inline(always)]
    fn check_broken(&self) -> Result<(), Error> {
        match self.broken {
            None => Ok(()),
            Some(e) => Err(Error::Broken(e)),
        }
    }

    /// Why a chain needing `positions` ring positions does not fit now.
    #[cold]
    fn no_room(&self, positions: usize) -> Error {
        if positions > self.size as usize {
            Error::TooManyBuffers { buffers: positions, max: self.max_chain_buffers() }
        } else {
            Error::QueueFull
        }
    }

    /// Breaks the queue. `used_bits = NEVER_USED` closes the fast path of
    /// `pop_used`, which therefore need not check `broken` itself.
    #[cold]
    fn fail(&mut self, e: DeviceError) -> Error {
        self.broken = Some(e);
        self.used_bits = NEVER_USED;
        self.framed.close();
        Error::Broken(e)
    }

    /// The driver's wrap counter.
    #[inline(always)]
    fn avail_wrap(&self) -> bool {
        self.avail_bits == DescFlags::AVAIL.bits()
    }

    /// Adds a chain of `readable` then `writable` buffers, not yet visible to
    /// the device (see [`publish`](Self::publish)). With indirect tables, a
    /// chain of 2 or more buffers that fits its table takes one ring position.
    ///
    /// On error nothing changed and the token comes back in the [`AddError`].
    #[inline]
    pub fn add(&mut self, readable: &[Buffer], writable: &[Buffer], token: T) -> Result<(), AddError<T>> {
        self.add_into(readable, writable, token, true)
    }

    /// [`add`](Self::add), with the indirect tables used only if `tables`.
    #[inline(always)]
    fn add_into(
        &mut self,
        readable: &[Buffer],
        writable: &[Buffer],
        token: T,
        tables: bool,
    ) -> Result<(), AddError<T>> {
        if let Some(e) = self.broken {
            return Err(AddError { error: Error::Broken(e), token });
        }
        let n = readable.len() + writable.len();
        if n == 0 {
            return Err(AddError { error: Error::EmptyChain, token });
        }
        if tables && n > 1 && n <= self.indirect.entries() as usize {
            // Enough free positions also means a free buffer ID: every chain
            // in flight occupies at least one position, so with one position
            // free fewer than `size` chains (IDs) are in flight.
            if self.free_positions == 0 {
                return Err(AddError { error: self.no_room(1), token });
            }
            // Lengths are checked before any flags are written: a descriptor
            // marked available stays so until overwritten, even if the chain
            // is refused.
            let writable_len = match check_chain(readable, writable) {
                Ok(w) => w,
                Err(error) => return Err(AddError { error, token }),
            };
            // Checks done: from here on the chain is written and committed.
            let id = self.slots.free_head();
            // The table no longer holds a framed chain's fixed parts.
            self.slots.set_frame_epoch(id, 0);
            let (toff, tiova) = self.indirect.table(id);
            let mem = self.indirect.mem();
            let mut at = toff;
            for b in readable {
                // SAFETY: `id < size` (index invariant) and fewer than `entries`
                // descriptors, inside the tables `check` measured.
                unsafe { write_table_desc(mem, at, b.addr, b.len, id, 0) };
                at += off::DESC_SIZE;
            }
            for b in writable {
                // SAFETY: as above.
                unsafe { write_table_desc(mem, at, b.addr, b.len, id, DescFlags::WRITE.bits()) };
                at += off::DESC_SIZE;
            }
            let head = self.next_avail;
            // SAFETY: `head < size`, inside the descriptor ring.
            unsafe { write_desc_data(&self.ring, head, tiova, (n * off::DESC_SIZE) as u32, id) };
            let head_flags = DescFlags::INDIRECT.bits() | self.avail_bits;
            self.advance_avail();
            self.finish_add(id, head, head_flags, 1, writable_len, token);
            return Ok(());
        }
        if n > self.free_positions as usize {
            return Err(AddError { error: self.no_room(n), token });
        }
        let writable_len = match check_chain(readable, writable) {
            Ok(w) => w,
            Err(error) => return Err(AddError { error, token }),
        };
        let id = self.slots.free_head();
        let p = self.next_avail;
        let head_flags = if p as usize + n <= self.size as usize {
            self.put_chain_no_wrap(readable, writable, id, p as usize, n)
        } else {
            self.put_chain_wrapping(readable, writable, id, n)
        };
        self.finish_add(id, p, head_flags, n as u16, writable_len, token);
        Ok(())
    }

    /// Sets where framed chains ([`add_framed`](Self::add_framed)) keep their
    /// header and status. Checked against the queue size; may be called again
    /// (chains in flight keep the ends they were added with).
    pub fn set_chain_frame(&mut self, frame: ChainFrame) -> Result<(), LayoutError> {
        self.frame = Frame::new(frame, self.size)?;
        self.frame_generation = self.frame_generation.wrapping_add(1);
        if self.frame_generation == 0 {
            self.slots.clear_frame_epochs();
            self.frame_generation = 1;
        }
        self.open_framed();
        Ok(())
    }

    /// Opens the framed fast path of the chosen layout (see [`FramedPaths`]).
    fn open_framed(&mut self) {
        self.framed.open(&self.frame, self.broken.is_some());
    }

    /// Whether framed chains go into indirect tables (one ring position
    /// each) rather than straight into the ring (three): by default when the
    /// queue has tables of three or more entries (see
    /// [`set_framed_chains_indirect`](Self::set_framed_chains_indirect)).
    #[inline(always)]
    pub fn framed_chains_indirect(&self) -> bool {
        self.framed.in_tables
    }

    /// Chooses where framed chains go on a queue with indirect tables of
    /// three or more entries: into their id's table (`true`, the default: one
    /// ring position each, so the ring holds as many framed chains as it has
    /// entries) or straight into the ring (`false`: three positions each, which
    /// a device reads without the extra lookup of a table; a framed chain
    /// goes into a table only while fewer than three positions are free, so the
    /// ring then holds about a third as many). `true` on a queue without such
    /// tables fails with [`LayoutError::IndirectTablesTooSmall`]. May be
    /// called at any time; chains in flight keep their layout.
    ///
    /// Straight into the ring, a framed chain that would cross the end of the
    /// ring is written across it (as `add` writes a chain without a table).
    pub fn set_framed_chains_indirect(&mut self, on: bool) -> Result<(), LayoutError> {
        self.framed.choose(on, self.indirect.entries())?;
        self.open_framed();
        Ok(())
    }

    /// Adds the framed chain of the buffer ID [`next_id`](Self::next_id)
    /// names: that id's header (device-readable), `data` (device-writable if
    /// `data_writable`) and that id's status (device-writable), as set with
    /// [`set_chain_frame`](Self::set_chain_frame). The same chain as
    /// [`add`](Self::add) with those three buffers, with the same errors (and
    /// [`Error::NoChainFrame`] without a frame), but cheaper: no buffer slices
    /// and no checks of the fixed ends. It takes one ring position pointing
    /// at the ID's indirect table while
    /// [`framed_chains_indirect`](Self::framed_chains_indirect), as `add`
    /// would; else three positions straight in the ring, or, while fewer than
    /// three are free, a table as `add` would.
    ///
    /// Direct, the three descriptors are written straight into the ring; a
    /// chain that would cross the end of the ring is written across it
    /// through the slow path.
    /// Indirect, the ID's table keeps the header and status entries (0 and 2)
    /// while its slot records the current frame generation: only `add`
    /// writes a table, and it clears that record; `set_chain_frame` moves the
    /// generation and `reset` clears every record. A chain then writes table
    /// entry 1, the data, and the ring descriptor. A device that writes the
    /// tables (which it must not do) can only garble its own view of later
    /// chains: the driver reads nothing back from them.
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
        let p = self.next_avail;
        // Three free positions also mean a free ID (see `add`); positions
        // `p .. p + 3` do not cross the end of the ring.
        if !((data.len.wrapping_sub(1) < self.framed.direct) & (self.free_positions >= 3) & (p < self.framed_end)) {
            return self.add_framed_slow(data, data_writable, token);
        }
        let frame = self.frame;
        let id = self.slots.free_head();
        let avail = self.avail_bits;
        let (h, s) = (frame.header(id), frame.status(id));
        let data_flags =
            avail | if data_writable { (DescFlags::NEXT | DescFlags::WRITE).bits() } else { DescFlags::NEXT.bits() };
        let at = p as usize * off::DESC_SIZE;
        // SAFETY: positions `p .. p + 3` are below the queue size (checked
        // above), so all three descriptors are inside the ring. The head's
        // flags are stored last, by `finish_add` or `publish`.
        unsafe {
            self.ring.write_u64(at + off::PACKED_DESC_ADDR, h.addr);
            self.ring.write_u32(at + off::PACKED_DESC_LEN, h.len);
            self.ring.write_u16(at + off::PACKED_DESC_ID, id);
            write_desc_with_flags(&self.ring, at + off::DESC_SIZE, data.addr, data.len, id, data_flags);
            write_desc_with_flags(
                &self.ring,
                at + 2 * off::DESC_SIZE,
                s.addr,
                s.len,
                id,
                avail | DescFlags::WRITE.bits(),
            );
        }
        let np = p + 3;
        if np == self.size {
            self.next_avail = 0;
            self.avail_bits ^= USED_BITS;
        } else {
            self.next_avail = np;
        }
        self.finish_add(id, p, avail | DescFlags::NEXT.bits(), 3, frame.writable(&data, data_writable), token);
        Ok(())
    }

    /// [`add_framed`](Self::add_framed) for a caller that knows the queue
    /// puts framed chains in indirect tables (see
    /// [`framed_chains_indirect`](Self::framed_chains_indirect)), to decide
    /// that once for many chains: on a queue without such tables the chain
    /// still goes into the ring, only more slowly.
    #[inline(always)]
    pub fn add_framed_indirect(&mut self, data: Buffer, data_writable: bool, token: T) -> Result<(), AddError<T>> {
        // A free position also means a free ID (see `add`).
        if !((data.len.wrapping_sub(1) < self.framed.indirect) & (self.free_positions >= 1)) {
            return self.add_framed_slow(data, data_writable, token);
        }
        let p = self.next_avail;
        let id = self.slots.free_head();
        if self.slots.frame_epoch(id) != self.frame_generation {
            self.write_frame_table(id);
        }
        let (toff, tiova) = self.indirect.table(id);
        let data_flags = if data_writable { DescFlags::WRITE.bits() } else { 0 };
        // SAFETY: `id < size` (index invariant); entry 1 of a table of at
        // least three (the indirect path opens only with such tables),
        // inside the tables `check` measured; `p < size`, inside the ring.
        unsafe {
            write_table_desc(self.indirect.mem(), toff + off::DESC_SIZE, data.addr, data.len, id, data_flags);
            write_desc_data(&self.ring, p, tiova, 3 * off::DESC_SIZE as u32, id);
        }
        let head_flags = DescFlags::INDIRECT.bits() | self.avail_bits;
        self.advance_avail();
        self.finish_add(id, p, head_flags, 1, self.frame.writable(&data, data_writable), token);
        Ok(())
    }

    /// Writes the header and status entries of ID `id`'s indirect table and
    /// records the frame generation in its slot (see
    /// [`add_framed`](Self::add_framed)). Only called with tables of at least
    /// three entries.
    #[cold]
    #[inline(never)]
    fn write_frame_table(&mut self, id: u16) {
        let (h, s) = (self.frame.header(id), self.frame.status(id));
        let (toff, _) = self.indirect.table(id);
        let mem = self.indirect.mem();
        // SAFETY: `id` is the free head (index invariant), below size;
        // entries 0 and 2 lie in its table of at least three, inside the
        // tables `check` measured.
        unsafe {
            write_table_desc(mem, toff, h.addr, h.len, id, 0);
            write_table_desc(mem, toff + 2 * off::DESC_SIZE, s.addr, s.len, id, DescFlags::WRITE.bits());
        }
        self.slots.set_frame_epoch(id, self.frame_generation);
    }

    /// [`add_framed`](Self::add_framed) through `add`: no frame, a refused
    /// chain, too few free positions, the end of the ring, or a broken queue.
    #[cold]
    #[inline(never)]
    fn add_framed_slow(&mut self, data: Buffer, data_writable: bool, token: T) -> Result<(), AddError<T>> {
        if !self.frame.is_set() {
            return Err(AddError { error: Error::NoChainFrame, token });
        }
        // With no free ID `free_head` names none; `add` then fails before
        // using the buffers.
        let id = self.slots.free_head();
        let (h, s) = (self.frame.header(id), self.frame.status(id));
        // Straight into the ring while three positions are free, even across
        // its end; else (or with the tables' layout) as `add` puts it.
        let tables = self.framed.in_tables || self.free_positions < 3;
        if data_writable {
            self.add_into(&[h], &[data, s], token, tables)
        } else {
            self.add_into(&[h, data], &[s], token, tables)
        }
    }

    /// Ends an add whose chain (buffer `id`, `positions` ring positions from
    /// `head`) is written except for the head's flags, `head_flags`: the
    /// batch's first head keeps them for `publish`, a later head gets them at
    /// once (the device reaches it only after the first, stored with
    /// release). Then the chain's ID and positions are taken.
    #[inline(always)]
    fn finish_add(&mut self, id: u16, head: u16, head_flags: u16, positions: u16, writable: u32, token: T) {
        let seq = self.next_seq;
        if seq == self.published_seq {
            self.batch_head = head;
            self.batch_head_flags = head_flags;
        } else {
            // SAFETY: `head < size`, inside the descriptor ring.
            unsafe {
                self.ring.store_u16(
                    head as usize * off::DESC_SIZE + off::PACKED_DESC_FLAGS,
                    head_flags,
                    Ordering::Relaxed,
                )
            };
        }
        self.free_positions -= positions;
        // The chain is published once `published_seq` reaches its stamp.
        let stamp = seq + 1;
        self.next_seq = stamp;
        let after = self.slots.next_free(id);
        self.slots.commit(id, id, after, positions, token, writable, stamp);
    }

    /// Writes a chain of `n` buffers at positions from `next_avail` on that
    /// cross the end of the ring (once per lap at most), and advances
    /// `next_avail`. Returns the head's flags, which are not written; every
    /// other descriptor's are written as it is filled.
    #[inline(never)]
    fn put_chain_wrapping(&mut self, readable: &[Buffer], writable: &[Buffer], id: u16, n: usize) -> u16 {
        let next = DescFlags::NEXT.bits();
        let mut hf = 0;
        let mut k = 0usize;
        for b in readable {
            k += 1;
            hf = self.put_desc(b, id, if k < n { next } else { 0 }, k - 1, hf);
        }
        for b in writable {
            k += 1;
            hf = self.put_desc(b, id, DescFlags::WRITE.bits() | if k < n { next } else { 0 }, k - 1, hf);
        }
        hf
    }

    /// Fills the descriptor at `next_avail` with buffer `b` of chain `id` and
    /// advances; the `k`-th descriptor of the chain. Returns the head's flags
    /// (computed when `k == 0`, else `hf` unchanged). Flags of later
    /// descriptors are stored at once: the device reaches them only after
    /// the head, whose flags are stored last.
    #[inline(always)]
    fn put_desc(&mut self, b: &Buffer, id: u16, flags: u16, k: usize, hf: u16) -> u16 {
        let pos = self.next_avail;
        let flags = flags | self.avail_bits;
        // SAFETY: `pos < size`, inside the descriptor ring.
        unsafe { write_desc_data(&self.ring, pos, b.addr, b.len, id) };
        let hf = if k == 0 {
            flags
        } else {
            // SAFETY: as above.
            unsafe {
                self.ring.store_u16(pos as usize * off::DESC_SIZE + off::PACKED_DESC_FLAGS, flags, Ordering::Relaxed)
            };
            hf
        };
        self.advance_avail();
        hf
    }

    /// Writes a chain of `n` buffers at positions `p .. p + n`, which do not
    /// cross the end of the ring, and advances `next_avail`. Returns the
    /// head's flags, which are not written (see `finish_add`); every other
    /// descriptor gets its final flags with its data.
    #[inline(always)]
    fn put_chain_no_wrap(&mut self, readable: &[Buffer], writable: &[Buffer], id: u16, p: usize, n: usize) -> u16 {
        let avail = self.avail_bits;
        let ring = self.ring;
        let head_at = p * off::DESC_SIZE;
        let flags = |k: usize, w: u16| avail | w | if k + 1 < n { DescFlags::NEXT.bits() } else { 0 };
        let mut k = 0;
        for b in readable {
            // SAFETY: positions p .. p + n are below the queue size, so every
            // descriptor `head_at + 16 k` is inside the ring.
            unsafe { put_chain_desc(&ring, head_at, k, b, id, flags(k, 0)) };
            k += 1;
        }
        for b in writable {
            // SAFETY: as above.
            unsafe { put_chain_desc(&ring, head_at, k, b, id, flags(k, DescFlags::WRITE.bits())) };
            k += 1;
        }
        let np = p + n;
        if np == self.size as usize {
            self.next_avail = 0;
            self.avail_bits ^= USED_BITS;
        } else {
            self.next_avail = np as u16;
        }
        flags(0, if readable.is_empty() { DescFlags::WRITE.bits() } else { 0 })
    }

    #[inline(always)]
    fn advance_avail(&mut self) {
        self.next_avail += 1;
        if self.next_avail == self.size {
            self.next_avail = 0;
            self.avail_bits ^= USED_BITS;
        }
    }

    /// Makes every chain added since the last call visible to the device with
    /// one release store (the batch's first head flags), and says whether the
    /// device must be notified according to its event suppression structure.
    #[inline]
    pub fn publish(&mut self) -> Result<bool, Error> {
        self.check_broken()?;
        if self.next_seq == self.published_seq {
            return Ok(false);
        }
        // Release: every descriptor of the batch was written before.
        // SAFETY: `batch_head < size`, inside the descriptor ring.
        unsafe {
            self.ring.store_u16(
                self.batch_head as usize * off::DESC_SIZE + off::PACKED_DESC_FLAGS,
                self.batch_head_flags,
                Ordering::Release,
            )
        };
        self.published_seq = self.next_seq;
        let new = self.next_avail;
        // Where the batch started, on the continuum of `new`: one lap behind
        // if the batch crossed the end of the ring (or, filling the whole
        // ring, ends where it started).
        let head = self.batch_head;
        let old = if head < new { head } else { head.wrapping_sub(self.size) };
        fence_store_before_load();
        let dev = self.layout.device_offset();
        // SAFETY: the device event suppression structure is inside the checked layout.
        let flags = unsafe { self.ring.load_u16(dev + off::EVENT_FLAGS, Ordering::Relaxed) } & 3;
        Ok(match flags {
            f if f == PackedEventFlags::Disable as u16 => false,
            f if f == PackedEventFlags::Desc as u16 && self.event_idx => {
                // SAFETY: as above.
                let off_wrap = unsafe { self.ring.load_u16(dev + off::EVENT_OFF_WRAP, Ordering::Relaxed) };
                // `new` is on the current lap's continuum (`avail_wrap`);
                // `old` may lie one lap behind, which the wrapping arithmetic covers.
                need_event(packed_event_position(off_wrap, self.avail_wrap(), self.size), new, old)
            }
            // Enable, and values a correct device does not write: notify.
            _ => true,
        })
    }

    /// Whether the descriptor at `pos` is used in lap `wrap`.
    #[inline(always)]
    fn is_used(&self, pos: u16, wrap: bool) -> bool {
        // Acquire: the id and length the device wrote before the flags are visible.
        // SAFETY: callers pass `pos < size`, inside the descriptor ring.
        let flags =
            unsafe { self.ring.load_u16(pos as usize * off::DESC_SIZE + off::PACKED_DESC_FLAGS, Ordering::Acquire) };
        flags & USED_BITS == if wrap { USED_BITS } else { 0 }
    }

    /// Whether the next used descriptor is there (`is_used` at `next_used`).
    #[inline(always)]
    fn next_is_used(&self) -> bool {
        // Acquire: as in `is_used`.
        // SAFETY: `next_used < size`, inside the descriptor ring.
        let flags = unsafe {
            self.ring.load_u16(self.next_used as usize * off::DESC_SIZE + off::PACKED_DESC_FLAGS, Ordering::Acquire)
        };
        flags & USED_BITS == self.used_bits
    }

    #[inline(always)]
    fn used_desc(&self, pos: u16) -> (u32, u32) {
        let at = pos as usize * off::DESC_SIZE;
        // SAFETY: `pos < size`, inside the descriptor ring.
        unsafe {
            (u32::from(self.ring.read_u16(at + off::PACKED_DESC_ID)), self.ring.read_u32(at + off::PACKED_DESC_LEN))
        }
    }

    #[inline(always)]
    fn advance_used(&mut self, ring_descs: u16) {
        // `ring_descs <= size`, so one subtraction brings the position back into range.
        let p = u32::from(self.next_used) + u32::from(ring_descs);
        if p >= u32::from(self.size) {
            self.next_used = (p - u32::from(self.size)) as u16;
            self.used_wrap = !self.used_wrap;
            self.used_bits ^= USED_BITS;
        } else {
            self.next_used = p as u16;
        }
        self.free_positions += ring_descs;
    }

    /// Takes the next chain the device has used, if any. Every value the
    /// device wrote is checked first; a bad one breaks the queue.
    #[inline]
    pub fn pop_used(&mut self) -> Result<Option<Used<T>>, Error> {
        self.pop_used_into(&mut FreedBatch::new())
    }

    /// `pop_used`, freeing the chain's ID after those `batch` freed.
    #[inline]
    fn pop_used_into(&mut self, batch: &mut FreedBatch) -> Result<Option<Used<T>>, Error> {
        let pos = self.next_used;
        if !self.next_is_used() {
            // Also where a broken queue and an IN_ORDER queue always come:
            // their `used_bits` matches no descriptor.
            self.check_broken()?;
            if self.in_order {
                return self.pop_used_in_order();
            }
            return Ok(None);
        }
        let (id, len) = self.used_desc(pos);
        match self.slots.complete(id, len, self.published_seq, batch) {
            Ok(done) => {
                self.advance_used(done.ring_descs);
                Ok(Some(Used { token: done.token, len }))
            }
            // With nothing in flight no id can be right; say what is wrong.
            Err(_) if self.published_in_flight() == 0 => {
                Err(self.fail(DeviceError::UsedWithoutInFlight { position: pos }))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Takes every chain the device has used so far, in ring order, hands
    /// each to `f`, and returns how many: `pop_used` until it returns `None`,
    /// with the same checks. On a device error the chains before the bad
    /// descriptor have gone to `f`, and the queue is broken.
    #[inline]
    pub fn drain_used(&mut self, mut f: impl FnMut(Used<T>)) -> Result<usize, Error> {
        let mut n = 0;
        // The drained IDs are reused in the order they were used (see the
        // reuse order at `FreedBatch`).
        let mut batch = FreedBatch::new();
        while let Some(used) = self.pop_used_into(&mut batch)? {
            f(used);
            n += 1;
        }
        Ok(n)
    }

    /// IN_ORDER: one used descriptor may stand for a batch; it carries the ID
    /// of the batch's last buffer and the device skips forward by the whole
    /// batch's descriptors (§2.8.9 with VIRTIO_F_IN_ORDER).
    fn pop_used_in_order(&mut self) -> Result<Option<Used<T>>, Error> {
        if self.batch_remaining == 0 {
            let pos = self.next_used;
            if !self.is_used(pos, self.used_wrap) {
                return Ok(None);
            }
            let in_flight = self.published_in_flight();
            if in_flight == 0 {
                return Err(self.fail(DeviceError::UsedWithoutInFlight { position: pos }));
            }
            let (id, len) = self.used_desc(pos);
            match self.slots.in_order_batch(id, len, in_flight) {
                Ok(k) => {
                    self.batch_remaining = k;
                    self.batch_last_len = len;
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        let Some(done) = self.slots.complete_oldest() else {
            return Ok(None);
        };
        self.batch_remaining -= 1;
        let len = if self.batch_remaining == 0 { self.batch_last_len } else { done.writable };
        self.advance_used(done.ring_descs);
        Ok(Some(Used { token: done.token, len }))
    }

    #[inline(always)]
    fn set_driver_event_flags(&mut self, flags: PackedEventFlags, order: Ordering) {
        let flags = flags as u16;
        if self.driver_event_flags != flags {
            self.driver_event_flags = flags;
            // SAFETY: the driver event suppression structure is inside the checked layout.
            unsafe { self.ring.store_u16(self.layout.driver_offset() + off::EVENT_FLAGS, flags, order) };
        }
    }

    /// Asks the device not to send used-buffer notifications.
    #[inline]
    pub fn disable_used_notifications(&mut self) {
        self.set_driver_event_flags(PackedEventFlags::Disable, Ordering::Relaxed);
    }

    /// Asks for a notification at the next used descriptor. Returns `true` if
    /// one is already there, in which case the caller must poll instead of
    /// waiting. The request is stored, then a full fence orders it before the
    /// re-check of the next used descriptor.
    #[inline]
    pub fn enable_used_notifications(&mut self) -> Result<bool, Error> {
        self.arm_used_notification(0)
    }

    /// Like [`enable_used_notifications`](Self::enable_used_notifications), but
    /// with EVENT_IDX asks for the notification only once the device has used
    /// about three quarters of the ring positions in flight. Returns `true` if
    /// it already has.
    #[inline]
    pub fn enable_used_notifications_delayed(&mut self) -> Result<bool, Error> {
        self.enable_used_notifications_delayed_by(UsedDelay::ThreeQuarters)
    }

    /// [`enable_used_notifications_delayed`](Self::enable_used_notifications_delayed)
    /// with the delay chosen: the notification comes once `delay`'s share of
    /// the ring positions in flight has been used.
    #[inline]
    pub fn enable_used_notifications_delayed_by(&mut self, delay: UsedDelay) -> Result<bool, Error> {
        let bufs = if self.event_idx { delay.entries(self.size - self.free_positions) } else { 0 };
        self.arm_used_notification(bufs)
    }

    fn arm_used_notification(&mut self, bufs: u16) -> Result<bool, Error> {
        self.check_broken()?;
        let (mut pos, mut wrap) = (u32::from(self.next_used) + u32::from(bufs), self.used_wrap);
        if pos >= u32::from(self.size) {
            pos -= u32::from(self.size);
            wrap = !wrap;
        }
        let pos = pos as u16;
        if self.event_idx {
            let off_wrap = pos | (u16::from(wrap) << 15);
            // SAFETY: the driver event suppression structure is inside the checked layout.
            unsafe {
                self.ring.store_u16(self.layout.driver_offset() + off::EVENT_OFF_WRAP, off_wrap, Ordering::Relaxed)
            };
            // Release: a device that sees DESC also sees the position above.
            self.driver_event_flags = u16::MAX;
            self.set_driver_event_flags(PackedEventFlags::Desc, Ordering::Release);
        } else {
            self.set_driver_event_flags(PackedEventFlags::Enable, Ordering::Relaxed);
        }
        fence_store_before_load();
        Ok(self.used_beyond(bufs))
    }

    /// Whether the device has already used descriptors covering more than
    /// `bufs` ring positions past `next_used`: then its decision about an
    /// event at `next_used + bufs` may have been taken before it saw the
    /// request, and the caller must poll instead of waiting.
    ///
    /// Used descriptors are not at fixed positions: each is followed by the
    /// rest of its chain's positions (or, under IN_ORDER, its whole batch's),
    /// which the device skips (§2.8.6, §2.8.9). So the check walks them as
    /// `pop_used` would, instead of looking at the event position alone,
    /// which may be in the middle of a chain and never be marked used.
    /// Anything unexpected (an id not in flight) says "poll", so that
    /// `pop_used` reports it.
    fn used_beyond(&self, bufs: u16) -> bool {
        if self.batch_remaining > 0 {
            return true;
        }
        let (mut pos, mut wrap) = (self.next_used, self.used_wrap);
        let mut covered = 0u32;
        let mut age = 0u16;
        let window = self.published_in_flight();
        // Every step covers at least one position, and at most `size` are in flight.
        for _ in 0..self.size {
            if !self.is_used(pos, wrap) {
                return false;
            }
            let (id, _) = self.used_desc(pos);
            let step = if self.in_order {
                match self.slots.in_order_span(id, age, window.saturating_sub(age)) {
                    Some((chains, descs)) => {
                        age += chains;
                        descs
                    }
                    None => return true,
                }
            } else {
                match self.slots.published_ring_descs(id, self.published_seq) {
                    Some(descs) => u32::from(descs),
                    None => return true,
                }
            };
            covered += step;
            if covered > u32::from(bufs) {
                return true;
            }
            (pos, wrap) = self.position_after(pos, wrap, step);
        }
        true
    }

    /// The ring position `step` descriptors after `pos` in lap `wrap`.
    #[inline(always)]
    fn position_after(&self, pos: u16, wrap: bool, step: u32) -> (u16, bool) {
        let p = u32::from(pos) + step;
        if p >= u32::from(self.size) {
            ((p % u32::from(self.size)) as u16, !wrap)
        } else {
            (p as u16, wrap)
        }
    }

    /// Hands `f` the id of every used descriptor the device has marked and
    /// the queue not taken yet, in ring order, unchecked (see
    /// [`UsedIdHint`]); takes nothing. Used descriptors are not at fixed
    /// positions (see `used_beyond`), so the walk steps over each chain's
    /// positions as the queue recorded them, and stops at the first id that
    /// is not a published chain in flight; at most one ring's worth. Under
    /// IN_ORDER it hands over nothing: a batch's chains are not named by
    /// its descriptor.
    #[inline]
    pub fn peek_used_ids(&self, mut f: impl FnMut(UsedIdHint)) {
        if self.in_order || self.batch_remaining > 0 {
            return;
        }
        let (mut pos, mut wrap) = (self.next_used, self.used_wrap);
        for _ in 0..self.size {
            if !self.is_used(pos, wrap) {
                return;
            }
            let (id, _) = self.used_desc(pos);
            f(UsedIdHint(id));
            let Some(step) = self.slots.published_ring_descs(id, self.published_seq) else { return };
            (pos, wrap) = self.position_after(pos, wrap, u32::from(step));
        }
    }

    /// Forgets every chain (giving each token to `each`), clears the broken
    /// state and zeroes the ring, as after a device reset. Call it only once
    /// the device has stopped using the queue.
    pub fn reset(&mut self, each: impl FnMut(T)) {
        self.slots.reset(each);
        if let Some(r) = self.ring.slice(0, self.layout.size()) {
            r.zero();
        }
        self.next_avail = 0;
        self.avail_bits = DescFlags::AVAIL.bits();
        self.free_positions = self.size;
        self.next_used = 0;
        self.used_wrap = true;
        self.used_bits = if self.in_order { NEVER_USED } else { USED_BITS };
        self.next_seq = 0;
        self.published_seq = 0;
        self.batch_remaining = 0;
        self.driver_event_flags = PackedEventFlags::Enable as u16;
        self.broken = None;
        self.open_framed();
    }
}

/// Writes the data fields of the ring descriptor at `pos` (not its flags).
///
/// # Safety
///
/// `pos` is below the queue size of the checked layout in `mem`.
#[inline(always)]
unsafe fn write_desc_data(mem: &SharedMemory<'_>, pos: u16, addr: u64, len: u32, id: u16) {
    let at = pos as usize * off::DESC_SIZE;
    // SAFETY: forwarded contract; fields at their natural alignment.
    unsafe {
        mem.write_u64(at + off::PACKED_DESC_ADDR, addr);
        mem.write_u32(at + off::PACKED_DESC_LEN, len);
        mem.write_u16(at + off::PACKED_DESC_ID, id);
    }
}

/// Writes descriptor `k` of a chain whose head is at byte offset `head_at`:
/// the head's data fields only (its flags are stored last, see
/// `PackedQueue::finish_add`), a later descriptor's data and flags together.
///
/// # Safety
///
/// `head_at` is 16-aligned and `head_at + 16 × (k + 1) <= mem.len()`.
#[inline(always)]
unsafe fn put_chain_desc(mem: &SharedMemory<'_>, head_at: usize, k: usize, b: &Buffer, id: u16, flags: u16) {
    let at = head_at + k * off::DESC_SIZE;
    // SAFETY: forwarded contract: descriptor `k` lies inside the ring.
    unsafe {
        if k == 0 {
            mem.write_u64(at + off::PACKED_DESC_ADDR, b.addr);
            mem.write_u32(at + off::PACKED_DESC_LEN, b.len);
            mem.write_u16(at + off::PACKED_DESC_ID, id);
        } else {
            write_desc_with_flags(mem, at, b.addr, b.len, id, flags);
        }
    }
}

/// Writes a whole non-head ring descriptor: data fields and flags, relaxed.
///
/// # Safety
///
/// `at` is 16-aligned and `at + 16 <= mem.len()`.
#[inline(always)]
unsafe fn write_desc_with_flags(mem: &SharedMemory<'_>, at: usize, addr: u64, len: u32, id: u16, flags: u16) {
    // SAFETY: forwarded contract.
    unsafe {
        mem.write_u64(at + off::PACKED_DESC_ADDR, addr);
        mem.write_u32_u16_flags(at + off::PACKED_DESC_LEN, len, id, flags);
    }
}

/// Writes one descriptor of an indirect table; there every field is data,
/// flags included (the table is published by the ring descriptor).
///
/// # Safety
///
/// `at` is 16-aligned and `at + 16 <= mem.len()`.
#[inline(always)]
unsafe fn write_table_desc(mem: &SharedMemory<'_>, at: usize, addr: u64, len: u32, id: u16, flags: u16) {
    // SAFETY: forwarded contract.
    unsafe {
        mem.write_u64(at + off::PACKED_DESC_ADDR, addr);
        mem.write_u32(at + off::PACKED_DESC_LEN, len);
        mem.write_u16(at + off::PACKED_DESC_ID, id);
        mem.write_u16(at + off::PACKED_DESC_FLAGS, flags);
    }
}
