//! Driver-private per-chain state: tokens, the free list, in-flight checks.
//!
//! Nothing here lives in device-visible memory, so nothing here can be
//! changed by the device. A slot is indexed by what the device returns as the
//! used id: the head descriptor index for split queues, the buffer ID for
//! packed queues. The device's used id is only ever *looked up* here after a
//! range check; it never becomes a free-list link.
//!
//! # Index invariant
//!
//! Every `u16` index stored in a [`SlotTable`] (`free_head`, `free_tail`,
//! `fifo_head`, `fifo_tail` and the `next_free`, `last` and `fifo` fields of
//! each slot) is
//! below `size`, and the storage holds at least `size` slots (checked by
//! [`SlotTable::new`]; [`SlotStorage`] promises the length never changes).
//! This is what lets the unchecked slot accesses below skip bounds checks.

use crate::error::DeviceError;
use crate::layout::LayoutError;
use crate::shared::SharedMemory;

/// Driver-private state of one chain slot. Arrays of these are given to a
/// queue as its [`SlotStorage`]; their contents are managed by the queue.
#[derive(Debug)]
pub struct Slot<T> {
    token: Option<T>,
    /// Next entry of the free list.
    next_free: u16,
    /// Last entry of this chain's run on the free list (split direct chains
    /// take one entry per descriptor; everything else takes one).
    last: u16,
    /// Ring descriptors (split) or ring positions (packed) the chain occupies.
    ring_descs: u16,
    /// In-order mode: entry of the FIFO of in-flight chains, by age.
    fifo: u16,
    /// Total length of the chain's device-writable buffers.
    writable: u32,
    /// The frame this entry's fixed parts were written for: split queues
    /// record their frame epoch when the descriptor was made the head of a
    /// framed chain (see `SplitQueue::add_framed`), packed queues their frame
    /// generation when the ID's indirect table got a frame's header and
    /// status (see `PackedQueue::add_framed`); 0 never.
    /// 32 bits, beside `writable`, so that a slot of a `u32` token stays 32
    /// bytes.
    frame_epoch: u32,
    /// The queue's publication counter once this chain is published (see
    /// [`SlotTable::complete`]), to tell published chains from pending ones.
    stamp: u64,
}

impl<T> Slot<T> {
    /// An empty slot.
    pub const fn new() -> Self {
        Slot { token: None, next_free: 0, last: 0, ring_descs: 0, fifo: 0, writable: 0, stamp: 0, frame_epoch: 0 }
    }

    /// An array of empty slots, for the owning (`const N`) queue variants.
    pub fn array<const N: usize>() -> [Slot<T>; N] {
        core::array::from_fn(|_| Slot::new())
    }
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot::new()
    }
}

/// Storage for a queue's slots: a borrowed slice or an owned array.
///
/// # Safety
///
/// Implementations must return slices of the same length on every call for
/// as long as the value exists; the queue relies on the length it saw once.
pub unsafe trait SlotStorage<T> {
    /// The slots.
    fn slots(&self) -> &[Slot<T>];
    /// The slots, mutably.
    fn slots_mut(&mut self) -> &mut [Slot<T>];
}

// SAFETY: a mutable slice reference always has the same length.
unsafe impl<T> SlotStorage<T> for &mut [Slot<T>] {
    fn slots(&self) -> &[Slot<T>] {
        self
    }
    fn slots_mut(&mut self) -> &mut [Slot<T>] {
        self
    }
}

// SAFETY: an array has a fixed length.
unsafe impl<T, const N: usize> SlotStorage<T> for [Slot<T>; N] {
    fn slots(&self) -> &[Slot<T>] {
        self
    }
    fn slots_mut(&mut self) -> &mut [Slot<T>] {
        self
    }
}

/// Per-slot indirect descriptor tables in device-visible memory (used when
/// VIRTIO_F_INDIRECT_DESC is negotiated): slot `i` owns the `entries`
/// descriptors at byte offset `i × entries × 16`, so a chain of up to
/// `entries` buffers takes one ring descriptor.
#[derive(Clone, Copy, Debug)]
pub struct IndirectTables<'a> {
    mem: SharedMemory<'a>,
    iova: u64,
    entries: u16,
    /// Bytes of one table: `entries × 16`.
    stride: usize,
}

impl<'a> IndirectTables<'a> {
    /// Tables of `entries` descriptors each in `mem`, whose device address is `iova`.
    /// The memory must hold `queue_size × entries × 16` bytes, checked when the
    /// queue is built (see [`IndirectTables::bytes_needed`]).
    pub fn new(mem: SharedMemory<'a>, iova: u64, entries: u16) -> Result<Self, LayoutError> {
        if iova % crate::layout::DESC_ALIGN != 0 {
            return Err(LayoutError::MisalignedAddress { addr: iova, align: crate::layout::DESC_ALIGN });
        }
        if entries == 0 {
            return Err(LayoutError::IndirectTablesTooSmall);
        }
        Ok(IndirectTables { mem, iova, entries, stride: entries as usize * 16 })
    }

    /// Bytes of memory tables of `entries` descriptors need for a queue of
    /// `queue_size` (`None` on overflow).
    pub const fn bytes_needed(queue_size: u16, entries: u16) -> Option<usize> {
        (queue_size as usize).checked_mul(entries as usize * 16)
    }

    /// No tables: `entries` 0, so no chain ever fits one. Queues keep this
    /// instead of an `Option` so the fast path needs one comparison.
    pub(crate) fn none() -> Self {
        IndirectTables { mem: SharedMemory::new(&[]), iova: 0, entries: 0, stride: 0 }
    }

    /// Descriptors per table.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    pub(crate) fn check(&self, queue_size: u16) -> Result<(), LayoutError> {
        let needed = Self::bytes_needed(queue_size, self.entries).ok_or(LayoutError::IndirectTablesTooSmall)?;
        let end = self.iova.checked_add(needed as u64);
        if self.mem.len() < needed || end.is_none() {
            return Err(LayoutError::IndirectTablesTooSmall);
        }
        Ok(())
    }

    /// The table of slot `slot` (below the queue size checked by `check`):
    /// its memory offset and device address.
    #[inline(always)]
    pub(crate) fn table(&self, slot: u16) -> (usize, u64) {
        let off = slot as usize * self.stride;
        (off, self.iova + off as u64)
    }

    #[inline(always)]
    pub(crate) fn mem(&self) -> &SharedMemory<'a> {
        &self.mem
    }
}

/// Adds up a chain's buffers while they are written, then checks them: none
/// empty, at most `u32::MAX` bytes in all (a chain is at most 4 GiB, §2.7.13.1).
#[derive(Default)]
pub(crate) struct ChainSum {
    total: u64,
    writable: u64,
    any_zero: bool,
}

impl ChainSum {
    #[inline(always)]
    pub fn add(&mut self, b: &crate::Buffer) {
        self.total += u64::from(b.len);
        self.any_zero |= b.len == 0;
    }

    #[inline(always)]
    pub fn add_writable(&mut self, b: &crate::Buffer) {
        self.writable += u64::from(b.len);
        self.any_zero |= b.len == 0;
    }

    /// The chain's writable bytes, or why the chain is refused. (Sums cannot
    /// overflow `u64`: slices hold far fewer than 2^32 buffers of < 2^32 bytes.)
    #[inline(always)]
    pub fn finish(self) -> Result<u32, crate::Error> {
        if self.any_zero {
            return Err(crate::Error::ZeroLengthBuffer);
        }
        if self.total + self.writable > u64::from(u32::MAX) {
            return Err(crate::Error::ChainTooLong);
        }
        Ok(self.writable as u32)
    }
}

/// Checks a chain's buffers before anything is written (for formats where
/// writing is visible).
#[inline(always)]
pub(crate) fn check_chain(readable: &[crate::Buffer], writable: &[crate::Buffer]) -> Result<u32, crate::Error> {
    let mut sum = ChainSum::default();
    readable.iter().for_each(|b| sum.add(b));
    writable.iter().for_each(|b| sum.add_writable(b));
    sum.finish()
}

/// The runs one drain of the used ring has freed so far, for
/// [`SlotTable::complete`]: where the next freed run goes.
///
/// # Reuse order
///
/// Freed runs go to the front of the free list, so new chains reuse the
/// entries used last: a driver keeping `n` requests in flight cycles through
/// about `n` entries, whose descriptors, indirect tables and request memory
/// stay in its cache. The runs one drain frees (`drain_used`, nothing taken
/// in between) keep the order the device used them in: the first freed is
/// the first reused. A plain stack would reverse each drained batch, so a
/// driver resubmitting what it drains would hand the device its entries in
/// an order that changes at every pass; kept in order, the device meets the
/// same entries in the same sequence lap after lap. (`pop_used` frees one
/// run at a time, at the front: a caller that resubmits after each keeps
/// the order anyway.)
///
/// Measured with qemu-storage-daemon 7.2 built from Debian's source with
/// symbols (null-co, split ring, EVENT_IDX, direct descriptors, polling
/// flat out), pinned to one vCPU of this 2-vCPU AMD EPYC VM,
/// `vblk bench --vhost-user SOCK --rw randread --bs 4K --iodepth D
/// --runtime 2 --poll|--interrupt` pinned to the other, alternating with
/// `bench/virtio-driver-ref` and with a build that frees onto a plain stack,
/// four rounds, medians, at a time the reference made ~1.5 M IOPS (the
/// machine also has times at ~2.2 M, when both orders measure the same):
///
/// | depth, mode | IOPS ÷ reference, stack | in used order | driver ns/request, stack | in used order |
/// |---|--:|--:|--:|--:|
/// | 32, poll | 0.91 | 1.01 | 721 | 644 |
/// | 128, poll | 0.92 | 1.01 | 722 | 657 |
/// | 32, interrupt | 1.21 | 1.22 | 263 | 256 |
/// | 128, interrupt | 1.30 | 1.29 | 188 | 184 |
///
/// In poll mode the daemon's core is the limit. `perf record -e cpu-clock`
/// on the daemon put 17 % of its samples on its copy of the request header
/// with the stack, 5 % in used order. Debian's own binary gained less at
/// depth 32 in poll mode (0.91 → 0.94× the reference); most of the rest
/// came from pacing the driver's polls (`PollPacer` in virtio-blk-dev).
/// Reusing the entry freed longest ago (a queue) gave the
/// daemon the same gain but cost the driver 312 ns per request against
/// 280 at depth 32 in interrupt mode: it cycles through every entry.
#[derive(Clone, Copy)]
pub(crate) struct FreedBatch {
    /// Last entry of the run freed last in this drain, or [`Self::NONE`].
    /// Set only by [`SlotTable::complete`] of the table the batch is used
    /// with, from an index below its size (index invariant), and still on
    /// the free list: a drain takes no chain. (A `u32` with a value no
    /// index has rather than an `Option<u16>`: one register in the drain
    /// loop.)
    last: u32,
}

impl FreedBatch {
    const NONE: u32 = u32::MAX;

    /// Nothing freed yet: the first run goes to the front of the list.
    #[inline(always)]
    pub const fn new() -> Self {
        FreedBatch { last: Self::NONE }
    }
}

/// What completing a chain gives back.
pub(crate) struct Completed<T> {
    pub token: T,
    pub writable: u32,
    pub ring_descs: u16,
}

/// The slots of one queue plus the free list.
/// `IDS_ARE_DESCRIPTORS`: free-list entries are descriptors (split; a direct
/// chain takes one per descriptor) or buffer IDs (packed; one per chain).
///
/// The table counts free entries but not chains: each queue derives its
/// chains in flight from its own counters (split: `avail_idx - last_used`;
/// packed: `size - num_free`, one ID per chain), and tells published chains
/// from pending ones with the stamp it gives [`commit`](Self::commit).
pub(crate) struct SlotTable<T, S, const IDS_ARE_DESCRIPTORS: bool> {
    storage: S,
    size: u16,
    free_head: u16,
    /// Last entry of the free list (kept only for IN_ORDER split queues).
    free_tail: u16,
    num_free: u16,
    /// In-order mode: FIFO positions of the oldest chain in flight and of the
    /// next chain to add.
    fifo_head: u16,
    fifo_tail: u16,
    in_order: bool,
    _token: core::marker::PhantomData<T>,
}

impl<T, S: SlotStorage<T>, const IDS_ARE_DESCRIPTORS: bool> SlotTable<T, S, IDS_ARE_DESCRIPTORS> {
    pub fn new(storage: S, size: u16, in_order: bool) -> Result<Self, LayoutError> {
        let given = storage.slots().len();
        if given < size as usize || size == 0 {
            return Err(LayoutError::TooFewSlots { needed: size as usize, given });
        }
        let mut t = SlotTable {
            storage,
            size,
            free_head: 0,
            free_tail: 0,
            num_free: 0,
            fifo_head: 0,
            fifo_tail: 0,
            in_order,
            _token: core::marker::PhantomData,
        };
        t.reset(|_| ());
        Ok(t)
    }

    /// Drops every chain (handing its token to `each`) and rebuilds the free
    /// list 0, 1, ..., size-1 (ring order, as IN_ORDER split queues need).
    pub fn reset(&mut self, mut each: impl FnMut(T)) {
        let size = self.size;
        for (i, slot) in self.storage.slots_mut().iter_mut().take(size as usize).enumerate() {
            if let Some(t) = slot.token.take() {
                each(t);
            }
            let i = i as u16;
            *slot = Slot::new();
            slot.next_free = if i + 1 == size { 0 } else { i + 1 };
        }
        self.free_head = 0;
        self.free_tail = size - 1;
        self.num_free = size;
        self.fifo_head = 0;
        self.fifo_tail = 0;
    }

    #[inline(always)]
    fn slot(&self, i: u16) -> &Slot<T> {
        // SAFETY: index invariant (module docs): callers pass stored indices or
        // range-checked device ids, all below `size` <= storage length.
        unsafe { self.storage.slots().get_unchecked(i as usize) }
    }

    #[inline(always)]
    fn slot_mut(&mut self, i: u16) -> &mut Slot<T> {
        // SAFETY: as in `slot`.
        unsafe { self.storage.slots_mut().get_unchecked_mut(i as usize) }
    }

    #[inline(always)]
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// First entry of the free list (meaningful when `num_free() > 0`).
    #[inline(always)]
    pub fn free_head(&self) -> u16 {
        self.free_head
    }

    /// The free-list entry after `i` (an entry taken from the free list).
    #[inline(always)]
    pub fn next_free(&self, i: u16) -> u16 {
        self.slot(i).next_free
    }

    /// The frame epoch recorded for entry `i` (below the queue size).
    #[inline(always)]
    pub fn frame_epoch(&self, i: u16) -> u32 {
        self.slot(i).frame_epoch
    }

    /// Records `epoch` as entry `i`'s frame epoch (`i` below the queue size).
    #[inline(always)]
    pub fn set_frame_epoch(&mut self, i: u16, epoch: u32) {
        self.slot_mut(i).frame_epoch = epoch;
    }

    /// Clears every slot's frame epoch.
    pub fn clear_frame_epochs(&mut self) {
        for slot in self.storage.slots_mut().iter_mut() {
            slot.frame_epoch = 0;
        }
    }

    /// Free-list entries a chain of `ring_descs` descriptors takes: one per
    /// descriptor when entries are descriptors (split), else one.
    #[inline(always)]
    fn ids(&self, ring_descs: u16) -> u16 {
        if IDS_ARE_DESCRIPTORS {
            ring_descs
        } else {
            1
        }
    }

    /// Takes the run of free-list entries `head ..= last` (which the caller
    /// walked with `free_head`/`next_free`; `after` is `next_free(last)`) for
    /// a new chain. `stamp` is the value the queue's publication counter takes
    /// once the chain is published (see [`complete`](Self::complete)).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn commit(&mut self, head: u16, last: u16, after: u16, ring_descs: u16, token: T, writable: u32, stamp: u64) {
        let ids = self.ids(ring_descs);
        self.free_head = after;
        self.num_free -= ids;
        let s = self.slot_mut(head);
        s.token = Some(token);
        if IDS_ARE_DESCRIPTORS {
            s.last = last;
        }
        s.ring_descs = ring_descs;
        s.writable = writable;
        s.stamp = stamp;
        if self.in_order {
            self.push_fifo(head);
        }
    }

    /// [`commit`](Self::commit) of a chain whose head slot already holds
    /// its `last` and `ring_descs` (set with [`set_run`](Self::set_run)).
    #[inline(always)]
    pub fn commit_run(&mut self, head: u16, after: u16, ids: u16, token: T, writable: u32, stamp: u64) {
        self.free_head = after;
        self.num_free -= ids;
        let s = self.slot_mut(head);
        s.token = Some(token);
        s.writable = writable;
        s.stamp = stamp;
        if self.in_order {
            self.push_fifo(head);
        }
    }

    /// Records that the chain headed by `head` ends at `last` and takes
    /// `ring_descs` ring descriptors, for [`commit_run`](Self::commit_run).
    pub fn set_run(&mut self, head: u16, last: u16, ring_descs: u16) {
        let s = self.slot_mut(head);
        s.last = last;
        s.ring_descs = ring_descs;
    }

    #[cold]
    fn push_fifo(&mut self, head: u16) {
        let pos = self.fifo_tail;
        self.slot_mut(pos).fifo = head;
        self.fifo_tail = self.fifo_pos(1, pos);
    }

    /// Completes chain `id` as the device reported it (any order; not for
    /// in-order mode, whose FIFO this does not update) and frees its run
    /// where `batch` says (see [`FreedBatch`]). `published` is the
    /// queue's publication counter: a chain is published iff the counter has
    /// reached the chain's stamp. Both count chains added over the queue's
    /// life in 64 bits, which no queue exhausts, so a chain held by the device
    /// for any number of later submissions still compares right (a 16- or
    /// 32-bit counter wraps within minutes at millions of requests a second).
    #[inline(always)]
    pub fn complete(
        &mut self,
        id: u32,
        len: u32,
        published: u64,
        batch: &mut FreedBatch,
    ) -> Result<Completed<T>, DeviceError> {
        if id >= u32::from(self.size) {
            return Err(DeviceError::UsedIdOutOfRange { id, queue_size: self.size });
        }
        let i = id as u16;
        let s = self.slot_mut(i);
        let writable = s.writable;
        if s.stamp > published || len > writable {
            return Err(Self::complete_error(s, id, len, published));
        }
        let Some(token) = s.token.take() else {
            return Err(DeviceError::UsedIdNotInFlight { id });
        };
        let ring_descs = s.ring_descs;
        let last = if IDS_ARE_DESCRIPTORS { s.last } else { i };
        self.free_run(i, last, batch);
        self.num_free += self.ids(ring_descs);
        Ok(Completed { token, writable, ring_descs })
    }

    /// Puts the run `head ..= last` back on the free list, after the runs
    /// `batch` freed before it or else at the front (see [`FreedBatch`]).
    #[inline(always)]
    fn free_run(&mut self, head: u16, last: u16, batch: &mut FreedBatch) {
        let slots = self.storage.slots_mut();
        // SAFETY: index invariant (module docs): `head`, `last` and
        // `batch.last` (see `FreedBatch`) are below `size` <= storage length.
        unsafe {
            if batch.last != FreedBatch::NONE {
                let b = batch.last as usize;
                let after = slots.get_unchecked(b).next_free;
                slots.get_unchecked_mut(last as usize).next_free = after;
                slots.get_unchecked_mut(b).next_free = head;
            } else {
                slots.get_unchecked_mut(last as usize).next_free = self.free_head;
                self.free_head = head;
            }
        }
        batch.last = u32::from(last);
    }

    /// Ring descriptors of chain `id` if it is in flight and published
    /// (see [`complete`](Self::complete)); `None` for any other id.
    pub fn published_ring_descs(&self, id: u32, published: u64) -> Option<u16> {
        if id >= u32::from(self.size) {
            return None;
        }
        let s = self.slot(id as u16);
        let published_chain = s.stamp <= published;
        (published_chain && s.token.is_some()).then_some(s.ring_descs)
    }

    /// In-order mode: if `id` is among the `window` chains from age `from`
    /// (0 = the oldest in flight), how many chains from `from` up to and
    /// including it there are, and the ring descriptors they occupy.
    pub fn in_order_span(&self, id: u32, from: u16, window: u16) -> Option<(u16, u32)> {
        let mut descs = 0u32;
        for k in 0..window {
            let head = self.slot(self.fifo_pos(self.fifo_head, from.checked_add(k)?)).fifo;
            descs += u32::from(self.slot(head).ring_descs);
            if u32::from(head) == id {
                return Some((k + 1, descs));
            }
        }
        None
    }

    /// Why `complete` refused chain `id`: not in flight (unpublished or no
    /// chain) takes precedence over a bad length.
    #[cold]
    #[inline(never)]
    fn complete_error(s: &Slot<T>, id: u32, len: u32, published: u64) -> DeviceError {
        if s.stamp > published || s.token.is_none() {
            DeviceError::UsedIdNotInFlight { id }
        } else {
            DeviceError::UsedLenTooLarge { id, len, writable: s.writable }
        }
    }

    #[inline(always)]
    fn fifo_pos(&self, base: u16, age: u16) -> u16 {
        let p = u32::from(base) + u32::from(age);
        let size = u32::from(self.size);
        (if p >= size { p - size } else { p }) as u16
    }

    /// In-order mode: the device used chain `id` and, implicitly, every older
    /// chain. Returns how many chains that is, if `id` is one of the oldest
    /// `window` chains; the caller limits `window` to the published chains
    /// in flight.
    pub fn in_order_batch(&self, id: u32, len: u32, window: u16) -> Result<u16, DeviceError> {
        if id >= u32::from(self.size) {
            return Err(DeviceError::UsedIdOutOfRange { id, queue_size: self.size });
        }
        if window == 0 {
            return Err(DeviceError::UsedIdNotInFlight { id });
        }
        let mut age = 0;
        while age < window {
            let pos = self.fifo_pos(self.fifo_head, age);
            if u32::from(self.slot(pos).fifo) == id {
                let writable = self.slot(id as u16).writable;
                if len > writable {
                    return Err(DeviceError::UsedLenTooLarge { id, len, writable });
                }
                return Ok(age + 1);
            }
            age += 1;
        }
        let expected = u32::from(self.slot(self.fifo_head).fifo);
        Err(DeviceError::UsedOutOfOrder { id, expected })
    }

    /// In-order mode: completes the oldest chain, which `in_order_batch`
    /// showed the device has used. `None` only if nothing is in flight, which
    /// the caller has excluded.
    pub fn complete_oldest(&mut self) -> Option<Completed<T>> {
        if self.num_free == self.size {
            return None;
        }
        let head = self.slot(self.fifo_head).fifo;
        let s = self.slot_mut(head);
        let token = s.token.take()?;
        let done = Completed { token, writable: s.writable, ring_descs: s.ring_descs };
        let last = if IDS_ARE_DESCRIPTORS { s.last } else { head };
        self.fifo_head = self.fifo_pos(self.fifo_head, 1);
        if IDS_ARE_DESCRIPTORS {
            // Split: descriptors must be reused in ring order (§2.7.9 with
            // VIRTIO_F_IN_ORDER), so the run goes to the tail of the list.
            if self.num_free == 0 {
                self.free_head = head;
            } else {
                let tail = self.free_tail;
                self.slot_mut(tail).next_free = head;
            }
            self.free_tail = last;
        } else {
            // Packed: IDs may be reused in any order; one at a time, at the
            // front (no `FreedBatch` across an in-order batch).
            self.free_run(head, last, &mut FreedBatch::new());
        }
        self.num_free += self.ids(done.ring_descs);
        Some(done)
    }
}
