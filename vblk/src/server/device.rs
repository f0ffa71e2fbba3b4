//! The virtio-blk device model: features, config space, request validation and execution, and
//! the `vhost-user-backend` glue that runs one worker thread per queue.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::warn;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringMutex, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use virtio_blk_dev::spec::{
    self, ID_LEN, SECTOR_SIZE, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
    WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_blk_dev::BlkFeatures;
use virtio_queue_core::RingFeatures;
use virtio_transport_api::VirtioFeatures;

use super::disk::Disk;
use super::packed::{self, MemoryViews, PackedRing, MAX_CHAIN};

// Feature bits (virtio 1.2, 5.2.3 and 6), as raw words for the backend traits.
const F_SEG_MAX: u64 = BlkFeatures::SEG_MAX.bits();
const F_RO: u64 = BlkFeatures::RO.bits();
const F_BLK_SIZE: u64 = BlkFeatures::BLK_SIZE.bits();
const F_FLUSH: u64 = BlkFeatures::FLUSH.bits();
const F_MQ: u64 = BlkFeatures::MQ.bits();
const F_DISCARD: u64 = BlkFeatures::DISCARD.bits();
const F_WRITE_ZEROES: u64 = BlkFeatures::WRITE_ZEROES.bits();
const F_RING_INDIRECT_DESC: u64 = VirtioFeatures::INDIRECT_DESC.bits();
const F_RING_EVENT_IDX: u64 = VirtioFeatures::EVENT_IDX.bits();
const F_RING_PACKED: u64 = VirtioFeatures::RING_PACKED.bits();
/// VHOST_USER_F_PROTOCOL_FEATURES (vhost-user, not virtio).
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_VERSION_1: u64 = VirtioFeatures::VERSION_1.bits();

/// Request header size: type, ioprio, sector.
const HEADER_LEN: u64 = spec::HEADER_LEN as u64;
/// Size of one discard / write-zeroes segment: sector, num_sectors, flags.
const SEGMENT_LEN: u64 = spec::SEGMENT_LEN as u64;

/// Limits advertised in the config space.
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
const MAX_DISCARD_SEG: u32 = 32;
const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 22;
const MAX_WRITE_ZEROES_SEG: u32 = 32;
/// Size of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
const CONFIG_LEN: usize = 60;
/// Largest config read accepted (the front-end may ask for a newer, longer structure).
const CONFIG_SPACE_MAX: usize = 256;

/// Device parameters fixed for the lifetime of a server.
#[derive(Debug)]
pub(crate) struct Device {
    pub(crate) disk: Disk,
    pub(crate) queues: u16,
    pub(crate) queue_size: u16,
    pub(crate) read_only: bool,
    /// Offer VIRTIO_F_RING_PACKED.
    pub(crate) packed: bool,
    pub(crate) id: [u8; ID_LEN],
    /// How long a worker keeps looking at its queue after the last request it found (see
    /// `BlkBackend::serve_and_poll`); zero: it re-enables kicks and sleeps at once.
    pub(crate) poll: Duration,
}

impl Device {
    /// Data segments allowed in one request (`seg_max`): the queue size less header and
    /// status, and while packed rings are offered also what one chain of the packed-ring
    /// device model holds (the config is read before the ring format is known).
    pub(crate) fn seg_max(&self) -> u32 {
        let ring = u32::from(self.queue_size).saturating_sub(2).max(1);
        if self.packed {
            ring.min(MAX_CHAIN as u32 - 2)
        } else {
            ring
        }
    }

    /// Virtio feature bits offered to the front-end.
    pub(crate) fn features(&self) -> u64 {
        let mut f = F_VERSION_1
            | F_RING_INDIRECT_DESC
            | F_RING_EVENT_IDX
            | F_PROTOCOL_FEATURES
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | F_MQ;
        if self.packed {
            f |= F_RING_PACKED;
        }
        if self.read_only {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }

    /// The `virtio_blk_config` structure, little-endian.
    pub(crate) fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &self.disk.sectors().to_le_bytes());
        put(12, &self.seg_max().to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &self.queues.to_le_bytes());
        if !self.read_only {
            put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(40, &MAX_DISCARD_SEG.to_le_bytes());
            put(44, &1u32.to_le_bytes());
            put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
            put(52, &MAX_WRITE_ZEROES_SEG.to_le_bytes());
            put(56, &[1u8]);
        }
        c
    }
}

/// One buffer of a request, copied out of the ring (either format): what the request
/// executor works on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Desc {
    /// Guest address of the buffer.
    pub(crate) addr: GuestAddress,
    /// Length in bytes.
    pub(crate) len: u32,
    /// Device-writable.
    pub(crate) write: bool,
}

/// Why a request failed, mapped to its status byte.
enum Fail {
    IoErr,
    Unsupp,
}

impl From<Fail> for u8 {
    fn from(f: Fail) -> u8 {
        match f {
            Fail::IoErr => S_IOERR,
            Fail::Unsupp => S_UNSUPP,
        }
    }
}

type GM = GuestMemoryAtomic<GuestMemoryMmap>;

/// Whether the driver's `used_event` (EVENT_IDX, virtio 1.2 §2.7.10) lies in `[old, next)`,
/// the used entries added since the device last looked: read without a fence, so only a
/// hint that `needs_notification` should look; a failed read says no (the end-of-pass look
/// reports it).
fn used_event_passed(q: &virtio_queue::Queue, mem: &GuestMemoryMmap, old: u16, next: u16) -> bool {
    // `used_event` follows the avail ring's `size` entries and 4-byte header.
    let at = q.avail_ring().checked_add(4 + 2 * u64::from(q.size()));
    let Some(event) = at.and_then(|a| mem.load::<u16>(GuestAddress(a), Ordering::Relaxed).ok()) else {
        return false;
    };
    let event = u16::from_le(event);
    next.wrapping_sub(event).wrapping_sub(1) < next.wrapping_sub(old)
}

/// What one pass over a queue does once it has served what it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Leave kicks off: the worker is polling and looks again soon.
    Poll,
    /// Ask for kicks again and look once more, so nothing published meanwhile is missed:
    /// the worker is about to sleep.
    Rearm,
}

/// What a queue's worker keeps between events.
struct QueueState {
    /// Descriptor scratch space, reused across requests.
    descs: Vec<Desc>,
    /// Packed rings: where the ring stands (`None` until the first event after set-up).
    packed: Option<PackedRing>,
    /// Packed rings: device-model views of the current memory table.
    views: Option<MemoryViews>,
}

/// State of one front-end connection.
struct Connection {
    mem: GM,
    acked: AtomicU64,
    event_idx: AtomicBool,
    /// Per-queue worker state (one queue per worker thread).
    queues: Vec<Mutex<QueueState>>,
}

/// The `VhostUserBackend` for one connection; cloned into every worker thread.
#[derive(Clone)]
pub(crate) struct BlkBackend {
    dev: Arc<Device>,
    conn: Arc<Connection>,
}

impl BlkBackend {
    pub(crate) fn new(dev: Arc<Device>, mem: GM) -> Self {
        // Header, `seg_max` data buffers, status, and one more, which is how a split chain
        // that is too long shows itself (`handle_chain`).
        let max = dev.seg_max() as usize + 3;
        let queues = (0..dev.queues)
            .map(|_| Mutex::new(QueueState { descs: Vec::with_capacity(max), packed: None, views: None }))
            .collect();
        BlkBackend {
            dev,
            conn: Arc::new(Connection { mem, acked: AtomicU64::new(0), event_idx: AtomicBool::new(false), queues }),
        }
    }

    fn acked(&self, feature: u64) -> bool {
        self.conn.acked.load(Ordering::Relaxed) & feature != 0
    }

    /// Forgets where the packed ring of queue `index` (or of every queue) stands: the next
    /// event starts from the queue state the front-end set up again.
    fn forget_packed(&self, index: Option<usize>) {
        for (i, q) in self.conn.queues.iter().enumerate() {
            if index.is_none_or(|n| n == i) {
                q.lock().unwrap_or_else(|p| p.into_inner()).packed = None;
            }
        }
    }

    /// Serves one pass of this worker's queue (see [`Pass`]); returns the requests served.
    /// `kicks_on`: kicks may be enabled, so the pass suppresses them before it serves. A
    /// pass after a [`Pass::Poll`] finds them off already and does not write the ring's
    /// suppression field again: the driver reads it, and split rings without EVENT_IDX keep
    /// it in the line of `used.idx`, which a polling driver reads all the time.
    fn process(&self, vring: &VringMutex, thread_id: usize, pass: Pass, kicks_on: bool) -> io::Result<usize> {
        let Some(q) = self.conn.queues.get(thread_id) else {
            return Ok(0);
        };
        let mut q = q.lock().unwrap_or_else(|p| p.into_inner());
        if self.acked(F_RING_PACKED) {
            self.process_packed(vring, &mut q, pass, kicks_on)
        } else {
            self.process_split(vring, &mut q.descs, pass, kicks_on)
        }
    }

    /// Serves one packed queue through the device model, building its memory views again
    /// whenever the front-end changed the memory table under a pass.
    fn process_packed(&self, vring: &VringMutex, q: &mut QueueState, pass: Pass, kicks_on: bool) -> io::Result<usize> {
        let features = RingFeatures::from_bits_truncate(self.conn.acked.load(Ordering::Relaxed));
        let QueueState { descs, packed, views } = q;
        let mut served = 0;
        let mut kicks_on = kicks_on;
        loop {
            let current = MemoryViews::current(views, &self.conn.mem);
            let mut state = vring.get_mut();
            let p = packed::process(
                packed,
                current,
                &self.conn.mem,
                &mut state,
                features,
                descs,
                (pass, kicks_on),
                |mem, d| self.serve(mem, d),
            )?;
            served += p.served;
            if !p.stale {
                return Ok(served);
            }
            // A stale pass stops before it asks for kicks again.
            kicks_on = false;
        }
    }

    /// Pops and completes every available chain of one split queue, with kicks suppressed
    /// while it does (EVENT_IDX: `avail_event` is left behind; otherwise NO_NOTIFY); returns
    /// how many. [`Pass::Rearm`] then asks for kicks again and looks once more, and goes on
    /// until a look after the request finds nothing, so a request the driver published
    /// without kicking is never left behind; [`Pass::Poll`] leaves kicks off (the worker
    /// looks again soon).
    fn process_split(
        &self,
        vring: &VringMutex,
        descs: &mut Vec<Desc>,
        pass: Pass,
        kicks_on: bool,
    ) -> io::Result<usize> {
        let mut state = vring.get_mut();
        let event_idx = self.conn.event_idx.load(Ordering::Relaxed);
        let mut served = 0;
        let mut kicks_on = kicks_on;
        loop {
            if kicks_on {
                state.disable_notification().map_err(io::Error::other)?;
            }
            // Used entries added since `needs_notification` last looked (it resets its count).
            let mut unannounced = false;
            // `next_used` when it did.
            let mut announced_at = state.get_queue().next_used();
            'rounds: loop {
                // The memory table is taken after the requests are seen, never before: a
                // front-end adds the memory a request uses (ADD_MEM_REG, acknowledged)
                // before it publishes the request, so a table taken after the acquire load
                // of `avail.idx` holds it, while one taken earlier (before this thread was
                // preempted, say) may not, and the request would fail with an I/O error.
                // So each round serves the requests published up to the index it read.
                let q = state.get_queue();
                let avail = q.avail_idx(&*self.conn.mem.memory(), Ordering::Acquire).map_err(io::Error::other)?;
                let ready = avail.0.wrapping_sub(q.next_avail());
                if ready == 0 {
                    break;
                }
                let guard = self.conn.mem.memory();
                let mem: &GuestMemoryMmap = &guard;
                for _ in 0..ready {
                    // An index more than a ring ahead pops nothing: the pass ends.
                    let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) else { break 'rounds };
                    let head = chain.head_index();
                    let used = self.handle_chain(mem, chain, descs);
                    state.add_used(head, used).map_err(io::Error::other)?;
                    served += 1;
                    unannounced = true;
                    // With EVENT_IDX the driver says after which used entry it wants to hear
                    // (`used_event`): look after each one, as qemu does, so a driver that
                    // asked for the middle of a batch hears then and refills the queue while
                    // the rest is served, instead of after the whole pass. The look here is
                    // a plain read; the fenced one (`needs_notification`) runs when it says
                    // yes and at the end of the pass, which is what makes a wake-up
                    // impossible to miss.
                    let next = state.get_queue().next_used();
                    if event_idx && used_event_passed(state.get_queue(), mem, announced_at, next) {
                        announced_at = next;
                        unannounced = false;
                        if state.needs_notification().map_err(io::Error::other)? {
                            state.signal_used_queue()?;
                        }
                    }
                }
            }
            if unannounced && state.needs_notification().map_err(io::Error::other)? {
                state.signal_used_queue()?;
            }
            if pass == Pass::Poll || !state.enable_notification().map_err(io::Error::other)? {
                return Ok(served);
            }
            kicks_on = true;
        }
    }

    /// What a kick starts: serves the queue, then, with a poll window
    /// ([`Device::poll`]), keeps looking at it with kicks off until the window has passed
    /// since the last request found, then asks for kicks again and sleeps (back in the
    /// worker's epoll loop). As qemu's adaptive polling does, this spares a driver that
    /// answers within the window its kick, a system call that would wake this thread, and
    /// the thread the wake-up: measured with `cargo xtask compare --backend serve` (see
    /// vblk/README.md). The locks are taken per pass, so the front-end's control messages
    /// get in between, and each pass sees the current memory table.
    fn serve_and_poll(&self, vring: &VringMutex, thread_id: usize) -> io::Result<()> {
        let poll = self.dev.poll;
        // A kick woke the worker, so kicks are on: the last pass before it slept asked for them.
        if poll.is_zero() {
            return self.process(vring, thread_id, Pass::Rearm, true).map(drop);
        }
        let mut until = Instant::now() + poll;
        let mut kicks_on = true;
        loop {
            let served = self.process(vring, thread_id, Pass::Poll, kicks_on)?;
            kicks_on = false;
            let now = Instant::now();
            if served > 0 {
                until = now + poll;
            } else if now >= until {
                if self.process(vring, thread_id, Pass::Rearm, false)? == 0 {
                    return Ok(());
                }
                kicks_on = true;
                until = now + poll;
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Copies a split-ring chain's buffers into `descs` and serves the request.
    fn handle_chain(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        descs: &mut Vec<Desc>,
    ) -> u32 {
        // One more than allowed is enough for `serve` to see the chain is too long.
        let max = self.dev.seg_max() as usize + 3;
        descs.clear();
        descs.extend(chain.take(max).map(|d| Desc { addr: d.addr(), len: d.len(), write: d.is_write_only() }));
        self.serve(mem, descs)
    }

    /// The request executor of both ring formats: validates and executes the request made
    /// of buffers `descs` (in chain order); returns the bytes written to its writable buffers.
    /// Guest input never panics here: every failure becomes a status byte, or, if there is no
    /// writable status byte to carry it (or the chain is longer than `seg_max` allows), a used
    /// length of 0.
    fn serve(&self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u32 {
        let too_long = descs.len() > self.dev.seg_max() as usize + 2;
        let first_write = descs.iter().position(|d| d.write).unwrap_or(descs.len());
        let misordered = descs.iter().skip(first_write).any(|d| !d.write);
        let status_addr = match descs.last() {
            Some(last) if last.write && last.len >= 1 && !too_long => {
                last.addr.0.checked_add(u64::from(last.len) - 1).map(GuestAddress)
            }
            _ => None,
        };
        let Some(status_addr) = status_addr else {
            warn!("request without a writable status byte (or too many descriptors): dropped");
            return 0;
        };
        let (status, written) = if misordered {
            (S_IOERR, 0)
        } else {
            match self.execute(mem, descs) {
                Ok(written) => (S_OK, written),
                Err(f) => (f.into(), 0),
            }
        };
        if mem.write_obj(status, status_addr).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }

    fn execute(&self, mem: &GuestMemoryMmap, descs: &[Desc]) -> Result<u32, Fail> {
        let split = descs.iter().position(|d| d.write).unwrap_or(descs.len());
        let (rd, wr) = descs.split_at(split);
        let rd_len: u64 = rd.iter().map(|d| u64::from(d.len)).sum();
        // The status byte is the last writable byte; what precedes it is the data-in area.
        let wr_len: u64 = wr.iter().map(|d| u64::from(d.len)).sum::<u64>() - 1;
        if rd_len < HEADER_LEN {
            return Err(Fail::IoErr);
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        gather(mem, rd, 0, &mut hdr).map_err(|_| Fail::IoErr)?;
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = hdr;
        let kind = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let out_len = rd_len - HEADER_LEN;
        let disk = &self.dev.disk;
        match kind {
            T_IN => {
                if out_len != 0 || wr_len % SECTOR_SIZE != 0 || !disk.in_range(sector, wr_len / SECTOR_SIZE) {
                    return Err(Fail::IoErr);
                }
                let mut offset = sector * SECTOR_SIZE;
                for_each_segment(wr, 0, wr_len, |addr, len| {
                    disk.read_to_guest(mem, addr, len, offset)?;
                    offset += len as u64;
                    Ok(())
                })
                .map_err(|e| io_fail("read", e))?;
                u32::try_from(wr_len).map_err(|_| Fail::IoErr)
            }
            T_OUT => {
                if self.dev.read_only
                    || wr_len != 0
                    || out_len % SECTOR_SIZE != 0
                    || !disk.in_range(sector, out_len / SECTOR_SIZE)
                {
                    return Err(Fail::IoErr);
                }
                let mut offset = sector * SECTOR_SIZE;
                for_each_segment(rd, HEADER_LEN, out_len, |addr, len| {
                    disk.write_from_guest(mem, addr, len, offset)?;
                    offset += len as u64;
                    Ok(())
                })
                .map_err(|e| io_fail("write", e))?;
                Ok(0)
            }
            T_FLUSH => {
                if !self.acked(F_FLUSH) {
                    return Err(Fail::Unsupp);
                }
                disk.flush().map_err(|e| io_fail("flush", e))?;
                Ok(0)
            }
            T_GET_ID => {
                if out_len != 0 {
                    return Err(Fail::IoErr);
                }
                let n = wr_len.min(ID_LEN as u64);
                let mut src = &self.dev.id[..n as usize];
                for_each_segment(wr, 0, n, |addr, len| {
                    let (now, rest) = src.split_at_checked(len).ok_or_else(|| io::Error::other("id overrun"))?;
                    mem.write_slice(now, addr).map_err(io::Error::other)?;
                    src = rest;
                    Ok(())
                })
                .map_err(|_| Fail::IoErr)?;
                Ok(n as u32)
            }
            T_DISCARD | T_WRITE_ZEROES => {
                let discard = kind == T_DISCARD;
                let (feature, max_seg, max_sectors) = if discard {
                    (F_DISCARD, MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
                } else {
                    (F_WRITE_ZEROES, MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
                };
                if !self.acked(feature) {
                    return Err(Fail::Unsupp);
                }
                if self.dev.read_only || wr_len != 0 || out_len == 0 || out_len % SEGMENT_LEN != 0 {
                    return Err(Fail::IoErr);
                }
                let count = out_len / SEGMENT_LEN;
                if count > u64::from(max_seg) {
                    return Err(Fail::IoErr);
                }
                // Validate every segment before touching the disk.
                for i in 0..count {
                    let (start, num, flags) = segment(mem, rd, i)?;
                    let allowed = if discard { 0 } else { WRITE_ZEROES_FLAG_UNMAP };
                    if flags & !allowed != 0 {
                        return Err(Fail::Unsupp);
                    }
                    if num > max_sectors || !disk.in_range(start, u64::from(num)) {
                        return Err(Fail::IoErr);
                    }
                }
                for i in 0..count {
                    let (start, num, flags) = segment(mem, rd, i)?;
                    let (off, len) = (start * SECTOR_SIZE, u64::from(num) * SECTOR_SIZE);
                    if discard {
                        // Discard is a hint: storage that cannot punch holes keeps the data.
                        let _ = disk.punch_hole(off, len);
                    } else {
                        disk.write_zeroes(off, len, flags & WRITE_ZEROES_FLAG_UNMAP != 0)
                            .map_err(|e| io_fail("write-zeroes", e))?;
                    }
                }
                Ok(0)
            }
            _ => Err(Fail::Unsupp),
        }
    }
}

fn io_fail(what: &str, e: io::Error) -> Fail {
    warn!("{what} failed: {e}");
    Fail::IoErr
}

/// Reads discard / write-zeroes segment `i` from the readable buffers.
fn segment(mem: &GuestMemoryMmap, rd: &[Desc], i: u64) -> Result<(u64, u32, u32), Fail> {
    let mut b = [0u8; SEGMENT_LEN as usize];
    gather(mem, rd, HEADER_LEN + i * SEGMENT_LEN, &mut b).map_err(|_| Fail::IoErr)?;
    let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = b;
    Ok((
        u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        u32::from_le_bytes([n0, n1, n2, n3]),
        u32::from_le_bytes([f0, f1, f2, f3]),
    ))
}

/// Copies `buf.len()` bytes starting `skip` bytes into the buffers `descs`.
fn gather(mem: &GuestMemoryMmap, descs: &[Desc], skip: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0usize;
    for_each_segment(descs, skip, buf.len() as u64, |addr, len| {
        let dst = buf.get_mut(filled..filled + len).ok_or_else(|| io::Error::other("segment overrun"))?;
        mem.read_slice(dst, addr).map_err(io::Error::other)?;
        filled += len;
        Ok(())
    })
}

/// Calls `f(address, length)` for each piece of the byte range `skip .. skip + len` of the
/// concatenated buffers `descs`. Fails if the buffers are shorter or an address overflows.
fn for_each_segment(
    descs: &[Desc],
    mut skip: u64,
    len: u64,
    mut f: impl FnMut(GuestAddress, usize) -> io::Result<()>,
) -> io::Result<()> {
    let mut left = len;
    for d in descs {
        if left == 0 {
            break;
        }
        let dlen = u64::from(d.len);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let n = (dlen - skip).min(left);
        let addr = d.addr.0.checked_add(skip).ok_or_else(|| io::Error::other("address overflow"))?;
        f(GuestAddress(addr), n as usize)?;
        left -= n;
        skip = 0;
    }
    if left != 0 {
        return Err(io::Error::other("buffers shorter than the request"));
    }
    Ok(())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        usize::from(self.dev.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev.queue_size)
    }

    fn features(&self) -> u64 {
        self.dev.features()
    }

    fn acked_features(&self, features: u64) {
        self.conn.acked.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        self.conn.acked.store(0, Ordering::Relaxed);
        self.conn.event_idx.store(false, Ordering::Relaxed);
        self.forget_packed(None);
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE stopped the ring; it reports the avail position `process_packed`
        // stored in the queue state. A ring started again begins from its new base.
        self.forget_packed(Some(queue_index as usize));
        Ok(())
    }

    fn set_event_idx(&self, enabled: bool) {
        self.conn.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (offset, size) = (offset as usize, size as usize);
        if offset.saturating_add(size) > CONFIG_SPACE_MAX {
            return Vec::new();
        }
        let config = self.dev.config();
        let mut out = vec![0u8; size];
        if let Some(src) = config.get(offset..) {
            let n = src.len().min(size);
            out[..n].copy_from_slice(&src[..n]);
        }
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "virtio-blk config space is read-only"))
    }

    fn update_memory(&self, _mem: GM) -> io::Result<()> {
        // `self.conn.mem` is the same atomic handle the vhost-user handler updates.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.dev.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringMutex],
        thread_id: usize,
    ) -> io::Result<()> {
        // Each worker owns exactly one queue; `device_event` indexes this worker's vrings.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        if let Err(e) = self.serve_and_poll(vring, thread_id) {
            // A queue the driver broke (bad ring addresses) stops; the worker stays alive.
            warn!("queue {thread_id}: {e}");
        }
        Ok(())
    }
}
