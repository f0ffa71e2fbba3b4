//! Hostile-device tests: a device that writes what a correct device never
//! writes, one test per check, for both ring formats where the check applies.
//!
//! Every test that breaks a queue asserts the exact [`DeviceError`], then that
//! the queue stays broken (every later call returns the same error, `add`
//! hands the token back) and that a reset returns each outstanding token
//! exactly once. A [`Ledger`] follows every token so none comes back twice.

mod common;

use virtio_queue_core::device::{AvailChain, DescInfo, DeviceConfig, PackedDevice, SplitDevice};
use virtio_queue_core::layout::DescFlags;
use virtio_queue_core::{
    AddError, Buffer, DeviceError, DriverQueue, Error, PackedQueue, RingFeatures, SharedMemory, SplitQueue,
};

const SIZE: u16 = 8;
/// Packed flags marking a descriptor used in the first lap (used wrap counter 1).
const USED_LAP1: u16 = DescFlags::AVAIL.bits() | DescFlags::USED.bits();
/// Packed flags marking a descriptor used in the second lap (used wrap counter 0).
const USED_LAP2: u16 = 0;
const AVAIL: u16 = DescFlags::AVAIL.bits();
const USED: u16 = DescFlags::USED.bits();

// ---------------------------------------------------------------------------
// Environments

/// Runs `f` on a size-8 split queue and a split device over the same ring.
fn split<R>(
    features: RingFeatures,
    f: impl FnOnce(&mut SplitQueue<'_, u32>, &mut SplitDevice<'_>, SharedMemory<'_>) -> R,
) -> R {
    common::with_split(SIZE, features, f)
}

/// Runs `f` on a size-8 packed queue and a packed device over the same ring.
fn packed<R>(
    features: RingFeatures,
    f: impl FnOnce(&mut PackedQueue<'_, u32>, &mut PackedDevice<'_>, SharedMemory<'_>) -> R,
) -> R {
    common::with_packed(SIZE, features, f)
}

fn ev() -> RingFeatures {
    RingFeatures::EVENT_IDX
}

fn in_order() -> RingFeatures {
    RingFeatures::EVENT_IDX | RingFeatures::IN_ORDER
}

fn pop_split(dev: &mut SplitDevice<'_>) -> AvailChain {
    dev.pop_avail().expect("driver broke the protocol").expect("no chain available")
}

fn pop_packed(dev: &mut PackedDevice<'_>) -> AvailChain {
    dev.pop_avail().expect("driver broke the protocol").expect("no chain available")
}

/// Split device: one correct used element for `c`, published.
fn complete_split(dev: &mut SplitDevice<'_>, c: &AvailChain, len: u32) {
    dev.push_used(u32::from(c.id), len);
    dev.publish_used();
}

/// Split device: a used element naming `id` at the device's next used index,
/// published (the device's index moves by one).
fn split_used_raw(dev: &mut SplitDevice<'_>, id: u32, len: u32) {
    dev.push_used(id, len);
    dev.publish_used();
}

// ---------------------------------------------------------------------------
// Token bookkeeping

/// Every token added, which are still outstanding, and which came back.
#[derive(Default)]
struct Ledger {
    next: u32,
    outstanding: Vec<u32>,
    returned: Vec<u32>,
}

impl Ledger {
    /// Adds a chain of buffers of the given lengths; returns its token.
    fn add<Q: DriverQueue<u32>>(&mut self, q: &mut Q, readable: &[u32], writable: &[u32]) -> u32 {
        let t = 1000 + self.next;
        self.next += 1;
        let (r, w) = buffers(t, readable, writable);
        if let Err(e) = q.add(&r, &w, t) {
            panic!("add of token {t} failed: {e:?}");
        }
        self.outstanding.push(t);
        t
    }

    /// Records a token handed back by the queue (pop or reset): it must be
    /// outstanding, and so can never be returned twice.
    fn returned(&mut self, t: u32) {
        assert!(!self.returned.contains(&t), "token {t} returned twice");
        let Some(i) = self.outstanding.iter().position(|&o| o == t) else {
            panic!("token {t} returned but never added");
        };
        self.outstanding.swap_remove(i);
        self.returned.push(t);
    }

    /// Pops one used chain and checks it is `token` with `len`.
    fn expect_pop<Q: DriverQueue<u32>>(&mut self, q: &mut Q, token: u32, len: u32) {
        match q.pop_used() {
            Ok(Some(u)) => {
                assert_eq!((u.token, u.len), (token, len), "wrong used chain");
                self.returned(u.token);
            }
            other => panic!("expected token {token} with len {len}, got {other:?}"),
        }
    }

    /// Resets the queue and checks that exactly the outstanding tokens come
    /// back, each once.
    fn reset<Q: DriverQueue<u32>>(&mut self, q: &mut Q) {
        let mut back = Vec::new();
        q.reset(|t| back.push(t));
        let mut expected = self.outstanding.clone();
        expected.sort_unstable();
        let mut got = back.clone();
        got.sort_unstable();
        assert_eq!(got, expected, "reset must return every outstanding token exactly once");
        for t in back {
            self.returned(t);
        }
        assert!(self.outstanding.is_empty());
        assert_eq!(q.broken(), None);
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.free_descriptors(), q.queue_size());
    }
}

/// Buffers for token `t` with distinct, recognisable addresses.
fn buffers(t: u32, readable: &[u32], writable: &[u32]) -> (Vec<Buffer>, Vec<Buffer>) {
    let addr = |k: usize| (u64::from(t) << 16) + 0x100 * k as u64;
    let r = readable.iter().enumerate().map(|(k, &len)| Buffer::new(addr(k), len)).collect();
    let w = writable.iter().enumerate().map(|(k, &len)| Buffer::new(addr(readable.len() + k), len)).collect();
    (r, w)
}

/// What the device must see for a chain added by [`Ledger::add`].
fn expected_descs(t: u32, readable: &[u32], writable: &[u32]) -> Vec<DescInfo> {
    let (r, w) = buffers(t, readable, writable);
    r.iter()
        .map(|b| DescInfo { addr: b.addr, len: b.len, writable: false })
        .chain(w.iter().map(|b| DescInfo { addr: b.addr, len: b.len, writable: true }))
        .collect()
}

/// The queue broke with `e`: it stays broken on every call (and `add` hands
/// the token back), then a reset returns each outstanding token exactly once.
fn assert_stays_broken<Q: DriverQueue<u32>>(q: &mut Q, ledger: &mut Ledger, e: DeviceError) {
    let broken = Error::Broken(e);
    assert_eq!(q.broken(), Some(e));
    let in_flight = q.in_flight();
    for _ in 0..2 {
        assert_eq!(q.pop_used(), Err(broken));
        assert_eq!(
            q.add(&[Buffer::new(0x9000, 8)], &[Buffer::new(0xa000, 8)], 0xdead),
            Err(AddError { error: broken, token: 0xdead })
        );
        assert_eq!(q.add(&[], &[Buffer::new(0xa000, 1)], 0xbeef), Err(AddError { error: broken, token: 0xbeef }));
        assert_eq!(q.publish(), Err(broken));
        assert_eq!(q.enable_used_notifications(), Err(broken));
        assert_eq!(q.enable_used_notifications_delayed(), Err(broken));
        q.disable_used_notifications();
    }
    assert_eq!(q.pop_used(), Err(broken));
    assert_eq!(q.in_flight(), in_flight, "a broken queue must not complete or add chains");
    ledger.reset(q);
}

// ---------------------------------------------------------------------------
// Used id out of range

#[test]
fn split_used_id_out_of_range() {
    for id in [u32::from(SIZE), 0xffff, u32::MAX] {
        split(ev(), |q, dev, _| {
            let mut l = Ledger::default();
            l.add(q, &[16], &[32]);
            q.publish().unwrap();
            let c = pop_split(dev);
            split_used_raw(dev, id, 0);
            let e = DeviceError::UsedIdOutOfRange { id, queue_size: SIZE };
            assert_eq!(q.pop_used(), Err(Error::Broken(e)));
            // The device now completes the chain correctly: too late.
            complete_split(dev, &c, 1);
            assert_stays_broken(q, &mut l, e);
        });
    }
}

#[test]
fn packed_used_id_out_of_range() {
    for id in [SIZE, 0xffff] {
        packed(ev(), |q, dev, _| {
            let mut l = Ledger::default();
            l.add(q, &[16], &[32]);
            q.publish().unwrap();
            pop_packed(dev);
            dev.write_used_raw(0, id, 0, USED_LAP1);
            let e = DeviceError::UsedIdOutOfRange { id: u32::from(id), queue_size: SIZE };
            assert_eq!(q.pop_used(), Err(Error::Broken(e)));
            assert_stays_broken(q, &mut l, e);
        });
    }
}

// ---------------------------------------------------------------------------
// Used id not in flight: never submitted, already completed

#[test]
fn split_used_id_never_submitted() {
    // Descriptor 1 is the second descriptor of chain 0 (not a head);
    // descriptor 5 was never used.
    for id in [1u32, 5] {
        split(ev(), |q, dev, _| {
            let mut l = Ledger::default();
            l.add(q, &[16], &[32]);
            l.add(q, &[], &[8]);
            q.publish().unwrap();
            assert_eq!((pop_split(dev).id, pop_split(dev).id), (0, 2));
            split_used_raw(dev, id, 0);
            let e = DeviceError::UsedIdNotInFlight { id };
            assert_eq!(q.pop_used(), Err(Error::Broken(e)));
            assert_stays_broken(q, &mut l, e);
        });
    }
}

#[test]
fn packed_used_id_never_submitted() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[16], &[32]);
        l.add(q, &[], &[8]);
        q.publish().unwrap();
        assert_eq!((pop_packed(dev).id, pop_packed(dev).id), (0, 1));
        dev.write_used_raw(0, 5, 0, USED_LAP1);
        let e = DeviceError::UsedIdNotInFlight { id: 5 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn split_used_id_double_completion() {
    split(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[64]);
        l.add(q, &[], &[64]);
        q.publish().unwrap();
        let ca = pop_split(dev);
        pop_split(dev);
        dev.push_used(u32::from(ca.id), 5);
        dev.push_used(u32::from(ca.id), 6);
        dev.publish_used();
        l.expect_pop(q, a, 5);
        let e = DeviceError::UsedIdNotInFlight { id: u32::from(ca.id) };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn packed_used_id_double_completion() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[64]);
        l.add(q, &[], &[64]);
        q.publish().unwrap();
        let ca = pop_packed(dev);
        pop_packed(dev);
        dev.push_used(&ca, 5);
        dev.push_used(&ca, 6);
        l.expect_pop(q, a, 5);
        let e = DeviceError::UsedIdNotInFlight { id: u32::from(ca.id) };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

// ---------------------------------------------------------------------------
// Completion of a chain added but not yet published

#[test]
fn split_completion_of_unpublished_chain() {
    split(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[], &[16]);
        q.publish().unwrap();
        l.add(q, &[], &[16]); // head 1, not published
        assert_eq!(pop_split(dev).id, 0);
        assert!(dev.pop_avail().unwrap().is_none(), "the device cannot see the second chain");
        split_used_raw(dev, 1, 0);
        let e = DeviceError::UsedIdNotInFlight { id: 1 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn packed_completion_of_unpublished_chain() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[], &[16]);
        q.publish().unwrap();
        l.add(q, &[], &[16]); // buffer id 1, not published
        assert_eq!(pop_packed(dev).id, 0);
        assert!(dev.pop_avail().unwrap().is_none(), "the device cannot see the second chain");
        dev.write_used_raw(0, 1, 0, USED_LAP1);
        let e = DeviceError::UsedIdNotInFlight { id: 1 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

/// A head that was completed, then reused by a chain not yet published: a
/// stale second completion of the old chain must not complete the new one.
/// (All free descriptors go to unpublished chains, so the old head is reused
/// whatever order the free list hands them out in.)
#[test]
fn split_stale_completion_of_reused_unpublished_head() {
    split(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[16]);
        l.add(q, &[], &[16]);
        q.publish().unwrap();
        let ca = pop_split(dev);
        pop_split(dev);
        complete_split(dev, &ca, 3);
        l.expect_pop(q, a, 3);
        for _ in 1..SIZE {
            l.add(q, &[], &[16]);
        }
        assert_eq!(q.free_descriptors(), 0);
        split_used_raw(dev, u32::from(ca.id), 0);
        let e = DeviceError::UsedIdNotInFlight { id: u32::from(ca.id) };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn packed_stale_completion_of_reused_unpublished_id() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[16]);
        l.add(q, &[], &[16]);
        q.publish().unwrap();
        let ca = pop_packed(dev);
        pop_packed(dev);
        dev.push_used(&ca, 3);
        l.expect_pop(q, a, 3);
        for _ in 1..SIZE {
            l.add(q, &[], &[16]);
        }
        assert_eq!(q.free_descriptors(), 0);
        // The stale completion at the driver's next used position (1).
        dev.write_used_raw(1, ca.id, 0, USED_LAP1);
        let e = DeviceError::UsedIdNotInFlight { id: u32::from(ca.id) };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

/// Only unpublished chains in flight: the device may return nothing, so any
/// used-index move is a jump.
#[test]
fn split_completion_with_only_unpublished_chains() {
    split(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[], &[16]);
        split_used_raw(dev, 0, 0);
        let e = DeviceError::UsedIndexJump { used_idx: 1, last_used: 0, in_flight: 0 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn packed_completion_with_only_unpublished_chains() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[], &[16]);
        dev.write_used_raw(0, 0, 0, USED_LAP1);
        let e = DeviceError::UsedWithoutInFlight { position: 0 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

// ---------------------------------------------------------------------------
// Used length

#[test]
fn split_used_len_too_large() {
    for len in [41, u32::MAX] {
        split(ev(), |q, dev, _| {
            let mut l = Ledger::default();
            l.add(q, &[16], &[32, 8]);
            q.publish().unwrap();
            let c = pop_split(dev);
            assert_eq!(c.writable_len(), 40);
            complete_split(dev, &c, len);
            let e = DeviceError::UsedLenTooLarge { id: u32::from(c.id), len, writable: 40 };
            assert_eq!(q.pop_used(), Err(Error::Broken(e)));
            assert_stays_broken(q, &mut l, e);
        });
    }
}

#[test]
fn packed_used_len_too_large() {
    for len in [41, u32::MAX] {
        packed(ev(), |q, dev, _| {
            let mut l = Ledger::default();
            l.add(q, &[16], &[32, 8]);
            q.publish().unwrap();
            let c = pop_packed(dev);
            assert_eq!(c.writable_len(), 40);
            dev.push_used(&c, len);
            let e = DeviceError::UsedLenTooLarge { id: u32::from(c.id), len, writable: 40 };
            assert_eq!(q.pop_used(), Err(Error::Broken(e)));
            assert_stays_broken(q, &mut l, e);
        });
    }
}

#[test]
fn split_used_len_on_read_only_chain() {
    split(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[16, 16], &[]);
        q.publish().unwrap();
        let c = pop_split(dev);
        complete_split(dev, &c, 1);
        let e = DeviceError::UsedLenTooLarge { id: u32::from(c.id), len: 1, writable: 0 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn packed_used_len_on_read_only_chain() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[16, 16], &[]);
        q.publish().unwrap();
        let c = pop_packed(dev);
        dev.push_used(&c, 1);
        let e = DeviceError::UsedLenTooLarge { id: u32::from(c.id), len: 1, writable: 0 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn split_used_len_equal_to_writable_accepted() {
    split(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[16], &[32, 8]);
        let b = l.add(q, &[16, 16], &[]);
        let c = l.add(q, &[], &[u32::MAX - 16]);
        q.publish().unwrap();
        for (t, len) in [(a, 40), (b, 0), (c, u32::MAX - 16)] {
            let ch = pop_split(dev);
            complete_split(dev, &ch, len);
            l.expect_pop(q, t, len);
        }
        assert_eq!(q.pop_used(), Ok(None));
        assert_eq!(q.broken(), None);
        assert_eq!(q.free_descriptors(), SIZE);
    });
}

#[test]
fn packed_used_len_equal_to_writable_accepted() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[16], &[32, 8]);
        let b = l.add(q, &[16, 16], &[]);
        let c = l.add(q, &[], &[u32::MAX - 16]);
        q.publish().unwrap();
        for (t, len) in [(a, 40), (b, 0), (c, u32::MAX - 16)] {
            let ch = pop_packed(dev);
            dev.push_used(&ch, len);
            l.expect_pop(q, t, len);
        }
        assert_eq!(q.pop_used(), Ok(None));
        assert_eq!(q.broken(), None);
        assert_eq!(q.free_descriptors(), SIZE);
    });
}

// ---------------------------------------------------------------------------
// Split used index jumps

#[test]
fn split_used_index_jump_by_two() {
    split(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[8]);
        l.add(q, &[], &[8]);
        q.publish().unwrap();
        let ca = pop_split(dev);
        let cb = pop_split(dev);
        complete_split(dev, &ca, 1);
        l.expect_pop(q, a, 1);
        // One chain in flight, the index moves by two.
        dev.push_used(u32::from(cb.id), 1);
        dev.set_used_idx_raw(3);
        let e = DeviceError::UsedIndexJump { used_idx: 3, last_used: 1, in_flight: 1 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn split_used_index_jump_huge() {
    split(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[], &[8]);
        q.publish().unwrap();
        let c = pop_split(dev);
        dev.push_used(u32::from(c.id), 1);
        dev.set_used_idx_raw(40000);
        let e = DeviceError::UsedIndexJump { used_idx: 40000, last_used: 0, in_flight: 1 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

/// A used index moved backwards is, in 16-bit arithmetic, a jump of almost
/// 65536 entries.
#[test]
fn split_used_index_moves_backwards() {
    split(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[8]);
        l.add(q, &[], &[8]);
        q.publish().unwrap();
        let ca = pop_split(dev);
        complete_split(dev, &ca, 2);
        l.expect_pop(q, a, 2);
        dev.set_used_idx_raw(0);
        let e = DeviceError::UsedIndexJump { used_idx: 0, last_used: 1, in_flight: 1 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn split_in_order_used_index_jump() {
    split(in_order(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[], &[8]);
        q.publish().unwrap();
        let c = pop_split(dev);
        dev.push_used_batch(&[c, c], 1);
        dev.publish_used();
        let e = DeviceError::UsedIndexJump { used_idx: 2, last_used: 0, in_flight: 1 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

// ---------------------------------------------------------------------------
// Packed: used without anything in flight, wrap counters

#[test]
fn packed_used_without_in_flight() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        dev.write_used_raw(0, 0, 0, USED_LAP1);
        let e = DeviceError::UsedWithoutInFlight { position: 0 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn packed_used_after_everything_completed() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[4], &[8]);
        q.publish().unwrap();
        let c = pop_packed(dev);
        dev.push_used(&c, 8);
        l.expect_pop(q, a, 8);
        // Positions 0 and 1 were the chain; the next used position is 2.
        dev.write_used_raw(2, c.id, 0, USED_LAP1);
        let e = DeviceError::UsedWithoutInFlight { position: 2 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

/// Used descriptors written with wrap bits of the wrong lap are not used:
/// nothing is popped, nothing breaks, and a correct completion still works.
#[test]
fn packed_wrong_wrap_bits_first_lap() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[16]);
        q.publish().unwrap();
        let c = pop_packed(dev);
        for flags in [USED_LAP2, AVAIL, USED] {
            dev.write_used_raw(0, c.id, 4, flags);
            assert_eq!(q.pop_used(), Ok(None), "flags {flags:#x}");
            assert_eq!(q.enable_used_notifications(), Ok(false), "flags {flags:#x}");
            assert_eq!(q.broken(), None);
            assert_eq!(q.in_flight(), 1);
        }
        dev.push_used(&c, 4);
        l.expect_pop(q, a, 4);
        // The queue goes on normally.
        let b = l.add(q, &[1], &[2]);
        q.publish().unwrap();
        let cb = pop_packed(dev);
        assert_eq!(cb.descriptors(), expected_descs(b, &[1], &[2]).as_slice());
        dev.push_used(&cb, 2);
        l.expect_pop(q, b, 2);
        assert_eq!(q.pop_used(), Ok(None));
        assert_eq!(q.free_descriptors(), SIZE);
    });
}

#[test]
fn packed_wrong_wrap_bits_second_lap() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        // One full lap of single-descriptor chains.
        for _ in 0..SIZE {
            let t = l.add(q, &[], &[16]);
            q.publish().unwrap();
            let c = pop_packed(dev);
            dev.push_used(&c, 16);
            l.expect_pop(q, t, 16);
        }
        assert_eq!(dev.used_position(), (0, false));
        let a = l.add(q, &[], &[16]);
        q.publish().unwrap();
        let c = pop_packed(dev);
        // First-lap used marking (stale), and the two half-marked states.
        for flags in [USED_LAP1, AVAIL, USED] {
            dev.write_used_raw(0, c.id, 4, flags);
            assert_eq!(q.pop_used(), Ok(None), "flags {flags:#x}");
            assert_eq!(q.enable_used_notifications(), Ok(false), "flags {flags:#x}");
            assert_eq!(q.broken(), None);
        }
        dev.push_used(&c, 4);
        l.expect_pop(q, a, 4);
        let b = l.add(q, &[1], &[2]);
        q.publish().unwrap();
        let cb = pop_packed(dev);
        dev.push_used(&cb, 1);
        l.expect_pop(q, b, 1);
        assert_eq!(q.pop_used(), Ok(None));
    });
}

// ---------------------------------------------------------------------------
// IN_ORDER

#[test]
fn split_in_order_out_of_order() {
    split(in_order(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[], &[8]);
        l.add(q, &[], &[8]);
        q.publish().unwrap();
        let ca = pop_split(dev);
        let cb = pop_split(dev);
        // B completed alone before A.
        complete_split(dev, &cb, 1);
        let e = DeviceError::UsedOutOfOrder { id: u32::from(cb.id), expected: u32::from(ca.id) };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

/// Packed: a used descriptor for B while A is older reads as an IN_ORDER
/// batch of A and B (§2.8.9), which is accepted; A's completion afterwards is
/// then out of order.
#[test]
fn packed_in_order_out_of_order() {
    packed(in_order(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[10]);
        let b = l.add(q, &[], &[20]);
        l.add(q, &[], &[30]);
        q.publish().unwrap();
        let ca = pop_packed(dev);
        let cb = pop_packed(dev);
        let cc = pop_packed(dev);
        dev.write_used_raw(0, cb.id, 3, USED_LAP1);
        l.expect_pop(q, a, 10);
        l.expect_pop(q, b, 3);
        // The driver is now at position 2, where the device puts A.
        dev.write_used_raw(2, ca.id, 2, USED_LAP1);
        let e = DeviceError::UsedOutOfOrder { id: u32::from(ca.id), expected: u32::from(cc.id) };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn packed_in_order_repeated_id() {
    packed(in_order(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[10]);
        l.add(q, &[], &[20]);
        q.publish().unwrap();
        let ca = pop_packed(dev);
        let cb = pop_packed(dev);
        dev.push_used(&ca, 1);
        l.expect_pop(q, a, 1);
        dev.push_used(&ca, 1);
        let e = DeviceError::UsedOutOfOrder { id: u32::from(ca.id), expected: u32::from(cb.id) };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn split_in_order_repeated_id() {
    split(in_order(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[10]);
        l.add(q, &[], &[20]);
        q.publish().unwrap();
        let ca = pop_split(dev);
        let cb = pop_split(dev);
        complete_split(dev, &ca, 1);
        l.expect_pop(q, a, 1);
        complete_split(dev, &ca, 1);
        let e = DeviceError::UsedOutOfOrder { id: u32::from(ca.id), expected: u32::from(cb.id) };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

/// Three chains (of 2, 1 and 2 descriptors) used with one used entry.
#[test]
fn split_in_order_batch_accepted() {
    split(in_order(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[8], &[10]);
        let b = l.add(q, &[], &[20]);
        let c = l.add(q, &[4], &[30]);
        q.publish().unwrap();
        let chains = [pop_split(dev), pop_split(dev), pop_split(dev)];
        assert_eq!(chains.map(|c| c.id), [0, 2, 3]);
        dev.push_used_batch(&chains, 7);
        dev.publish_used();
        l.expect_pop(q, a, 10);
        l.expect_pop(q, b, 20);
        l.expect_pop(q, c, 7);
        assert_eq!(q.pop_used(), Ok(None));
        assert_eq!(q.free_descriptors(), SIZE);
        // And the ring goes on: a chain after the batch completes normally.
        let d = l.add(q, &[1], &[2]);
        q.publish().unwrap();
        let cd = pop_split(dev);
        assert_eq!(cd.descriptors(), expected_descs(d, &[1], &[2]).as_slice());
        complete_split(dev, &cd, 2);
        l.expect_pop(q, d, 2);
        assert_eq!(q.broken(), None);
    });
}

#[test]
fn packed_in_order_batch_accepted() {
    packed(in_order(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[8], &[10]);
        let b = l.add(q, &[], &[20]);
        let c = l.add(q, &[4], &[30]);
        q.publish().unwrap();
        let chains = [pop_packed(dev), pop_packed(dev), pop_packed(dev)];
        assert_eq!(chains.map(|c| c.ring_descs), [2, 1, 2]);
        dev.push_used_batch(&chains, 7);
        assert_eq!(dev.used_position(), (5, true));
        l.expect_pop(q, a, 10);
        l.expect_pop(q, b, 20);
        l.expect_pop(q, c, 7);
        assert_eq!(q.pop_used(), Ok(None));
        assert_eq!(q.free_descriptors(), SIZE);
        // A chain after the batch (positions 5..8) completes normally.
        let d = l.add(q, &[1, 1], &[2]);
        q.publish().unwrap();
        let cd = pop_packed(dev);
        assert_eq!(cd.descriptors(), expected_descs(d, &[1, 1], &[2]).as_slice());
        dev.push_used(&cd, 2);
        l.expect_pop(q, d, 2);
        assert_eq!(q.broken(), None);
    });
}

/// The batch's length is checked against its last chain.
#[test]
fn split_in_order_batch_len_too_large() {
    split(in_order(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[8], &[10]);
        l.add(q, &[], &[20]);
        l.add(q, &[4], &[30]);
        q.publish().unwrap();
        let chains = [pop_split(dev), pop_split(dev), pop_split(dev)];
        dev.push_used_batch(&chains, 31);
        dev.publish_used();
        let e = DeviceError::UsedLenTooLarge { id: u32::from(chains[2].id), len: 31, writable: 30 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn packed_in_order_batch_len_too_large() {
    packed(in_order(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[8], &[10]);
        l.add(q, &[], &[20]);
        l.add(q, &[4], &[30]);
        q.publish().unwrap();
        let chains = [pop_packed(dev), pop_packed(dev), pop_packed(dev)];
        dev.push_used_batch(&chains, 31);
        let e = DeviceError::UsedLenTooLarge { id: u32::from(chains[2].id), len: 31, writable: 30 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

// ---------------------------------------------------------------------------
// A device scribbling over driver-written memory

/// The descriptors' `next` fields all set to 0 and the whole available ring
/// filled with 0xff: the driver never reads them back, so its free list and
/// its chains are intact (a free list kept in the `next` fields would now
/// hand descriptor 0 to every chain).
#[test]
fn split_scribbled_descriptor_table_and_avail_ring_ignored() {
    split(ev(), |q, dev, ring| {
        let layout = q.layout();
        let mut l = Ledger::default();
        let shapes: [(&[u32], &[u32]); 4] = [(&[8], &[16]), (&[], &[32]), (&[4, 4], &[8]), (&[12], &[])];
        let tokens: Vec<u32> = shapes.iter().map(|(r, w)| l.add(q, r, w)).collect();
        q.publish().unwrap();
        let chains: Vec<AvailChain> = (0..4).map(|_| pop_split(dev)).collect();
        assert_eq!(q.free_descriptors(), 1);

        for i in 0..usize::from(SIZE) {
            assert!(ring.write_bytes(layout.desc_offset() + 16 * i + 14, &[0, 0]));
        }
        let junk = vec![0xff; layout.driver_size()];
        assert!(ring.write_bytes(layout.driver_offset(), &junk));

        // Completed out of order, each with its whole writable length.
        for k in [3, 1, 0, 2] {
            let len = chains[k].writable_len() as u32;
            complete_split(dev, &chains[k], len);
            l.expect_pop(q, tokens[k], len);
        }
        assert_eq!(q.pop_used(), Ok(None));
        assert_eq!(q.free_descriptors(), SIZE);

        // Every descriptor to a different chain.
        let tokens: Vec<u32> = (0..SIZE).map(|_| l.add(q, &[], &[3])).collect();
        q.publish().unwrap();
        let chains: Vec<AvailChain> = (0..SIZE).map(|_| pop_split(dev)).collect();
        let mut ids: Vec<u16> = chains.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..SIZE).collect::<Vec<_>>());
        for (c, &t) in chains.iter().zip(&tokens) {
            assert_eq!(c.descriptors(), expected_descs(t, &[], &[3]).as_slice());
        }
        for (c, &t) in chains.iter().zip(&tokens).rev() {
            complete_split(dev, c, 3);
            l.expect_pop(q, t, 3);
        }
        // And multi-descriptor chains are linked by the driver's own list.
        let t = l.add(q, &[1, 2], &[3, 4]);
        q.publish().unwrap();
        let c = pop_split(dev);
        assert_eq!(c.descriptors(), expected_descs(t, &[1, 2], &[3, 4]).as_slice());
        complete_split(dev, &c, 7);
        l.expect_pop(q, t, 7);
        assert!(l.outstanding.is_empty());
        assert_eq!(q.broken(), None);
    });
}

/// Packed: the non-head descriptors of chains in flight rewritten to look used
/// with bogus ids and lengths, every address field and the driver event
/// suppression area overwritten: the driver skips non-head positions by its
/// own count and never reads the rest.
#[test]
fn packed_scribbled_descriptors_and_driver_area_ignored() {
    packed(ev(), |q, dev, ring| {
        let layout = q.layout();
        let mut l = Ledger::default();
        let shapes: [(&[u32], &[u32]); 3] = [(&[8], &[16]), (&[], &[32]), (&[4], &[8])];
        let tokens: Vec<u32> = shapes.iter().map(|(r, w)| l.add(q, r, w)).collect();
        q.publish().unwrap();
        let chains: Vec<AvailChain> = (0..3).map(|_| pop_packed(dev)).collect();
        assert_eq!(q.free_descriptors(), 3);

        // Positions 1 and 4 are the chains' second descriptors.
        for pos in [1u16, 4] {
            dev.write_used_raw(pos, 0x7777, u32::MAX, USED_LAP1);
        }
        for i in 0..usize::from(SIZE) {
            assert!(ring.write_bytes(layout.desc_offset() + 16 * i, &[0xee; 8]));
        }
        let junk = vec![0xff; layout.driver_size()];
        assert!(ring.write_bytes(layout.driver_offset(), &junk));

        // Out of order: C (positions 0, 1), B (2), A (3, 4).
        for k in [2, 1, 0] {
            let len = chains[k].writable_len() as u32;
            dev.push_used(&chains[k], len);
            l.expect_pop(q, tokens[k], len);
        }
        assert_eq!(q.pop_used(), Ok(None));
        assert_eq!(q.free_descriptors(), SIZE);
        assert!(q.enable_used_notifications().is_ok());

        // Three more chains of two descriptors, the second wrapping the ring.
        let tokens: Vec<u32> = (0..3).map(|_| l.add(q, &[5], &[6])).collect();
        q.publish().unwrap();
        let chains: Vec<AvailChain> = (0..3).map(|_| pop_packed(dev)).collect();
        let mut ids: Vec<u16> = chains.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 3);
        for (c, &t) in chains.iter().zip(&tokens) {
            assert_eq!(c.descriptors(), expected_descs(t, &[5], &[6]).as_slice());
        }
        for (c, &t) in chains.iter().zip(&tokens) {
            dev.push_used(c, 6);
            l.expect_pop(q, t, 6);
        }
        assert!(l.outstanding.is_empty());
        assert_eq!(q.broken(), None);
    });
}

// ---------------------------------------------------------------------------
// Endless completions

/// A device that keeps advancing the used index, naming chains that were in
/// flight, gets at most the chains in flight back, then an error.
#[test]
fn split_endless_used_index_is_bounded() {
    split(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[], &[8]);
        l.add(q, &[], &[8]);
        q.publish().unwrap();
        let ids = [pop_split(dev).id, pop_split(dev).id];
        let mut completions = 0;
        let mut error = None;
        for i in 0..100u16 {
            split_used_raw(dev, u32::from(ids[usize::from(i % 2)]), 1);
            match q.pop_used() {
                Ok(Some(u)) => {
                    l.returned(u.token);
                    completions += 1;
                }
                Ok(None) => panic!("used index moved but nothing popped"),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        assert_eq!(completions, 2);
        let e = DeviceError::UsedIndexJump { used_idx: 3, last_used: 2, in_flight: 0 };
        assert_eq!(error, Some(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

/// Marking the same position used again and again completes it once.
#[test]
fn packed_endless_same_position_is_bounded() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[8]);
        let b = l.add(q, &[], &[8]);
        q.publish().unwrap();
        let ca = pop_packed(dev);
        let cb = pop_packed(dev);
        let mut completions = 0;
        for _ in 0..100 {
            dev.write_used_raw(0, ca.id, 1, USED_LAP1);
            if let Some(u) = q.pop_used().unwrap() {
                assert_eq!((u.token, u.len), (a, 1));
                l.returned(u.token);
                completions += 1;
            }
        }
        assert_eq!(completions, 1);
        assert_eq!(q.broken(), None);
        assert_eq!(q.in_flight(), 1);
        // B completes at the driver's next position.
        dev.write_used_raw(1, cb.id, 2, USED_LAP1);
        l.expect_pop(q, b, 2);
        assert_eq!(q.pop_used(), Ok(None));
    });
}

/// Marking position after position used, with ids of chains that were in
/// flight, gets at most the chains in flight back, then an error.
#[test]
fn packed_endless_advancing_positions_is_bounded() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[], &[8]);
        l.add(q, &[], &[8]);
        q.publish().unwrap();
        let ids = [pop_packed(dev).id, pop_packed(dev).id];
        let mut completions = 0;
        let mut error = None;
        for i in 0..100u16 {
            let flags = if (i / SIZE) % 2 == 0 { USED_LAP1 } else { USED_LAP2 };
            dev.write_used_raw(i % SIZE, ids[usize::from(i % 2)], 1, flags);
            match q.pop_used() {
                Ok(Some(u)) => {
                    l.returned(u.token);
                    completions += 1;
                }
                Ok(None) => panic!("position {i} marked used but nothing popped"),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        assert_eq!(completions, 2);
        let e = DeviceError::UsedWithoutInFlight { position: 2 };
        assert_eq!(error, Some(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

// ---------------------------------------------------------------------------
// Reset after breakage

#[test]
fn split_reset_after_breakage() {
    split(ev(), |q, dev, ring| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[8]);
        l.add(q, &[1], &[8]);
        l.add(q, &[], &[8]);
        q.publish().unwrap();
        l.add(q, &[], &[8]); // not published
        let ca = pop_split(dev);
        let cb = pop_split(dev);
        complete_split(dev, &ca, 8);
        l.expect_pop(q, a, 8);
        split_used_raw(dev, 99, 0);
        let e = DeviceError::UsedIdOutOfRange { id: 99, queue_size: SIZE };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        complete_split(dev, &cb, 8);
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));

        l.reset(q);
        assert_eq!(q.pop_used(), Ok(None));

        // A reset device: the queue works again, at full size.
        let layout = q.layout();
        let mut dev = SplitDevice::new(DeviceConfig { layout, ring, features: ev(), memory: &[] }).unwrap();
        let tokens: Vec<u32> = (0..SIZE).map(|_| l.add(q, &[], &[4])).collect();
        assert!(q.publish().unwrap());
        for &t in &tokens {
            let c = pop_split(&mut dev);
            assert_eq!(c.descriptors(), expected_descs(t, &[], &[4]).as_slice());
            complete_split(&mut dev, &c, 4);
            l.expect_pop(q, t, 4);
        }
        assert_eq!(q.pop_used(), Ok(None));
        assert!(l.outstanding.is_empty());
        assert_eq!(q.free_descriptors(), SIZE);
    });
}

#[test]
fn packed_reset_after_breakage() {
    packed(ev(), |q, dev, ring| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[8]);
        l.add(q, &[1], &[8]);
        l.add(q, &[], &[8]);
        q.publish().unwrap();
        l.add(q, &[], &[8]); // not published
        let ca = pop_packed(dev);
        let cb = pop_packed(dev);
        dev.push_used(&ca, 8);
        l.expect_pop(q, a, 8);
        dev.write_used_raw(1, 99, 0, USED_LAP1);
        let e = DeviceError::UsedIdOutOfRange { id: 99, queue_size: SIZE };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
        dev.push_used(&cb, 8);
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));

        l.reset(q);
        assert_eq!(q.pop_used(), Ok(None));

        let layout = q.layout();
        let features = ev() | RingFeatures::RING_PACKED;
        let mut dev = PackedDevice::new(DeviceConfig { layout, ring, features, memory: &[] }).unwrap();
        let tokens: Vec<u32> = (0..SIZE).map(|_| l.add(q, &[], &[4])).collect();
        assert!(q.publish().unwrap());
        for &t in &tokens {
            let c = pop_packed(&mut dev);
            assert_eq!(c.descriptors(), expected_descs(t, &[], &[4]).as_slice());
            dev.push_used(&c, 4);
            l.expect_pop(q, t, 4);
        }
        assert_eq!(q.pop_used(), Ok(None));
        assert!(l.outstanding.is_empty());
        assert_eq!(q.free_descriptors(), SIZE);
    });
}

// ---------------------------------------------------------------------------
// Long-lived chains

/// Churns `rounds` batches of 7 one-buffer chains through the queue (added,
/// published, used by `device`, popped) while the caller's held chain stays
/// with the device.
fn churn<Q: DriverQueue<u32>>(q: &mut Q, rounds: u32, mut device: impl FnMut(u32)) {
    for round in 0..rounds {
        for k in 0..7 {
            q.add(&[], &[Buffer::new(0x2000, 8)], round * 7 + k).map_err(|e| e.error).unwrap();
        }
        q.publish().unwrap();
        device(7);
        for k in 0..7 {
            let u = q.pop_used().unwrap().expect("churned chain not used");
            assert_eq!((u.token, u.len), (round * 7 + k, 1));
        }
    }
}

/// A correct device may keep one chain (an event buffer, a slow request)
/// while many others go through the same queue. Its completion must still be
/// accepted after more than 2^15 later submissions.
///
/// Once failed: chains were stamped with a 16-bit publication counter and
/// `SlotTable::complete` took `(published - stamp) as i16 < 0` to mean "not
/// yet published"; once 2^15 chains had been added after the held one, the
/// held chain read as unpublished and its (correct) completion broke the
/// queue with `UsedIdNotInFlight`. Stamps are 64-bit now. (Natively only:
/// under Miri 40000 chains take too long, and the other tests cover the same
/// code for undefined behaviour.)
#[test]
#[cfg_attr(miri, ignore = "40000 chains: too slow under Miri")]
fn split_chain_held_across_40000_submissions_is_accepted() {
    split(ev(), |q, dev, _| {
        let held = u32::MAX;
        q.add(&[], &[Buffer::new(0x1000, 8)], held).map_err(|e| e.error).unwrap();
        q.publish().unwrap();
        let ch = pop_split(dev);
        churn(q, 40_000 / 7, |n| {
            for _ in 0..n {
                let c = pop_split(dev);
                dev.push_used(u32::from(c.id), 1);
            }
            dev.publish_used();
        });
        complete_split(dev, &ch, 8);
        assert_eq!(q.pop_used().map(|u| u.map(|u| (u.token, u.len))), Ok(Some((held, 8))));
        assert_eq!(q.in_flight(), 0);
    });
}

#[test]
#[cfg_attr(miri, ignore = "40000 chains: too slow under Miri")]
fn packed_chain_held_across_40000_submissions_is_accepted() {
    packed(ev(), |q, dev, _| {
        let held = u32::MAX;
        q.add(&[], &[Buffer::new(0x1000, 8)], held).map_err(|e| e.error).unwrap();
        q.publish().unwrap();
        let ch = pop_packed(dev);
        churn(q, 40_000 / 7, |n| {
            for _ in 0..n {
                let c = pop_packed(dev);
                dev.push_used(&c, 1);
            }
        });
        dev.push_used(&ch, 8);
        assert_eq!(q.pop_used().map(|u| u.map(|u| (u.token, u.len))), Ok(Some((held, 8))));
        assert_eq!(q.in_flight(), 0);
    });
}

// ---------------------------------------------------------------------------
// drain_used: the chains before a bad entry go to the caller, then the queue
// is broken.

#[test]
fn split_drain_used_stops_at_a_double_completion() {
    split(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[64]);
        l.add(q, &[], &[64]);
        q.publish().unwrap();
        let ca = pop_split(dev);
        pop_split(dev);
        dev.push_used(u32::from(ca.id), 5);
        dev.push_used(u32::from(ca.id), 6);
        dev.publish_used();
        let mut got = Vec::new();
        let e = DeviceError::UsedIdNotInFlight { id: u32::from(ca.id) };
        assert_eq!(q.drain_used(|u| got.push((u.token, u.len))), Err(Error::Broken(e)));
        assert_eq!(got, [(a, 5)]);
        l.returned(a);
        assert_eq!(q.drain_used(|_| panic!("a broken queue hands out nothing")), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn split_drain_used_checks_the_used_index() {
    split(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        l.add(q, &[], &[64]);
        q.publish().unwrap();
        let c = pop_split(dev);
        // Two entries for one chain in flight.
        dev.push_used(u32::from(c.id), 1);
        dev.push_used(u32::from(c.id), 1);
        dev.publish_used();
        let e = DeviceError::UsedIndexJump { used_idx: 2, last_used: 0, in_flight: 1 };
        assert_eq!(q.drain_used(|_| panic!("nothing is handed out past a bad index")), Err(Error::Broken(e)));
        assert_stays_broken(q, &mut l, e);
    });
}

#[test]
fn packed_drain_used_stops_at_a_double_completion() {
    packed(ev(), |q, dev, _| {
        let mut l = Ledger::default();
        let a = l.add(q, &[], &[64]);
        l.add(q, &[], &[64]);
        q.publish().unwrap();
        let ca = pop_packed(dev);
        pop_packed(dev);
        dev.push_used(&ca, 5);
        dev.push_used(&ca, 6);
        let mut got = Vec::new();
        let e = DeviceError::UsedIdNotInFlight { id: u32::from(ca.id) };
        assert_eq!(q.drain_used(|u| got.push((u.token, u.len))), Err(Error::Broken(e)));
        assert_eq!(got, [(a, 5)]);
        l.returned(a);
        assert_stays_broken(q, &mut l, e);
    });
}
