//! Submission: the request header and status preset in the request's areas,
//! the chain, and publishing a batch.
//!
//! A request takes the id its chain will have (see [`super::Requests`]),
//! writes its area, records its state, and adds its chain with the id as
//! token; if the ring refuses the chain, its buffers go back to the caller
//! and the id stays free.

use virtio_queue_core::{Buffer, DriverQueue, Virtqueue};
use virtio_transport_api::{Notifier, Transport};

use super::{BlkQueue, Bufs, Rejected, RequestKind};
use crate::buf::DmaBuf;
use crate::config::BlkFeatures;
use crate::error::{BlkError, Result};
use crate::spec::{
    segment as seg_bytes, HEADER_LEN, ID_LEN, SECTOR_SIZE, SEGMENT_LEN, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_SECURE_ERASE, T_WRITE_ZEROES, WRITE_ZEROES_FLAG_UNMAP,
};

/// The data buffers of a request being enqueued by [`BlkQueue::enqueue`].
pub(super) enum Data<'a> {
    /// No data (flush, get-id, discard-like).
    None,
    /// One device address (raw submissions, the bounce buffer).
    Raw(Buffer),
    /// Several caller buffers (readv, writev).
    Many(&'a [DmaBuf]),
}

/// The body of [`BlkQueue::submit_one`] once the request passed
/// [`super::validate::FastLimits::one_ok`], on the core queue `$q` (split or
/// packed) whose framed chains `$add` adds (`add_framed_direct` or
/// `add_framed_indirect`, as the queue lays them out): take the id, write the
/// header, record the state (the buffer moves once, into it), add the framed
/// chain. Returns from the enclosing function if the ring is full or refuses
/// the chain.
macro_rules! one_on_ring {
    ($self:ident, $q:ident, $add:ident, $offset:ident, $buf:ident, $len:ident, $tag:ident, $write:ident) => {{
        // `len` fits in 32 bits (checked by `one_ok`).
        let data = Buffer::new($buf.iova(), $len as u32);
        let Some(id) = $q.next_id() else {
            return Err(Rejected { error: BlkError::QueueFull, bufs: $buf });
        };
        // Rewritten by the next request on `id` if the chain is refused.
        // SAFETY: `id` is what `next_id` of the core queue returned.
        unsafe { $self.areas.write_header(id, if $write { T_OUT } else { T_IN }, $offset / SECTOR_SIZE, false) };
        // SAFETY: `id` is what `next_id` of the core queue returned.
        let r = unsafe { $self.reqs.ring_id(id) };
        r.tag = $tag;
        r.kind = if $write { RequestKind::Write } else { RequestKind::Read };
        r.internal = false;
        // A free id's buffers are always `Bufs::None` (see `ReqState`):
        // there is nothing to drop, so skip the drop check. Were it not so,
        // the old buffers would be leaked, never freed while the device may
        // use them.
        std::mem::forget(std::mem::replace(&mut r.bufs, Bufs::One($buf)));
        if let Err(e) = $q.$add(data, !$write, id) {
            return Err($self.refused_one(id, e.error));
        }
        $self.unpublished = true;
    }};
}

impl<T: Transport> BlkQueue<T> {
    /// A one-buffer read or write: the hot path. Every check in one branch
    /// ([`super::validate::FastLimits::one_ok`], which also refuses everything
    /// once the queue failed), then one dispatch on the ring format for both
    /// the id and the framed chain (header and status in the request's area,
    /// see `BlkQueue::new`). The header and the request's state (the buffer
    /// moves once, into it) are written before the chain is added: the
    /// device sees nothing until `publish`, and few values stay live across
    /// the add. If the ring refuses the chain the buffer comes back out.
    #[inline(always)]
    fn submit_one(&mut self, offset: u64, buf: DmaBuf, tag: u64, write: bool) -> Result<(), Rejected<DmaBuf>> {
        let len = buf.len() as u64;
        if !self.fast.one_ok(offset, len, write) {
            return self.submit_one_slow(offset, buf, write);
        }
        match &mut self.vq {
            Virtqueue::Split(q) => one_on_ring!(self, q, add_framed, offset, buf, len, tag, write),
            Virtqueue::Packed(q) => one_on_ring!(self, q, add_framed, offset, buf, len, tag, write),
        };
        self.unpublished = true;
        Ok(())
    }

    /// [`BlkQueue::submit_reads`] and [`BlkQueue::submit_writes`]: one
    /// dispatch on the ring format and the framed chains' layout for the whole
    /// batch, then per request what [`BlkQueue::submit_one`] does.
    #[inline(always)]
    fn submit_batch<I>(&mut self, reqs: I, write: bool) -> Result<(), Rejected<DmaBuf>>
    where
        I: IntoIterator<Item = (u64, DmaBuf, u64)>,
    {
        macro_rules! batch_on_ring {
            ($q:ident, $add:ident) => {{
                for (offset, buf, tag) in reqs {
                    let len = buf.len() as u64;
                    if !self.fast.one_ok(offset, len, write) {
                        return self.submit_one_slow(offset, buf, write);
                    }
                    one_on_ring!(self, $q, $add, offset, buf, len, tag, write);
                }
            }};
        }
        match &mut self.vq {
            Virtqueue::Split(q) if q.framed_chains_indirect() => batch_on_ring!(q, add_framed_indirect),
            Virtqueue::Split(q) => batch_on_ring!(q, add_framed_direct),
            Virtqueue::Packed(q) if q.framed_chains_indirect() => batch_on_ring!(q, add_framed_indirect),
            Virtqueue::Packed(q) => batch_on_ring!(q, add_framed_direct),
        }
        Ok(())
    }

    /// The ring refused the chain of the one-buffer request `id`: its buffer
    /// goes back to the caller.
    #[cold]
    #[inline(never)]
    fn refused_one(&mut self, id: u16, e: virtio_queue_core::Error) -> Rejected<DmaBuf> {
        let bufs = self.reqs.state.get_mut(id as usize).map(|r| std::mem::take(&mut r.bufs));
        match bufs {
            Some(Bufs::One(buf)) => Self::refused(e, buf),
            // Not reached: the buffer was stored under `id` just before.
            _ => unreachable!("the buffer of a refused request is in its state"),
        }
    }

    /// [`BlkQueue::submit_one`] when a check fails or the queue failed: the
    /// checks one by one, for the error.
    #[cold]
    #[inline(never)]
    fn submit_one_slow(&mut self, offset: u64, buf: DmaBuf, write: bool) -> Result<(), Rejected<DmaBuf>> {
        let error = match self.check_one(offset, buf.len() as u64, write).and_then(|()| self.take_id()) {
            // Not reached: a request that passes every check on a queue that
            // has not failed takes the fast path.
            Ok(_) => BlkError::QueueFull,
            Err(e) => e,
        };
        Err(Rejected { error, bufs: buf })
    }

    /// A free id, if the queue is usable and not full.
    fn take_id(&mut self) -> Result<u16> {
        self.check_live()?;
        self.vq.next_id().ok_or(BlkError::QueueFull)
    }

    /// The ring refused a chain (the core queue is as before: its id is
    /// still free).
    #[cold]
    #[inline(never)]
    fn refused<B>(e: virtio_queue_core::Error, bufs: B) -> Rejected<B> {
        Rejected { error: BlkError::from(e), bufs }
    }

    /// Adds any request: header, `data` (device-readable for a write, else
    /// device-writable), the discard-like `segment`, the ID buffer of a
    /// GET_ID and the status byte. Returns its id; its buffers, if any, are
    /// attached by the caller with [`BlkQueue::attach`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn enqueue(
        &mut self,
        kind: RequestKind,
        ty: u32,
        sector: u64,
        data: Data<'_>,
        segment: Option<(u64, u32, u32)>,
        tag: u64,
        internal: bool,
    ) -> Result<u16> {
        let id = self.take_id()?;
        // SAFETY: `take_id` returns what `next_id` of the core queue returned.
        unsafe { self.areas.write_header(id, ty, sector, kind == RequestKind::GetId) };
        let write = kind == RequestKind::Write;
        let (readable, writable) = (&mut self.readable, &mut self.writable);
        readable.clear();
        writable.clear();
        readable.push(Buffer::new(self.areas.header_iova(id), HEADER_LEN as u32));
        let dir = if write { &mut *readable } else { &mut *writable };
        match data {
            Data::None => {}
            Data::Raw(b) => dir.push(b),
            Data::Many(bufs) => dir.extend(bufs.iter().map(|b| Buffer::new(b.iova(), b.len() as u32))),
        }
        if let Some((s, n, flags)) = segment {
            let iova = self.areas.write_segment(id, &seg_bytes(s, n, flags));
            readable.push(Buffer::new(iova, SEGMENT_LEN as u32));
        }
        if kind == RequestKind::GetId {
            writable.push(Buffer::new(self.areas.id_iova(id), ID_LEN as u32));
        }
        writable.push(Buffer::new(self.areas.status_iova(id), 1));
        if let Err(e) = self.vq.add(readable, writable, id) {
            return Err(Self::refused(e.error, ()).error);
        }
        self.unpublished = true;
        if let Some(r) = self.reqs.state.get_mut(id as usize) {
            r.tag = tag;
            r.kind = kind;
            r.internal = internal;
        }
        Ok(id)
    }

    /// Hands `bufs` to request `id`, which [`BlkQueue::enqueue`] just added.
    fn attach(&mut self, id: u16, bufs: Bufs) {
        if let Some(r) = self.reqs.state.get_mut(id as usize) {
            r.bufs = bufs;
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
            let total = self.check_segments(&bufs)?;
            self.check_range(offset, total)
        };
        if let Err(error) = checks() {
            return Err(Rejected { error, bufs });
        }
        let (kind, ty) = if write { (RequestKind::Write, T_OUT) } else { (RequestKind::Read, T_IN) };
        match self.enqueue(kind, ty, offset / SECTOR_SIZE, Data::Many(&bufs), None, tag, false) {
            Ok(id) => {
                self.attach(id, Bufs::Many(bufs));
                Ok(())
            }
            Err(error) => Err(Rejected { error, bufs }),
        }
    }

    /// Reads `buf.len()` bytes at byte `offset` into `buf`. The buffer comes
    /// back in the [`super::Completion`] (or with the error if it was refused).
    #[inline]
    pub fn submit_read(&mut self, offset: u64, buf: DmaBuf, tag: u64) -> Result<(), Rejected<DmaBuf>> {
        self.submit_one(offset, buf, tag, false)
    }

    /// Writes `buf` at byte `offset`.
    #[inline]
    pub fn submit_write(&mut self, offset: u64, buf: DmaBuf, tag: u64) -> Result<(), Rejected<DmaBuf>> {
        self.submit_one(offset, buf, tag, true)
    }

    /// Submits a batch of one-buffer reads, each `(offset, buf, tag)` as for
    /// [`BlkQueue::submit_read`], in order, until `reqs` is empty. The ring
    /// format is dispatched once per call instead of once per request: the
    /// cheaper way to fill a deep queue. Each request is checked as by
    /// `submit_read`; the first one refused stops the batch and comes back
    /// with its buffer and the error, the requests before it stay submitted
    /// and those after it are not taken from the iterator (pass
    /// `iter.by_ref()` to keep them). Nothing is published.
    ///
    /// ```
    /// use virtio_blk_dev::{BlkError, BlkQueue, DmaBuf};
    /// use virtio_transport_api::Transport;
    ///
    /// /// Reads consecutive blocks into `bufs`, tagged by their index.
    /// fn read_blocks<T: Transport>(q: &mut BlkQueue<T>, bufs: Vec<DmaBuf>) -> Result<(), BlkError> {
    ///     let mut offset = 0;
    ///     let reqs = bufs.into_iter().enumerate().map(|(i, b)| {
    ///         let at = offset;
    ///         offset += b.len() as u64;
    ///         (at, b, i as u64)
    ///     });
    ///     q.submit_reads(reqs).map_err(|r| r.error)?;
    ///     q.publish()
    /// }
    /// ```
    #[inline]
    pub fn submit_reads<I>(&mut self, reqs: I) -> Result<(), Rejected<DmaBuf>>
    where
        I: IntoIterator<Item = (u64, DmaBuf, u64)>,
    {
        self.submit_batch(reqs, false)
    }

    /// Submits a batch of one-buffer writes, each `(offset, buf, tag)` as for
    /// [`BlkQueue::submit_write`]; otherwise as [`BlkQueue::submit_reads`].
    #[inline]
    pub fn submit_writes<I>(&mut self, reqs: I) -> Result<(), Rejected<DmaBuf>>
    where
        I: IntoIterator<Item = (u64, DmaBuf, u64)>,
    {
        self.submit_batch(reqs, true)
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
    /// Rust references, until the [`super::Completion`] with `tag` has been
    /// returned by [`BlkQueue::poll`] or [`BlkQueue::wait`]. If the queue is
    /// dropped first, until the transport is dropped or the device reset.
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
        self.check_one(offset, len.into(), write)?;
        self.enqueue_data(write, offset, Buffer::new(iova, len), tag, false).map(drop)
    }

    /// Adds a read or write of the device memory `data` at byte `offset`
    /// (raw submissions and the bounce buffer).
    pub(super) fn enqueue_data(
        &mut self,
        write: bool,
        offset: u64,
        data: Buffer,
        tag: u64,
        internal: bool,
    ) -> Result<u16> {
        let (kind, ty) = if write { (RequestKind::Write, T_OUT) } else { (RequestKind::Read, T_IN) };
        self.enqueue(kind, ty, offset / SECTOR_SIZE, Data::Raw(data), None, tag, internal)
    }

    /// Flushes the device's write cache (VIRTIO_BLK_F_FLUSH).
    pub fn submit_flush(&mut self, tag: u64) -> Result<()> {
        self.check_feature(BlkFeatures::FLUSH)?;
        self.enqueue(RequestKind::Flush, T_FLUSH, 0, Data::None, None, tag, false).map(drop)
    }

    /// Asks for the device ID (20 bytes, in [`super::Completion::id`]).
    pub fn submit_get_id(&mut self, tag: u64) -> Result<()> {
        self.enqueue(RequestKind::GetId, T_GET_ID, 0, Data::None, None, tag, false).map(drop)
    }

    /// Discards `len` bytes at byte `offset` (VIRTIO_BLK_F_DISCARD).
    pub fn submit_discard(&mut self, offset: u64, len: u64, tag: u64) -> Result<()> {
        self.check_discard_like(offset, len, BlkFeatures::DISCARD, self.limits.max_discard_sectors)?;
        let seg = (offset / SECTOR_SIZE, (len / SECTOR_SIZE) as u32, 0);
        self.enqueue(RequestKind::Discard, T_DISCARD, 0, Data::None, Some(seg), tag, false).map(drop)
    }

    /// Writes zeroes over `len` bytes at byte `offset`, letting the device
    /// deallocate them if `unmap` (VIRTIO_BLK_F_WRITE_ZEROES).
    pub fn submit_write_zeroes(&mut self, offset: u64, len: u64, unmap: bool, tag: u64) -> Result<()> {
        self.check_discard_like(offset, len, BlkFeatures::WRITE_ZEROES, self.limits.max_write_zeroes_sectors)?;
        let flags = if unmap { WRITE_ZEROES_FLAG_UNMAP } else { 0 };
        let seg = (offset / SECTOR_SIZE, (len / SECTOR_SIZE) as u32, flags);
        self.enqueue(RequestKind::WriteZeroes, T_WRITE_ZEROES, 0, Data::None, Some(seg), tag, false).map(drop)
    }

    /// Securely erases `len` bytes at byte `offset` (VIRTIO_BLK_F_SECURE_ERASE).
    pub fn submit_secure_erase(&mut self, offset: u64, len: u64, tag: u64) -> Result<()> {
        self.check_discard_like(offset, len, BlkFeatures::SECURE_ERASE, self.limits.max_secure_erase_sectors)?;
        let seg = (offset / SECTOR_SIZE, (len / SECTOR_SIZE) as u32, 0);
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
}
