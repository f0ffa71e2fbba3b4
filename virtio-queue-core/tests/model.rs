//! Property tests: random operation sequences of driver and device, for both
//! formats with and without EVENT_IDX, INDIRECT_DESC and IN_ORDER, checked
//! against a plain model of what must happen.
//!
//! Checked after every step: `add` succeeds or fails exactly as the model says
//! (and a failure leaves the queue unchanged); the device sees exactly the
//! buffers the driver added; every completion comes back once, in used-ring
//! order, with the device's length; no kick is lost when the device waits for
//! one, and no used-buffer notification is lost when the driver waits for one.

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;
use virtio_queue_core::device::{AvailChain, DeviceConfig, MemoryRegion, PackedDevice, SplitDevice};
use virtio_queue_core::{
    Buffer, ChainFrame, DriverQueue, Error, IndirectTables, LayoutError, QueueConfig, RingFeatures, RingFormat,
    RingLayout, SharedLine, SharedMemory, Slot, UsedDelay, Virtqueue,
};

const TABLE_IOVA: u64 = 0x4000_0000;
const RING_IOVA: u64 = 0x1_0000;
/// The chain frame of `AddFramed`: chain `id`'s 16-byte header at
/// `FRAME.iova + 64 id`, its 1-byte status 32 bytes further.
const FRAME: ChainFrame =
    ChainFrame { iova: 0x8000_0000, stride: 64, header_len: 16, status_offset: 32, status_len: 1 };

#[derive(Clone, Debug)]
enum Op {
    Add {
        readable: Vec<u32>,
        writable: Vec<u32>,
    },
    /// `add_framed` of one data buffer of this length, device-writable or not.
    AddFramed {
        len: u32,
        writable: bool,
    },
    Publish,
    DevicePop,
    DeviceComplete {
        pick: usize,
        len: u32,
    },
    DeviceCompleteBatch {
        n: usize,
        len: u32,
    },
    DevicePublish,
    DeviceEnableKicks,
    DeviceDisableKicks,
    DriverPop,
    /// `drain_used`: every visible completion at once.
    DriverDrain,
    EnableNotify,
    EnableNotifyDelayed,
    DisableNotify,
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![8 => 1u32..5000, 1 => Just(0u32)];
    prop_oneof![
        6 => (prop::collection::vec(len.clone(), 0..3), prop::collection::vec(len, 0..4))
            .prop_map(|(readable, writable)| Op::Add { readable, writable }),
        4 => (prop_oneof![8 => 1u32..5000, 1 => Just(0u32)], any::<bool>())
            .prop_map(|(len, writable)| Op::AddFramed { len, writable }),
        3 => Just(Op::Publish),
        4 => Just(Op::DevicePop),
        4 => (any::<usize>(), any::<u32>()).prop_map(|(pick, len)| Op::DeviceComplete { pick, len }),
        1 => (1usize..5, any::<u32>()).prop_map(|(n, len)| Op::DeviceCompleteBatch { n, len }),
        3 => Just(Op::DevicePublish),
        1 => Just(Op::DeviceEnableKicks),
        1 => Just(Op::DeviceDisableKicks),
        5 => Just(Op::DriverPop),
        2 => Just(Op::DriverDrain),
        1 => Just(Op::EnableNotify),
        1 => Just(Op::EnableNotifyDelayed),
        1 => Just(Op::DisableNotify),
    ]
}

#[derive(Clone, Copy, Debug)]
struct Config {
    format: RingFormat,
    size: u16,
    event_idx: bool,
    indirect: Option<u16>,
    in_order: bool,
    /// Framed chains straight into the ring even with tables that would
    /// hold them (`set_framed_chains_indirect(false)`).
    framed_direct: bool,
}

/// Longest random sequence.
const MAX_OPS: usize = 120;
/// Largest split queue size (log2, exclusive) and packed queue size (exclusive).
const MAX_SPLIT_LOG: u32 = 7;
const MAX_PACKED: u16 = 40;

fn config() -> impl Strategy<Value = Config> {
    (
        any::<bool>(),
        0u32..MAX_SPLIT_LOG,
        1u16..MAX_PACKED,
        any::<bool>(),
        prop::option::of(2u16..6),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(packed, log, psize, event_idx, indirect, in_order, framed_direct)| Config {
            format: if packed { RingFormat::Packed } else { RingFormat::Split },
            size: if packed { psize } else { 1 << log },
            event_idx,
            indirect,
            in_order,
            framed_direct,
        })
}

enum Dev<'a> {
    Split(SplitDevice<'a>),
    Packed(PackedDevice<'a>),
}

/// A submitted chain as the model knows it.
#[derive(Clone, Debug)]
struct Chain {
    token: u32,
    /// The id `next_id` promised before the add.
    id: u16,
    buffers: Vec<(Buffer, bool)>,
    ring_descs: u16,
    writable: u32,
}

fn run(cfg: Config, ops: &[Op]) {
    let mut features = RingFeatures::empty();
    if cfg.event_idx {
        features |= RingFeatures::EVENT_IDX;
    }
    if cfg.in_order {
        features |= RingFeatures::IN_ORDER;
    }
    if cfg.format == RingFormat::Packed {
        features |= RingFeatures::RING_PACKED;
    }
    let entries = cfg.indirect.unwrap_or(1);
    if cfg.indirect.is_some() {
        features |= RingFeatures::INDIRECT_DESC;
    }
    let layout = RingLayout::new(cfg.format, cfg.size).unwrap();
    let lines: Vec<SharedLine> = (0..layout.lines()).map(|_| SharedLine::new()).collect();
    let table_lines: Vec<SharedLine> =
        (0..IndirectTables::bytes_needed(cfg.size, entries).unwrap().div_ceil(64)).map(|_| SharedLine::new()).collect();
    let ring = SharedMemory::new(&lines);
    let tables = SharedMemory::new(&table_lines);
    let regions = [MemoryRegion { addr: TABLE_IOVA, mem: tables }];
    let mut slots: Vec<Slot<u32>> = (0..cfg.size).map(|_| Slot::new()).collect();
    let indirect = Some(IndirectTables::new(tables, TABLE_IOVA, entries).unwrap());
    let mut q = Virtqueue::new(
        QueueConfig { queue_size: cfg.size, ring, ring_iova: RING_IOVA, features, indirect },
        slots.as_mut_slice(),
    )
    .unwrap();
    q.set_chain_frame(FRAME).unwrap();
    let tables_hold_framed = cfg.indirect.is_some_and(|e| e >= 3);
    assert_eq!(q.framed_chains_indirect(), tables_hold_framed);
    if cfg.framed_direct {
        q.set_framed_chains_indirect(false).unwrap();
        assert!(!q.framed_chains_indirect());
    } else if !tables_hold_framed {
        assert_eq!(q.set_framed_chains_indirect(true), Err(LayoutError::IndirectTablesTooSmall));
    }
    let dcfg = DeviceConfig { layout, ring, features, memory: &regions };
    let mut dev = match cfg.format {
        RingFormat::Split => Dev::Split(SplitDevice::new(dcfg).unwrap()),
        RingFormat::Packed => Dev::Packed(PackedDevice::new(dcfg).unwrap()),
    };

    let mut next_token = 0u32;
    // Driver side: added and not yet published; published and not yet seen by the device.
    let mut unpublished: VecDeque<Chain> = VecDeque::new();
    let mut published: VecDeque<Chain> = VecDeque::new();
    // Device side: popped and not completed; completed but not visible; visible to the driver.
    let mut at_device: Vec<(Chain, AvailChain)> = Vec::new();
    let mut pending: Vec<(u32, u32)> = Vec::new();
    let mut visible: VecDeque<(u32, u32)> = VecDeque::new();
    let mut in_flight: u16 = 0;
    let mut ring_descs: HashMap<u32, u16> = HashMap::new();
    let mut used_ring_descs: u16 = 0;
    let mut device_waiting = false;
    let mut driver_waiting = false;

    let all_ops = ops.iter().cloned().chain(drain_ops(cfg.size));
    for op in all_ops {
        match op {
            Op::Add { .. } | Op::AddFramed { .. } => {
                let token = next_token;
                next_token += 1;
                let mk = |i: usize, len: u32| Buffer::new(u64::from(token) << 20 | (i as u64) << 12, len);
                let next_id = q.next_id();
                // A framed chain is the chain of its id's header, the data and
                // its id's status; without a free id `add_framed` must fail
                // like `add` of any three buffers.
                let frame_id = next_id.unwrap_or(0);
                let header = Buffer::new(FRAME.iova + 64 * u64::from(frame_id), FRAME.header_len);
                let status = Buffer::new(header.addr + 32, FRAME.status_len);
                let (r, w, framed): (Vec<Buffer>, Vec<Buffer>, _) = match &op {
                    Op::Add { readable, writable } => (
                        readable.iter().enumerate().map(|(i, &l)| mk(i, l)).collect(),
                        writable.iter().enumerate().map(|(i, &l)| mk(i + 8, l)).collect(),
                        None,
                    ),
                    &Op::AddFramed { len, writable } => {
                        let data = mk(0, len);
                        if writable {
                            (vec![header], vec![data, status], Some((data, true)))
                        } else {
                            (vec![header, data], vec![status], Some((data, false)))
                        }
                    }
                    _ => unreachable!(),
                };
                let n = r.len() + w.len();
                let free = cfg.size - used_ring_descs;
                // A framed chain in the ring's layout goes into a table only
                // while fewer than three descriptors (positions) are free.
                let framed_in_ring = framed.is_some() && cfg.framed_direct && free >= 3;
                let use_indirect = cfg.indirect.is_some_and(|e| n > 1 && n <= e as usize) && !framed_in_ring;
                let need = if use_indirect { 1 } else { n as u16 };
                let ids_full = cfg.format == RingFormat::Packed && in_flight == cfg.size;
                let expected = if n == 0 {
                    Err(Error::EmptyChain)
                } else if !use_indirect && n > cfg.size as usize {
                    Err(Error::TooManyBuffers { buffers: n, max: cfg.size.max(entries) as usize })
                } else if need > free || ids_full {
                    Err(Error::QueueFull)
                } else if r.iter().chain(&w).any(|b| b.len == 0) {
                    Err(Error::ZeroLengthBuffer)
                } else {
                    Ok(())
                };
                let before = (q.in_flight(), q.free_descriptors());
                let added = match framed {
                    Some((data, writable)) => q.add_framed(data, writable, token),
                    None => q.add(&r, &w, token),
                };
                match added {
                    Ok(()) => {
                        assert_eq!(expected, Ok(()), "add succeeded");
                        let id = next_id.expect("an add succeeded while next_id said no id was free");
                        let mut buffers: Vec<(Buffer, bool)> = r.iter().map(|b| (*b, false)).collect();
                        buffers.extend(w.iter().map(|b| (*b, true)));
                        let writable = w.iter().map(|b| b.len).sum();
                        ring_descs.insert(token, need);
                        unpublished.push_back(Chain { token, id, buffers, ring_descs: need, writable });
                        in_flight += 1;
                        used_ring_descs += need;
                    }
                    Err(e) => {
                        assert_eq!(Err(e.error), expected);
                        assert_eq!(e.token, token);
                        assert_eq!((q.in_flight(), q.free_descriptors()), before, "failed add changed the queue");
                    }
                }
            }
            Op::Publish => {
                let had_new = !unpublished.is_empty();
                let kick = q.publish().unwrap();
                published.extend(unpublished.drain(..));
                if !had_new {
                    assert!(!kick, "kick without new chains");
                }
                if device_waiting && had_new {
                    assert!(kick, "lost kick: the device waits and new chains were published");
                }
                if kick {
                    device_waiting = false;
                }
            }
            Op::DevicePop => {
                let got = match &mut dev {
                    Dev::Split(d) => d.pop_avail(),
                    Dev::Packed(d) => d.pop_avail(),
                }
                .expect("the driver broke the protocol");
                match got {
                    None => assert!(published.is_empty(), "published chain not visible"),
                    Some(chain) => {
                        let c = published.pop_front().expect("device saw an unpublished chain");
                        let seen: Vec<(Buffer, bool)> =
                            chain.descriptors().iter().map(|d| (Buffer::new(d.addr, d.len), d.writable)).collect();
                        assert_eq!(seen, c.buffers, "device sees other buffers than were added");
                        assert_eq!(chain.ring_descs, c.ring_descs);
                        assert_eq!(chain.id, c.id, "the chain's id is not the one next_id promised");
                        at_device.push((c, chain));
                    }
                }
            }
            Op::DeviceComplete { pick, len } => {
                if at_device.is_empty() {
                    continue;
                }
                let i = if cfg.in_order { 0 } else { pick % at_device.len() };
                let (c, chain) = at_device.remove(i);
                let len = if c.writable == 0 { 0 } else { len % (c.writable + 1) };
                match &mut dev {
                    Dev::Split(d) => {
                        d.push_used(u32::from(chain.id), len);
                        pending.push((c.token, len));
                    }
                    Dev::Packed(d) => {
                        d.push_used(&chain, len);
                        visible.push_back((c.token, len));
                    }
                }
            }
            Op::DeviceCompleteBatch { n, len } => {
                if !cfg.in_order || at_device.is_empty() {
                    continue;
                }
                let n = n.min(at_device.len());
                let batch: Vec<(Chain, AvailChain)> = at_device.drain(..n).collect();
                let last = &batch[n - 1].0;
                let len = if last.writable == 0 { 0 } else { len % (last.writable + 1) };
                let chains: Vec<AvailChain> = batch.iter().map(|(_, a)| *a).collect();
                let done: Vec<(u32, u32)> = batch
                    .iter()
                    .enumerate()
                    .map(|(k, (c, _))| (c.token, if k + 1 == n { len } else { c.writable }))
                    .collect();
                match &mut dev {
                    Dev::Split(d) => {
                        d.push_used_batch(&chains, len);
                        pending.extend(done);
                    }
                    Dev::Packed(d) => {
                        d.push_used_batch(&chains, len);
                        visible.extend(done);
                    }
                }
            }
            Op::DevicePublish => {
                let had_new = !pending.is_empty() || cfg.format == RingFormat::Packed;
                let notify = match &mut dev {
                    Dev::Split(d) => d.publish_used(),
                    Dev::Packed(d) => d.publish_used(),
                };
                visible.extend(pending.drain(..));
                if driver_waiting && had_new && notify {
                    driver_waiting = false;
                }
                if driver_waiting && had_new && !visible.is_empty() {
                    panic!("lost used-buffer notification: the driver waits and completions were published");
                }
            }
            Op::DeviceEnableKicks => {
                let more = match &mut dev {
                    Dev::Split(d) => d.enable_kicks(),
                    Dev::Packed(d) => d.enable_kicks(),
                };
                assert_eq!(more, !published.is_empty(), "enable_kicks re-check");
                device_waiting = !more;
            }
            Op::DeviceDisableKicks => {
                match &mut dev {
                    Dev::Split(d) => d.disable_kicks(),
                    Dev::Packed(d) => d.disable_kicks(),
                }
                device_waiting = false;
            }
            Op::DriverPop => {
                let got = q.pop_used().unwrap();
                match visible.pop_front() {
                    None => assert_eq!(got, None),
                    Some((token, len)) => {
                        let u = got.expect("published completion not seen");
                        assert_eq!((u.token, u.len), (token, len));
                        // A driver that pops is awake; it re-arms before it waits again.
                        driver_waiting = false;
                        in_flight -= 1;
                        // The model frees the chain's ring descriptors when the driver sees it.
                        used_ring_descs -= ring_descs.remove(&token).expect("completed chain was submitted");
                    }
                }
            }
            Op::DriverDrain => {
                let mut got = Vec::new();
                let n = q.drain_used(|u| got.push((u.token, u.len))).unwrap();
                assert_eq!(n, got.len());
                let want: Vec<(u32, u32)> = visible.drain(..).collect();
                assert_eq!(got, want, "drain_used hands out every visible completion, in order");
                if !got.is_empty() {
                    driver_waiting = false;
                }
                for (token, _) in got {
                    in_flight -= 1;
                    used_ring_descs -= ring_descs.remove(&token).expect("completed chain was submitted");
                }
            }
            Op::EnableNotify => {
                let ready = q.enable_used_notifications().unwrap();
                assert_eq!(ready, !visible.is_empty(), "enable_used_notifications re-check");
                driver_waiting = !ready;
            }
            Op::EnableNotifyDelayed => {
                q.enable_used_notifications_delayed().unwrap();
                driver_waiting = false;
            }
            Op::DisableNotify => {
                q.disable_used_notifications();
                driver_waiting = false;
            }
        }
        assert_eq!(q.in_flight(), in_flight);
        assert_eq!(q.free_descriptors(), cfg.size - used_ring_descs);
        assert_eq!(q.broken(), None);
    }
    assert_eq!(in_flight, 0, "drain left chains in flight");
}

/// Operations appended to every sequence so everything completes.
fn drain_ops(size: u16) -> impl Iterator<Item = Op> {
    let n = size as usize * 2 + 2;
    std::iter::once(Op::Publish)
        .chain((0..n).flat_map(|_| {
            [Op::DevicePop, Op::DeviceComplete { pick: 0, len: u32::MAX }, Op::DevicePublish, Op::DriverPop]
        }))
        .chain((0..n).map(|_| Op::DriverPop))
}

proptest! {
    // 512 cases unless PROPTEST_CASES says otherwise.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
    ))]

    #[test]
    #[cfg_attr(miri, ignore = "a single random case can take minutes under Miri; every_feature_combination runs the same code deterministically there")]
    fn random_operations_match_the_model(cfg in config(), ops in prop::collection::vec(op(), 0..MAX_OPS)) {
        run(cfg, &ops);
    }
}

/// Every format and feature combination once, with a fixed busy sequence.
#[test]
fn every_feature_combination() {
    // Fewer rounds under Miri, which runs the same paths a thousand times slower.
    let rounds = if cfg!(miri) { 3 } else { 200 };
    let ops: Vec<Op> = (0..rounds)
        .flat_map(|i| {
            [
                Op::Add { readable: vec![16], writable: vec![4096, 1] },
                Op::Add { readable: vec![16 + i], writable: vec![] },
                Op::AddFramed { len: 512 + i, writable: i % 3 != 0 },
                Op::AddFramed { len: 4096, writable: true },
                Op::Publish,
                Op::DevicePop,
                Op::DevicePop,
                Op::DeviceComplete { pick: i as usize, len: 100 },
                Op::DevicePop,
                Op::DeviceComplete { pick: i as usize + 1, len: 4097 },
                Op::DeviceCompleteBatch { n: 2, len: 1 },
                Op::DevicePublish,
                Op::DriverPop,
                Op::EnableNotify,
                Op::DriverPop,
                Op::DevicePublish,
                Op::DriverDrain,
            ]
        })
        .collect();
    for format in [RingFormat::Split, RingFormat::Packed] {
        for size in [1u16, 4, 8] {
            for event_idx in [false, true] {
                for (indirect, framed_direct) in [(None, false), (Some(4), false), (Some(4), true)] {
                    for in_order in [false, true] {
                        let size = if format == RingFormat::Packed && size == 8 { 7 } else { size };
                        run(Config { format, size, event_idx, indirect, in_order, framed_direct }, &ops);
                    }
                }
            }
        }
    }
}

/// Found by the `ops` fuzz target: with EVENT_IDX, the delayed re-arm of a
/// packed queue looked only at the event position, which can lie inside a
/// chain the device has already used and so is never marked used itself; it
/// then said "wait" although the device had passed the event, and the
/// notification was lost.
#[test]
fn packed_delayed_enable_sees_a_used_multi_descriptor_chain() {
    let features = RingFeatures::RING_PACKED | RingFeatures::EVENT_IDX;
    let layout = RingLayout::packed(8).unwrap();
    let lines: Vec<SharedLine> = (0..layout.lines()).map(|_| SharedLine::new()).collect();
    let ring = SharedMemory::new(&lines);
    let mut slots: Vec<Slot<u32>> = (0..8).map(|_| Slot::new()).collect();
    let cfg = QueueConfig { queue_size: 8, ring, ring_iova: RING_IOVA, features, indirect: None };
    let mut q = virtio_queue_core::PackedQueue::new(cfg, slots.as_mut_slice()).unwrap();
    let mut dev = PackedDevice::new(DeviceConfig { layout, ring, features, memory: &[] }).unwrap();

    // One chain at positions 0 and 1, used: 2 positions in flight put the
    // delayed event at position 1, inside the used chain, already passed.
    q.add(&[Buffer::new(0x1000, 16)], &[Buffer::new(0x2000, 16)], 7).unwrap();
    q.publish().unwrap();
    let c = dev.pop_avail().unwrap().unwrap();
    dev.push_used(&c, 16);
    dev.publish_used();
    assert!(q.enable_used_notifications_delayed().unwrap(), "the device already passed the event");
    assert_eq!(q.pop_used().unwrap().map(|u| u.token), Some(7));

    // Two chains at positions 2, 3 and 4; the first is used. 3 positions in
    // flight put the event 2 positions on, at 4: where the device writes
    // next, not yet passed, so the driver may wait and must be notified.
    q.add(&[Buffer::new(0x1000, 16)], &[Buffer::new(0x2000, 16)], 8).unwrap();
    q.add(&[Buffer::new(0x3000, 16)], &[], 9).unwrap();
    q.publish().unwrap();
    let c = dev.pop_avail().unwrap().unwrap();
    dev.push_used(&c, 16);
    assert!(!dev.publish_used(), "event not reached yet");
    assert!(!q.enable_used_notifications_delayed().unwrap(), "nothing passed the event");
    let c = dev.pop_avail().unwrap().unwrap();
    dev.push_used(&c, 0);
    assert!(dev.publish_used(), "the device notifies at the event");
}

/// `enable_used_notifications_delayed_by(Half)` with EVENT_IDX: 8 one-buffer
/// chains in flight put the event 4 entries on; the device notifies when its
/// used index passes it, and a re-arm after that says "poll".
#[test]
fn delayed_by_half_notifies_after_half_of_what_is_in_flight() {
    for format in [RingFormat::Split, RingFormat::Packed] {
        let mut features = RingFeatures::EVENT_IDX;
        let layout = if format == RingFormat::Packed {
            features |= RingFeatures::RING_PACKED;
            RingLayout::packed(16).unwrap()
        } else {
            RingLayout::split(16).unwrap()
        };
        let lines: Vec<SharedLine> = (0..layout.lines()).map(|_| SharedLine::new()).collect();
        let ring = SharedMemory::new(&lines);
        let mut slots: Vec<Slot<u32>> = (0..16).map(|_| Slot::new()).collect();
        let cfg = QueueConfig { queue_size: 16, ring, ring_iova: RING_IOVA, features, indirect: None };
        let mut q = virtio_queue_core::Virtqueue::new(cfg, slots.as_mut_slice()).unwrap();
        let dcfg = DeviceConfig { layout, ring, features, memory: &[] };
        let mut split_dev = (format == RingFormat::Split).then(|| SplitDevice::new(dcfg).unwrap());
        let mut packed_dev = (format == RingFormat::Packed).then(|| PackedDevice::new(dcfg).unwrap());
        // Serves one chain and publishes it; whether the device notifies.
        let mut serve_one = || -> bool {
            if let Some(d) = split_dev.as_mut() {
                let c = d.pop_avail().unwrap().unwrap();
                d.push_used(u32::from(c.id), 0);
                d.publish_used()
            } else {
                let d = packed_dev.as_mut().unwrap();
                let c = d.pop_avail().unwrap().unwrap();
                d.push_used(&c, 0);
                d.publish_used()
            }
        };
        for token in 0..8 {
            q.add(&[], &[Buffer::new(0x1000 + u64::from(token) * 0x100, 16)], token).unwrap();
        }
        q.publish().unwrap();
        assert!(!q.enable_used_notifications_delayed_by(UsedDelay::Half).unwrap(), "{format:?}: nothing used yet");
        let notified: Vec<bool> = (0..8).map(|_| serve_one()).collect();
        assert_eq!(notified.iter().position(|&n| n), Some(4), "{format:?}: the 5th used chain passes the event");
        assert!(q.enable_used_notifications_delayed_by(UsedDelay::Half).unwrap(), "{format:?}: already passed");
    }
}

/// A queue of `format` and size 8 (no indirect tables) with its device model,
/// handed to `f`.
/// An 8-entry queue of `format` with EVENT_IDX and, with `indirect`,
/// INDIRECT_DESC and tables of that many entries; its device; and a way to
/// make a new device (as after a reset).
fn with_queue(
    format: RingFormat,
    indirect: Option<u16>,
    f: impl for<'m> FnOnce(&mut Virtqueue<'m, u32>, &mut Dev<'m>, &dyn Fn() -> Dev<'m>),
) {
    let mut features = RingFeatures::EVENT_IDX;
    if format == RingFormat::Packed {
        features |= RingFeatures::RING_PACKED;
    }
    if indirect.is_some() {
        features |= RingFeatures::INDIRECT_DESC;
    }
    let entries = indirect.unwrap_or(1);
    let layout = RingLayout::new(format, 8).unwrap();
    let lines: Vec<SharedLine> = (0..layout.lines()).map(|_| SharedLine::new()).collect();
    let table_lines: Vec<SharedLine> =
        (0..IndirectTables::bytes_needed(8, entries).unwrap().div_ceil(64)).map(|_| SharedLine::new()).collect();
    let ring = SharedMemory::new(&lines);
    let tables = SharedMemory::new(&table_lines);
    let regions = [MemoryRegion { addr: TABLE_IOVA, mem: tables }];
    let mut slots: Vec<Slot<u32>> = (0..8).map(|_| Slot::new()).collect();
    let indirect = indirect.map(|_| IndirectTables::new(tables, TABLE_IOVA, entries).unwrap());
    let config = QueueConfig { queue_size: 8, ring, ring_iova: RING_IOVA, features, indirect };
    let mut q = Virtqueue::new(config, slots.as_mut_slice()).unwrap();
    let new_dev = || {
        let dcfg = DeviceConfig { layout, ring, features, memory: &regions };
        match format {
            RingFormat::Split => Dev::Split(SplitDevice::new(dcfg).unwrap()),
            RingFormat::Packed => Dev::Packed(PackedDevice::new(dcfg).unwrap()),
        }
    };
    let mut dev = new_dev();
    f(&mut q, &mut dev, &new_dev);
}

#[test]
fn add_framed_needs_a_chain_frame() {
    for format in [RingFormat::Split, RingFormat::Packed] {
        with_queue(format, None, |q, _, _| {
            let e = q.add_framed(Buffer::new(0x1000, 512), true, 7).unwrap_err();
            assert_eq!((e.error, e.token), (Error::NoChainFrame, 7));
            assert_eq!((q.in_flight(), q.free_descriptors()), (0, 8));
        });
    }
}

#[test]
fn chain_frames_are_checked_against_the_queue() {
    let bad = [
        ChainFrame { header_len: 0, ..FRAME },
        ChainFrame { status_len: 0, ..FRAME },
        // Chain 7's header would end beyond the 64-bit address space.
        ChainFrame { iova: u64::MAX - 7 * 64 - 8, ..FRAME },
        ChainFrame { status_offset: u32::MAX, iova: u64::MAX - u64::from(u32::MAX), ..FRAME },
        // No room for a data byte within 4 GiB.
        ChainFrame { header_len: u32::MAX - 1, status_len: 1, ..FRAME },
    ];
    for format in [RingFormat::Split, RingFormat::Packed] {
        with_queue(format, None, |q, _, _| {
            for frame in bad {
                assert_eq!(
                    q.set_chain_frame(frame),
                    Err(virtio_queue_core::LayoutError::InvalidChainFrame),
                    "{frame:?}"
                );
            }
            let most = ChainFrame { header_len: u32::MAX - 2, status_len: 1, ..FRAME };
            q.set_chain_frame(most).unwrap();
            // One data byte fits; two make the chain longer than 4 GiB.
            assert_eq!(q.add_framed(Buffer::new(0x1000, 2), false, 1).unwrap_err().error, Error::ChainTooLong);
            q.add_framed(Buffer::new(0x1000, 1), false, 1).unwrap();
        });
    }
}

/// Framed chains reuse the header and status descriptors a chain of the same
/// id left in a split table or in its indirect table; a `reset` (which zeroes
/// the ring), a new frame and plain `add`s in between (which write the same
/// descriptors and tables) must not leave the device stale descriptors. With
/// tables of three or more entries a framed chain is indirect and takes one
/// ring descriptor, as `add` would make it; with smaller ones, or with the
/// ring's layout chosen (switched back and forth here), three.
#[test]
fn framed_chains_survive_reset_frame_changes_and_plain_adds() {
    for (format, indirect) in [RingFormat::Split, RingFormat::Packed]
        .into_iter()
        .flat_map(|f| [None, Some(2), Some(3), Some(8)].map(|i| (f, i)))
    {
        let tables = indirect.is_some_and(|e| e >= 3);
        with_queue(format, indirect, |q, dev, new_dev| {
            let mut frame = FRAME;
            q.set_chain_frame(frame).unwrap();
            let mut in_table = tables;
            for round in 0..40u32 {
                if tables && round % 10 == 5 {
                    in_table = !in_table;
                    q.set_framed_chains_indirect(in_table).unwrap();
                }
                match round % 10 {
                    3 => {
                        // As after a device reset: the ring is zeroed on both sides.
                        q.reset(|_| ());
                        *dev = new_dev();
                    }
                    6 => {
                        frame.iova += 0x10_0000;
                        q.set_chain_frame(frame).unwrap();
                    }
                    // A plain chain into the table (or the descriptors) the
                    // next framed chain takes.
                    8 => q.add(&[Buffer::new(0x5000, 8)], &[Buffer::new(0x6000, 8)], 1000 + round).unwrap(),
                    _ => {}
                }
                let id = q.next_id().unwrap();
                let data = Buffer::new(0x10_0000 * u64::from(round + 1), 512 + round);
                let free = q.free_descriptors();
                q.add_framed(data, round % 2 == 0, round).unwrap();
                assert_eq!(free - q.free_descriptors(), if in_table { 1 } else { 3 }, "round {round}");
                q.publish().unwrap();
                let mut seen = Vec::new();
                loop {
                    let chain = match dev {
                        Dev::Split(d) => d.pop_avail(),
                        Dev::Packed(d) => d.pop_avail(),
                    }
                    .unwrap();
                    let Some(chain) = chain else { break };
                    seen.push(chain);
                }
                let chain = seen.last().unwrap();
                let header = Buffer::new(frame.iova + 64 * u64::from(id), 16);
                let status = Buffer::new(header.addr + 32, 1);
                let got: Vec<(u64, u32, bool)> =
                    chain.descriptors().iter().map(|d| (d.addr, d.len, d.writable)).collect();
                let want = vec![
                    (header.addr, header.len, false),
                    (data.addr, data.len, round % 2 == 0),
                    (status.addr, status.len, true),
                ];
                assert_eq!(got, want, "round {round}");
                assert_eq!(chain.indirect, in_table, "round {round}");
                for c in &seen {
                    match dev {
                        Dev::Split(d) => d.push_used(u32::from(c.id), 1),
                        Dev::Packed(d) => d.push_used(c, 1),
                    }
                }
                match dev {
                    Dev::Split(d) => {
                        d.publish_used();
                    }
                    Dev::Packed(_) => {}
                }
                let mut popped = 0;
                while let Some(u) = q.pop_used().unwrap() {
                    assert!(u.token == round || u.token == 1000 + round);
                    popped += 1;
                }
                assert_eq!(popped, seen.len());
            }
        });
    }
}
