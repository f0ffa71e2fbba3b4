//! Loom models of the driver queues against the device model, both formats.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 CARGO_TARGET_DIR=target/loom
//! cargo test -p virtio-queue-core --features device-model --test loom --release`.
//!
//! Under `cfg(loom)` the index and flag fields of ring memory are loom
//! atomics and every data field (descriptor, ring entry, used element) is a
//! `loom::cell::UnsafeCell`, so each model runs the real queue code and loom
//! reports a causality violation whenever one side reads data the other side
//! has not published with a release/acquire pair. On top of that each model
//! asserts one protocol property:
//!
//! * `publication_*`: the device sees exactly the buffers the driver added
//!   (direct and indirect chains), and the driver gets every chain back.
//! * `kick_*`: no lost available-buffer notification. A device that re-enables
//!   notifications and re-checks before it sleeps either saw every chain, or
//!   the publish that made the first chain it missed returned "kick".
//! * `used_notify_*`: no lost used-buffer notification, the mirror image on the
//!   driver side (`enable_used_notifications`, and the delayed variant).
#![cfg(loom)]

use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use loom::thread;
use virtio_queue_core::device::{AvailChain, DescInfo, DeviceConfig, MemoryRegion, PackedDevice, SplitDevice};
use virtio_queue_core::{
    Buffer, ChainFrame, DriverQueue, IndirectTables, QueueConfig, RingFeatures, RingFormat, RingLayout, SharedLine,
    SharedMemory, Slot, Used, Virtqueue,
};

/// Device address of the ring area.
const RING_IOVA: u64 = 0x1000;
/// Device address of the indirect tables.
const TABLE_IOVA: u64 = 0x10_0000;
/// Descriptors per indirect table.
const TABLE_ENTRIES: u16 = 4;

/// Shared memory lines that can be handed to the device thread.
struct Lines(Vec<SharedLine>);

impl Lines {
    /// Lines holding `bytes` bytes.
    fn new(bytes: usize) -> Arc<Self> {
        Arc::new(Lines((0..bytes.div_ceil(SharedLine::BYTES)).map(|_| SharedLine::new()).collect()))
    }

    fn mem(&self) -> SharedMemory<'_> {
        SharedMemory::new(&self.0)
    }
}

/// The memory of one model run: the ring and, with INDIRECT_DESC, the tables.
struct Setup {
    layout: RingLayout,
    features: RingFeatures,
    ring: Arc<Lines>,
    tables: Option<Arc<Lines>>,
}

impl Setup {
    /// `features` without RING_PACKED; it is added for the packed format.
    fn new(format: RingFormat, queue_size: u16, features: RingFeatures) -> Self {
        let layout = RingLayout::new(format, queue_size).unwrap();
        let features = match format {
            RingFormat::Split => features,
            RingFormat::Packed => features | RingFeatures::RING_PACKED,
        };
        let tables = features
            .contains(RingFeatures::INDIRECT_DESC)
            .then(|| Lines::new(IndirectTables::bytes_needed(queue_size, TABLE_ENTRIES).unwrap()));
        Setup { layout, features, ring: Lines::new(layout.size()), tables }
    }

    fn slots(&self) -> Vec<Slot<u32>> {
        (0..self.layout.queue_size()).map(|_| Slot::new()).collect()
    }

    /// The driver queue (this zeroes the ring: build it before the device).
    fn driver<'a>(&'a self, slots: &'a mut [Slot<u32>]) -> Virtqueue<'a, u32> {
        let indirect = self.tables.as_ref().map(|t| IndirectTables::new(t.mem(), TABLE_IOVA, TABLE_ENTRIES).unwrap());
        let config = QueueConfig {
            queue_size: self.layout.queue_size(),
            ring: self.ring.mem(),
            ring_iova: RING_IOVA,
            features: self.features,
            indirect,
        };
        Virtqueue::new(config, slots).unwrap()
    }

    /// Runs `f` on a device model of the same queue in a new loom thread.
    fn spawn_device<R, F>(&self, f: F) -> thread::JoinHandle<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Device<'_>) -> R + Send + 'static,
    {
        let (layout, features) = (self.layout, self.features);
        let ring = Arc::clone(&self.ring);
        let tables = self.tables.clone();
        thread::spawn(move || {
            let regions: Vec<MemoryRegion<'_>> =
                tables.iter().map(|t| MemoryRegion { addr: TABLE_IOVA, mem: t.mem() }).collect();
            let cfg = DeviceConfig { layout, ring: ring.mem(), features, memory: &regions };
            let mut dev = match layout.format() {
                RingFormat::Split => Device::Split(SplitDevice::new(cfg).unwrap()),
                RingFormat::Packed => Device::Packed(PackedDevice::new(cfg).unwrap()),
            };
            f(&mut dev)
        })
    }
}

/// The device model of either format.
enum Device<'a> {
    Split(SplitDevice<'a>),
    Packed(PackedDevice<'a>),
}

impl Device<'_> {
    /// The next available chain; a protocol violation fails the model.
    fn pop_avail(&mut self) -> Option<AvailChain> {
        let r = match self {
            Device::Split(d) => d.pop_avail(),
            Device::Packed(d) => d.pop_avail(),
        };
        r.unwrap_or_else(|e| panic!("device model rejected what the driver published: {e}"))
    }

    fn push_used(&mut self, chain: &AvailChain, len: u32) {
        match self {
            Device::Split(d) => d.push_used(u32::from(chain.id), len),
            Device::Packed(d) => d.push_used(chain, len),
        }
    }

    /// True if the driver asked for a used-buffer notification.
    fn publish_used(&mut self) -> bool {
        match self {
            Device::Split(d) => d.publish_used(),
            Device::Packed(d) => d.publish_used(),
        }
    }

    /// True if chains arrived that the driver may not have kicked for.
    fn enable_kicks(&mut self) -> bool {
        match self {
            Device::Split(d) => d.enable_kicks(),
            Device::Packed(d) => d.enable_kicks(),
        }
    }

    fn disable_kicks(&mut self) {
        match self {
            Device::Split(d) => d.disable_kicks(),
            Device::Packed(d) => d.disable_kicks(),
        }
    }
}

/// A chain as the driver adds it.
#[derive(Clone, Copy)]
struct Chain {
    readable: &'static [Buffer],
    writable: &'static [Buffer],
}

impl Chain {
    /// What the device must see: the readable buffers, then the writable ones.
    fn expected(&self) -> Vec<DescInfo> {
        let r = self.readable.iter().map(|b| DescInfo { addr: b.addr, len: b.len, writable: false });
        let w = self.writable.iter().map(|b| DescInfo { addr: b.addr, len: b.len, writable: true });
        r.chain(w).collect()
    }

    fn buffers(&self) -> usize {
        self.readable.len() + self.writable.len()
    }

    fn writable_len(&self) -> u32 {
        self.writable.iter().map(|b| b.len).sum()
    }
}

/// A virtio-blk request: 16-byte header, data buffer, status byte.
const BLK: Chain = Chain {
    readable: &[Buffer::new(0x20_0000, 16)],
    writable: &[Buffer::new(0x30_0000, 512), Buffer::new(0x40_0000, 1)],
};

/// A virtio-blk flush: 16-byte header, status byte.
const FLUSH: Chain = Chain { readable: &[Buffer::new(0x70_0000, 16)], writable: &[Buffer::new(0x80_0000, 1)] };

/// A one-buffer chain (never indirect: a single buffer takes one descriptor).
const ONE: Chain = Chain { readable: &[Buffer::new(0x50_0000, 64)], writable: &[] };

/// A one-buffer device-writable chain.
const ONE_W: Chain = Chain { readable: &[], writable: &[Buffer::new(0x60_0000, 32)] };

fn add(q: &mut Virtqueue<'_, u32>, chain: Chain, token: u32) {
    if q.add(chain.readable, chain.writable, token).is_err() {
        panic!("adding chain {token} failed");
    }
}

/// Spins until the device model pops a chain.
fn spin_pop_avail(dev: &mut Device<'_>) -> AvailChain {
    loop {
        match dev.pop_avail() {
            Some(c) => return c,
            None => thread::yield_now(),
        }
    }
}

/// Spins until the driver pops a used chain.
fn spin_pop_used(q: &mut Virtqueue<'_, u32>) -> Used<u32> {
    loop {
        match q.pop_used().unwrap() {
            Some(u) => return u,
            None => thread::yield_now(),
        }
    }
}

/// Token of the chain [`Lap`] cycles through the queue first.
const WARM_UP_TOKEN: u32 = 99;

/// Where in the ring the chains of a notification model go.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Lap {
    /// From position 0 of the first lap.
    First,
    /// One chain is cycled through the queue of two first, so the chains of
    /// the model go to ring position 1 and then position 0 of the second lap
    /// (packed wrap counter 0): event positions of both laps are compared.
    Crossing,
}

impl Lap {
    /// Driver, before the device thread starts: adds and publishes the chain.
    fn start(self, q: &mut Virtqueue<'_, u32>) {
        if self == Lap::Crossing {
            add(q, ONE_W, WARM_UP_TOKEN);
            q.publish().unwrap();
        }
    }

    /// Device: takes the chain and returns it.
    fn device(self, dev: &mut Device<'_>) {
        if self == Lap::Crossing {
            let c = spin_pop_avail(dev);
            dev.push_used(&c, 0);
            dev.publish_used();
        }
    }

    /// Driver: waits for the chain to come back.
    fn finish(self, q: &mut Virtqueue<'_, u32>) {
        if self == Lap::Crossing {
            assert_eq!(spin_pop_used(q), Used { token: WARM_UP_TOKEN, len: 0 });
        }
    }
}

/// `loom::model`; with `--nocapture` prints how many executions it explored.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&runs);
    loom::model(move || {
        r.fetch_add(1, Relaxed);
        f()
    });
    eprintln!("loom explored {} executions", runs.load(Relaxed));
}

// ---------------------------------------------------------------------------
// 1. Publication: the device never sees a descriptor before it is complete.
// ---------------------------------------------------------------------------

/// The driver adds `chains` and publishes them with one publish; the device
/// spins until it has popped them all, checks every buffer, and returns each
/// with its whole writable length; the driver spins until it got them back.
fn publication(format: RingFormat, queue_size: u16, features: RingFeatures, chains: &'static [Chain]) {
    model(move || {
        let s = Setup::new(format, queue_size, features);
        let indirect = features.contains(RingFeatures::INDIRECT_DESC);
        let mut slots = s.slots();
        let mut q = s.driver(&mut slots);
        let dev = s.spawn_device(move |dev| {
            for (i, want) in chains.iter().enumerate() {
                let c = spin_pop_avail(dev);
                assert_eq!(c.descriptors(), want.expected().as_slice(), "chain {i}");
                assert_eq!(c.indirect, indirect && want.buffers() > 1, "chain {i}");
                dev.push_used(&c, want.writable_len());
                dev.publish_used();
            }
            assert!(dev.pop_avail().is_none());
        });
        for (token, c) in chains.iter().enumerate() {
            add(&mut q, *c, token as u32);
        }
        q.publish().unwrap();
        for (token, c) in chains.iter().enumerate() {
            assert_eq!(spin_pop_used(&mut q), Used { token: token as u32, len: c.writable_len() });
        }
        dev.join().unwrap();
        assert_eq!(q.in_flight(), 0);
    });
}

#[test]
fn publication_split_direct() {
    publication(RingFormat::Split, 4, RingFeatures::empty(), &[BLK]);
}

#[test]
fn publication_packed_direct() {
    publication(RingFormat::Packed, 4, RingFeatures::empty(), &[BLK]);
}

/// An indirect blk chain and a direct one-buffer chain in one batch.
#[test]
fn publication_split_indirect() {
    publication(RingFormat::Split, 2, RingFeatures::INDIRECT_DESC, &[BLK, ONE]);
}

#[test]
fn publication_packed_indirect() {
    publication(RingFormat::Packed, 2, RingFeatures::INDIRECT_DESC, &[BLK, ONE]);
}

/// A batch of two direct chains over all four ring positions (the packed
/// ring publishes a batch by storing its first head's flags last).
#[test]
fn publication_split_batch() {
    publication(RingFormat::Split, 4, RingFeatures::empty(), &[BLK, ONE]);
}

#[test]
fn publication_packed_batch() {
    publication(RingFormat::Packed, 4, RingFeatures::empty(), &[BLK, ONE]);
}

/// Three chains through a queue of two, one at a time: the driver adds and
/// publishes a chain and waits for it to come back before adding the next.
/// Chains reuse descriptors the device has read before, so loom also checks
/// that the driver rewrites a descriptor only after the device is done with
/// it. On the packed ring the second chain starts the second lap (wrap
/// counter 0) and the third spans the end of the ring, from position 1 of the
/// second lap to position 0 of the third.
fn reuse(format: RingFormat) {
    const CHAINS: [Chain; 3] = [FLUSH, ONE_W, FLUSH];
    model(move || {
        let s = Setup::new(format, 2, RingFeatures::empty());
        let mut slots = s.slots();
        let mut q = s.driver(&mut slots);
        let dev = s.spawn_device(|dev| {
            for (i, want) in CHAINS.iter().enumerate() {
                let c = spin_pop_avail(dev);
                assert_eq!(c.descriptors(), want.expected().as_slice(), "chain {i}");
                dev.push_used(&c, want.writable_len());
                dev.publish_used();
            }
            assert!(dev.pop_avail().is_none());
        });
        for (token, chain) in CHAINS.iter().enumerate() {
            add(&mut q, *chain, token as u32);
            q.publish().unwrap();
            assert_eq!(spin_pop_used(&mut q), Used { token: token as u32, len: chain.writable_len() });
        }
        dev.join().unwrap();
    });
}

#[test]
fn publication_split_reuse() {
    reuse(RingFormat::Split);
}

#[test]
fn publication_packed_reuse() {
    reuse(RingFormat::Packed);
}

/// The chain frame of the framed models: chain `id`'s 16-byte header at
/// `0x90_0000 + 64 id`, its status byte 32 bytes further.
const FRAME: ChainFrame = ChainFrame { iova: 0x90_0000, stride: 64, header_len: 16, status_offset: 32, status_len: 1 };

/// Three framed blk chains (`add_framed`) through a queue, one at a time, as
/// in [`reuse`]. On the split ring of four the second and third chains take
/// the head, data and status descriptors the first one left, and only the
/// data descriptor is rewritten: loom checks the device still sees each
/// whole chain only once it is published and that the rewrite happens only
/// after the device is done with the previous chain. On the packed ring of
/// three every chain fills the whole ring, one lap each (wrap counter 1, 0, 1).
/// With INDIRECT_DESC every chain goes into the indirect table of the id the
/// first one had, whose header and status entries stay and whose data entry
/// is rewritten (split: the ring descriptor pointing at it stays too).
/// The driver takes each completion with `drain_used`.
fn framed_reuse(format: RingFormat, queue_size: u16, features: RingFeatures) {
    const DATA: [(Buffer, bool); 3] =
        [(Buffer::new(0xa0_0000, 512), true), (Buffer::new(0xb0_0000, 4096), false), (Buffer::new(0xc0_0000, 8), true)];
    model(move || {
        let s = Setup::new(format, queue_size, features);
        let mut slots = s.slots();
        let mut q = s.driver(&mut slots);
        q.set_chain_frame(FRAME).unwrap();
        let indirect = features.contains(RingFeatures::INDIRECT_DESC);
        assert_eq!(q.framed_chains_indirect(), indirect);
        let dev = s.spawn_device(move |dev| {
            for (i, (data, writable)) in DATA.iter().enumerate() {
                let c = spin_pop_avail(dev);
                let header = FRAME.iova + 64 * u64::from(c.id);
                let want = [
                    DescInfo { addr: header, len: 16, writable: false },
                    DescInfo { addr: data.addr, len: data.len, writable: *writable },
                    DescInfo { addr: header + 32, len: 1, writable: true },
                ];
                assert_eq!(c.descriptors(), want.as_slice(), "chain {i}");
                assert_eq!(c.indirect, indirect, "chain {i}");
                dev.push_used(&c, 1);
                dev.publish_used();
            }
            assert!(dev.pop_avail().is_none());
        });
        for (token, (data, writable)) in DATA.iter().enumerate() {
            if q.add_framed(*data, *writable, token as u32).is_err() {
                panic!("adding framed chain {token} failed");
            }
            q.publish().unwrap();
            // Waits with `drain_used`: loom also checks it reads the used
            // chain only after the device published it.
            let mut got = Vec::new();
            while got.is_empty() {
                q.drain_used(|u| got.push(u)).unwrap();
                if got.is_empty() {
                    thread::yield_now();
                }
            }
            assert_eq!(got, [Used { token: token as u32, len: 1 }]);
        }
        dev.join().unwrap();
    });
}

#[test]
fn publication_split_framed_reuse() {
    framed_reuse(RingFormat::Split, 4, RingFeatures::empty());
}

#[test]
fn publication_packed_framed_reuse() {
    framed_reuse(RingFormat::Packed, 3, RingFeatures::empty());
}

#[test]
fn publication_split_framed_indirect_reuse() {
    framed_reuse(RingFormat::Split, 4, RingFeatures::INDIRECT_DESC);
}

#[test]
fn publication_packed_framed_indirect_reuse() {
    framed_reuse(RingFormat::Packed, 3, RingFeatures::INDIRECT_DESC);
}

// ---------------------------------------------------------------------------
// 2. Available-buffer notifications: no lost kick.
// ---------------------------------------------------------------------------

/// The device has just been woken: it turns kicks off, drains, and re-enables
/// kicks with the re-check until the re-check finds nothing; then it sleeps.
/// Meanwhile the driver adds and publishes two chains, one publish each.
///
/// No lost wakeup: if the device went to sleep having popped `n < 2` chains,
/// chain `n` was published after the device's last look, so the publish that
/// made it visible (publish number `n`) must have asked for a kick. (A later
/// publish need not: with EVENT_IDX the device asked for one kick only, and
/// that kick wakes it for everything.)
fn kick(format: RingFormat, features: RingFeatures, lap: Lap) {
    model(move || {
        const CHAINS: usize = 2;
        let s = Setup::new(format, 2, features);
        let mut slots = s.slots();
        let mut q = s.driver(&mut slots);
        lap.start(&mut q);
        let dev = s.spawn_device(move |dev| {
            lap.device(dev);
            dev.disable_kicks();
            let mut seen = 0;
            loop {
                while dev.pop_avail().is_some() {
                    seen += 1;
                }
                if !dev.enable_kicks() {
                    return seen;
                }
            }
        });
        lap.finish(&mut q);
        let mut kicks = [false; CHAINS];
        for (i, k) in kicks.iter_mut().enumerate() {
            add(&mut q, ONE, i as u32);
            *k = q.publish().unwrap();
        }
        let seen = dev.join().unwrap();
        assert!(seen <= CHAINS);
        assert!(
            seen == CHAINS || kicks[seen],
            "lost kick: the device sleeps after {seen} of {CHAINS} chains, kicks {kicks:?}"
        );
    });
}

#[test]
fn kick_split_flags() {
    kick(RingFormat::Split, RingFeatures::empty(), Lap::First);
}

#[test]
fn kick_split_event_idx() {
    kick(RingFormat::Split, RingFeatures::EVENT_IDX, Lap::First);
}

#[test]
fn kick_split_event_idx_crossing() {
    kick(RingFormat::Split, RingFeatures::EVENT_IDX, Lap::Crossing);
}

#[test]
fn kick_packed_flags() {
    kick(RingFormat::Packed, RingFeatures::empty(), Lap::First);
}

#[test]
fn kick_packed_event_idx() {
    kick(RingFormat::Packed, RingFeatures::EVENT_IDX, Lap::First);
}

#[test]
fn kick_packed_event_idx_crossing() {
    kick(RingFormat::Packed, RingFeatures::EVENT_IDX, Lap::Crossing);
}

// ---------------------------------------------------------------------------
// 3. Used-buffer notifications: no lost interrupt.
// ---------------------------------------------------------------------------

/// How the driver arms used-buffer notifications before it sleeps.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Arm {
    /// `enable_used_notifications`: at the next used chain.
    Next,
    /// `enable_used_notifications_delayed`: with EVENT_IDX, after about three
    /// quarters of the chains in flight.
    Delayed,
}

/// The driver turns used-buffer notifications off and publishes two
/// one-buffer chains. The device pops them and returns them, publishing each
/// (`batched == false`) or both at once, and records what each publication
/// said about notifying. The driver drains, arms notifications with the
/// re-check until it finds nothing new, and sleeps.
///
/// No lost interrupt: if the driver went to sleep having got `n < 2` chains
/// and asked to be woken after `k` more (`k` = 0 for [`Arm::Next`]), the
/// completion at used index `n + k` (there is one: `k` is less than the chains
/// in flight) was published after the driver's last look, so the device
/// publication that made it visible must have notified.
fn used_notify(format: RingFormat, features: RingFeatures, batched: bool, arm: Arm, lap: Lap) {
    model(move || {
        const CHAINS: usize = 2;
        let s = Setup::new(format, 2, features);
        let mut slots = s.slots();
        let mut q = s.driver(&mut slots);
        lap.start(&mut q);
        let dev = s.spawn_device(move |dev| {
            lap.device(dev);
            let chains: Vec<AvailChain> = (0..CHAINS).map(|_| spin_pop_avail(dev)).collect();
            assert!(dev.pop_avail().is_none());
            // notified[i]: what the publication that made completion i visible said.
            let mut notified = [false; CHAINS];
            if batched {
                for c in &chains {
                    dev.push_used(c, 7);
                }
                notified = [dev.publish_used(); CHAINS];
            } else {
                for (c, n) in chains.iter().zip(notified.iter_mut()) {
                    dev.push_used(c, 7);
                    *n = dev.publish_used();
                }
            }
            notified
        });
        lap.finish(&mut q);
        q.disable_used_notifications();
        for token in 0..CHAINS as u32 {
            add(&mut q, ONE_W, token);
        }
        q.publish().unwrap();
        let mut got = 0;
        let after = loop {
            while let Some(u) = q.pop_used().unwrap() {
                assert_eq!(u, Used { token: got as u32, len: 7 });
                got += 1;
            }
            // The notification is asked for `after` completions beyond the
            // ones taken. Delayed, with EVENT_IDX: three quarters (rounded
            // down) of the chains in flight, which here equal the ring
            // positions in flight (the packed queue's measure).
            let (again, after) = match arm {
                Arm::Next => (q.enable_used_notifications().unwrap(), 0),
                Arm::Delayed => {
                    let in_flight = usize::from(q.in_flight());
                    let after = if features.contains(RingFeatures::EVENT_IDX) { in_flight * 3 / 4 } else { 0 };
                    (q.enable_used_notifications_delayed().unwrap(), after)
                }
            };
            if !again {
                break after;
            }
        };
        let notified = dev.join().unwrap();
        assert!(
            got == CHAINS || notified[got + after],
            "lost interrupt: the driver sleeps after {got} of {CHAINS} chains \
             (to be woken after {after} more), device notifications {notified:?}"
        );
    });
}

#[test]
fn used_notify_split_flags() {
    used_notify(RingFormat::Split, RingFeatures::empty(), false, Arm::Next, Lap::First);
}

#[test]
fn used_notify_split_flags_batched() {
    used_notify(RingFormat::Split, RingFeatures::empty(), true, Arm::Next, Lap::First);
}

#[test]
fn used_notify_split_event_idx() {
    used_notify(RingFormat::Split, RingFeatures::EVENT_IDX, false, Arm::Next, Lap::First);
}

#[test]
fn used_notify_split_event_idx_batched() {
    used_notify(RingFormat::Split, RingFeatures::EVENT_IDX, true, Arm::Next, Lap::First);
}

#[test]
fn used_notify_split_event_idx_delayed() {
    used_notify(RingFormat::Split, RingFeatures::EVENT_IDX, false, Arm::Delayed, Lap::First);
}

#[test]
fn used_notify_split_event_idx_crossing() {
    used_notify(RingFormat::Split, RingFeatures::EVENT_IDX, false, Arm::Next, Lap::Crossing);
}

#[test]
fn used_notify_split_event_idx_batched_crossing() {
    used_notify(RingFormat::Split, RingFeatures::EVENT_IDX, true, Arm::Next, Lap::Crossing);
}

#[test]
fn used_notify_split_event_idx_delayed_crossing() {
    used_notify(RingFormat::Split, RingFeatures::EVENT_IDX, false, Arm::Delayed, Lap::Crossing);
}

#[test]
fn used_notify_packed_flags() {
    used_notify(RingFormat::Packed, RingFeatures::empty(), false, Arm::Next, Lap::First);
}

#[test]
fn used_notify_packed_flags_batched() {
    used_notify(RingFormat::Packed, RingFeatures::empty(), true, Arm::Next, Lap::First);
}

#[test]
fn used_notify_packed_event_idx() {
    used_notify(RingFormat::Packed, RingFeatures::EVENT_IDX, false, Arm::Next, Lap::First);
}

#[test]
fn used_notify_packed_event_idx_batched() {
    used_notify(RingFormat::Packed, RingFeatures::EVENT_IDX, true, Arm::Next, Lap::First);
}

#[test]
fn used_notify_packed_event_idx_delayed() {
    used_notify(RingFormat::Packed, RingFeatures::EVENT_IDX, false, Arm::Delayed, Lap::First);
}

#[test]
fn used_notify_packed_event_idx_crossing() {
    used_notify(RingFormat::Packed, RingFeatures::EVENT_IDX, false, Arm::Next, Lap::Crossing);
}

#[test]
fn used_notify_packed_event_idx_batched_crossing() {
    used_notify(RingFormat::Packed, RingFeatures::EVENT_IDX, true, Arm::Next, Lap::Crossing);
}

#[test]
fn used_notify_packed_event_idx_delayed_crossing() {
    used_notify(RingFormat::Packed, RingFeatures::EVENT_IDX, false, Arm::Delayed, Lap::Crossing);
}
