//! Looking ahead at used entries (`peek_used_ids`, see src/lookahead.rs):
//! the ids of what the device has used and the queue not taken, in ring
//! order; nothing taken; at most one ring's worth, whatever the device
//! wrote. Both ring formats, with the model device.

mod common;

use virtio_queue_core::device::AvailChain;
use virtio_queue_core::{Buffer, DeviceError, Error, RingFeatures, UsedIdHint};

const SIZE: u16 = 16;

/// A chain of `1 + writable` descriptors (a header the device reads, then
/// `writable` buffers it writes), so packed chains take different numbers
/// of ring positions.
fn chain(k: u64, writable: usize) -> ([Buffer; 1], Vec<Buffer>) {
    let w = (0..writable as u64).map(|i| Buffer::new(0x20_0000 + k * 0x1000 + i * 0x100, 64)).collect();
    ([Buffer::new(0x10_0000 + k * 0x100, 16)], w)
}

fn ids(peek: impl FnOnce(&mut dyn FnMut(UsedIdHint))) -> Vec<u32> {
    let mut v = Vec::new();
    peek(&mut |h| v.push(h.unchecked()));
    v
}

/// Adds chains with tokens `0..writables.len()`, chain `k` having
/// `writables[k]` writable buffers, and publishes them; returns the ids.
macro_rules! add_all {
    ($q:ident, $writables:expr) => {{
        let mut ids = Vec::new();
        for (k, &w) in $writables.iter().enumerate() {
            ids.push(u32::from($q.next_id().unwrap()));
            let (r, wr) = chain(k as u64, w);
            $q.add(&r, &wr, k as u32).unwrap();
        }
        $q.publish().unwrap();
        ids
    }};
}

#[test]
fn split_peek_names_the_used_ids_in_ring_order_and_takes_nothing() {
    common::with_split(SIZE, RingFeatures::EVENT_IDX, |q, dev, _| {
        let added = add_all!(q, [1, 1, 1, 1]);
        assert_eq!(ids(|f| q.peek_used_ids(f)), Vec::<u32>::new(), "nothing used yet");
        let chains: Vec<AvailChain> = (0..4).map(|_| dev.pop_avail().unwrap().unwrap()).collect();
        for i in [2usize, 0, 3] {
            dev.push_used(u32::from(chains[i].id), 1);
        }
        dev.publish_used();
        let expected = vec![added[2], added[0], added[3]];
        assert_eq!(ids(|f| q.peek_used_ids(f)), expected);
        assert_eq!(ids(|f| q.peek_used_ids(f)), expected, "a look takes nothing");
        assert_eq!(q.in_flight(), 4);

        let mut tokens = Vec::new();
        assert_eq!(q.pop_used().unwrap().map(|u| u.token), Some(2));
        assert_eq!(ids(|f| q.peek_used_ids(f)), vec![added[0], added[3]], "only what is not taken");
        q.drain_used(|u| tokens.push(u.token)).unwrap();
        assert_eq!(tokens, [0, 3]);
        assert_eq!(ids(|f| q.peek_used_ids(f)), Vec::<u32>::new());
    });
}

#[test]
fn split_peek_passes_any_id_on_unchecked_and_stops_at_one_ring() {
    common::with_split(SIZE, RingFeatures::EVENT_IDX, |q, dev, _| {
        add_all!(q, [1]);
        let c = dev.pop_avail().unwrap().unwrap();
        dev.push_used(u32::from(c.id), 1);
        dev.write_used_elem_raw(0, u32::MAX, 1);
        dev.set_used_idx_raw(40000);
        let seen = ids(|f| q.peek_used_ids(f));
        assert_eq!(seen.len(), usize::from(SIZE), "one ring's worth, not 40000");
        assert_eq!(seen[0], u32::MAX, "handed over as written, for the user to bound");
        // The look checked nothing and broke nothing: taking does both.
        let e = DeviceError::UsedIndexJump { used_idx: 40000, last_used: 0, in_flight: 1 };
        assert_eq!(q.pop_used(), Err(Error::Broken(e)));
    });
}

#[test]
fn packed_peek_steps_over_each_chains_positions() {
    common::with_packed(SIZE, RingFeatures::EVENT_IDX, |q, dev, _| {
        // 2, 4 and 3 ring positions.
        let added = add_all!(q, [1, 3, 2]);
        let chains: Vec<AvailChain> = (0..3).map(|_| dev.pop_avail().unwrap().unwrap()).collect();
        // Out of order: each used descriptor goes where the device's used
        // position is, and the next one the used chain's length further on.
        for i in [1usize, 2, 0] {
            dev.push_used(&chains[i], 1);
        }
        dev.publish_used();
        let expected = vec![added[1], added[2], added[0]];
        assert_eq!(ids(|f| q.peek_used_ids(f)), expected);
        assert_eq!(ids(|f| q.peek_used_ids(f)), expected, "a look takes nothing");

        let mut tokens = Vec::new();
        q.drain_used(|u| tokens.push(u.token)).unwrap();
        assert_eq!(tokens, [1, 2, 0]);
        assert_eq!(ids(|f| q.peek_used_ids(f)), Vec::<u32>::new());
    });
}

#[test]
fn packed_peek_stops_after_an_id_not_in_flight() {
    common::with_packed(SIZE, RingFeatures::EVENT_IDX, |q, dev, _| {
        add_all!(q, [1, 1]);
        dev.pop_avail().unwrap().unwrap();
        let b = dev.pop_avail().unwrap().unwrap();
        // Position 0 names id 9, never submitted; position 2 holds a good
        // used descriptor the walk cannot know it should reach.
        dev.write_used_raw(0, 9, 1, 0x8080);
        dev.write_used_raw(2, b.id, 1, 0x8080);
        assert_eq!(ids(|f| q.peek_used_ids(f)), vec![9]);
        let e = q.pop_used().unwrap_err();
        assert!(matches!(e, Error::Broken(_)), "taking checks what the look did not: {e:?}");
    });
}

#[test]
fn packed_in_order_peek_names_nothing() {
    common::with_packed(SIZE, RingFeatures::EVENT_IDX | RingFeatures::IN_ORDER, |q, dev, _| {
        add_all!(q, [1, 1]);
        let chains: Vec<AvailChain> = (0..2).map(|_| dev.pop_avail().unwrap().unwrap()).collect();
        dev.push_used_batch(&chains, 1);
        dev.publish_used();
        assert_eq!(ids(|f| q.peek_used_ids(f)), Vec::<u32>::new());
        assert_eq!(q.drain_used(|_| ()).unwrap(), 2);
    });
}
