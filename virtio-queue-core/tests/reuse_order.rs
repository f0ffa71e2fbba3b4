//! The order in which freed chains are reused (see `FreedBatch` in
//! src/slots.rs): the chains one `drain_used` frees come back in the order
//! the device used them, ahead of older free entries; `pop_used` frees one
//! chain at a time at the front. Both ring formats, with the model device.

mod common;

use virtio_queue_core::device::{AvailChain, PackedDevice, SplitDevice};
use virtio_queue_core::{Buffer, RingFeatures};

const SIZE: u16 = 16;

/// A chain of two descriptors (a header the device reads, a buffer it
/// writes), so split runs of more than one descriptor are exercised.
fn chain(k: u64) -> ([Buffer; 1], [Buffer; 1]) {
    ([Buffer::new(0x10_0000 + k * 0x100, 16)], [Buffer::new(0x20_0000 + k * 0x1000, 512)])
}

/// The same scenarios for both formats; `$q` and `$dev` are a fresh queue
/// and device, `$used` pushes one used chain on the device.
macro_rules! scenarios {
    ($q:ident, $dev:ident, $used:expr) => {{
        // Four chains in flight; the device uses them out of order.
        let mut ids = Vec::new();
        for k in 0..4u32 {
            ids.push($q.next_id().unwrap());
            let (r, w) = chain(u64::from(k));
            $q.add(&r, &w, k).unwrap();
        }
        $q.publish().unwrap();
        let chains: Vec<AvailChain> = (0..4).map(|_| $dev.pop_avail().unwrap().unwrap()).collect();
        assert_eq!(chains.iter().map(|c| c.id).collect::<Vec<_>>(), ids);
        let order = [2usize, 0, 3, 1];
        for &i in &order {
            $used(&mut *$dev, &chains[i]);
        }
        $dev.publish_used();

        // One drain: the tokens come in used order, and the ids are reused
        // in that order, not reversed.
        let mut tokens = Vec::new();
        assert_eq!($q.drain_used(|u| tokens.push(u.token)).unwrap(), 4);
        assert_eq!(tokens, [2, 0, 3, 1]);
        let mut reused = Vec::new();
        for k in 4..8u32 {
            reused.push($q.next_id().unwrap());
            let (r, w) = chain(u64::from(k));
            $q.add(&r, &w, k).unwrap();
        }
        let expected: Vec<u16> = order.iter().map(|&i| ids[i]).collect();
        assert_eq!(reused, expected, "a drained batch is reused in used order");
        $q.publish().unwrap();
        let chains: Vec<AvailChain> = (0..4).map(|_| $dev.pop_avail().unwrap().unwrap()).collect();
        assert_eq!(chains.iter().map(|c| c.id).collect::<Vec<_>>(), expected);
        assert!(chains.iter().all(|c| c.descriptors().len() == 2), "each chain reused whole");

        // A batch ends when a chain is taken: the next drain's chains go in
        // front of what is left of it.
        $used(&mut *$dev, &chains[0]);
        $used(&mut *$dev, &chains[1]);
        $dev.publish_used();
        assert_eq!($q.drain_used(|_| ()).unwrap(), 2);
        let (r, w) = chain(8);
        $q.add(&r, &w, 8).unwrap();
        $q.publish().unwrap();
        let taken = $dev.pop_avail().unwrap().unwrap();
        assert_eq!(taken.id, chains[0].id);
        $used(&mut *$dev, &chains[2]);
        $dev.publish_used();
        assert_eq!($q.drain_used(|_| ()).unwrap(), 1);
        assert_eq!($q.next_id(), Some(chains[2].id), "a new batch goes to the front");
        let (r, w) = chain(9);
        $q.add(&r, &w, 9).unwrap();
        assert_eq!($q.next_id(), Some(chains[1].id), "then the rest of the older batch");

        // `pop_used` frees one chain at a time, at the front.
        $used(&mut *$dev, &chains[3]);
        $used(&mut *$dev, &taken);
        $dev.publish_used();
        assert_eq!($q.pop_used().unwrap().map(|u| u.token), Some(7));
        assert_eq!($q.pop_used().unwrap().map(|u| u.token), Some(8));
        assert_eq!($q.next_id(), Some(taken.id));
    }};
}

#[test]
fn split_chains_are_reused_in_the_order_they_were_used() {
    common::with_split(SIZE, RingFeatures::EVENT_IDX, |q, dev, _| {
        scenarios!(q, dev, |d: &mut SplitDevice<'_>, c: &AvailChain| d.push_used(u32::from(c.id), 512));
    });
}

#[test]
fn packed_ids_are_reused_in_the_order_they_were_used() {
    common::with_packed(SIZE, RingFeatures::EVENT_IDX, |q, dev, _| {
        scenarios!(q, dev, |d: &mut PackedDevice<'_>, c: &AvailChain| d.push_used(c, 512));
    });
}
