//! Operation sequences against a correct device: the driver queue must agree
//! exactly with a reference model.
#![no_main]

use std::collections::{HashMap, VecDeque};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_queue_core::device::{AvailChain, DescInfo};
use virtio_queue_core::Buffer;
use virtio_queue_core::DriverQueue;
use vq_fuzz::{expected_add, expected_add_framed, expected_descs, with_queue, AddSpec, FramedSpec, Parts};

#[derive(Arbitrary, Debug)]
enum Op {
    Add(AddSpec),
    /// `add_framed`, checked against `add` of the same three buffers.
    AddFramed(FramedSpec),
    Publish,
    DevPop,
    /// Complete a popped chain: `pick` chooses which (oldest under IN_ORDER),
    /// `len` the length written (reduced to the writable length), `batch`
    /// how many under IN_ORDER (one used entry for all).
    DevComplete {
        pick: u16,
        len: u32,
        batch: u8,
    },
    DevPublish,
    DrvPop,
    DrvDrain,
    /// `drain_used`, checked like a `pop_used` per chain.
    DrvDrainUsed,
    DrvEnable,
    DrvEnableDelayed,
    DrvDisable,
    DevEnableKicks,
    DevDisableKicks,
    /// Pop everything available, complete it all, publish.
    DevRun {
        len: u32,
        batch: u8,
    },
}

/// A chain the driver added.
#[derive(Clone, Debug)]
struct Rec {
    token: u32,
    descs: Vec<DescInfo>,
    writable: u32,
    indirect: bool,
    /// Ring descriptors (split) or ring positions (packed) it takes.
    units: u16,
}

/// A completion the driver must return.
#[derive(Clone, Debug)]
struct Exp {
    token: u32,
    len: u32,
    /// Used-index units (split: 1 per chain) or ring positions (packed).
    notify_units: u64,
    /// First chain of a used entry (false for the later chains of an IN_ORDER batch).
    starts_entry: bool,
}

struct Model {
    next_token: u32,
    /// Added, not published.
    pending: VecDeque<Rec>,
    /// Published, not popped by the device.
    avail: VecDeque<Rec>,
    /// Popped by the device, not completed, in pop order.
    held: Vec<(AvailChain, Rec)>,
    /// Completed by the device, not yet visible (split: not published).
    pushed: VecDeque<Exp>,
    /// Visible to the driver, not yet returned.
    visible: VecDeque<Exp>,
    /// Token -> descriptor/position units, for every chain added and not returned.
    outstanding: HashMap<u32, u16>,
    /// Continuum counters in notification units.
    dev_pushed: u64,
    dev_published: u64,
    dev_dirty: bool,
    drv_consumed: u64,
    /// The driver asked for a used-buffer notification at this continuum point
    /// (and was told to wait).
    int_arm: Option<u64>,
    /// The device asked for a kick (and was told to wait).
    kick_arm: bool,
}

impl Model {
    fn used_units(&self) -> u32 {
        self.outstanding.values().map(|&u| u32::from(u)).sum()
    }
}

fn check_counts(p: &Parts<'_>, m: &Model) {
    assert_eq!(p.q.broken(), None);
    assert_eq!(usize::from(p.q.in_flight()), m.outstanding.len(), "in_flight");
    assert_eq!(u32::from(p.q.free_descriptors()), u32::from(p.cfg.size) - m.used_units(), "free descriptors/positions");
}

fn add(p: &mut Parts<'_>, m: &mut Model, spec: &AddSpec) {
    let (r, w) = spec.buffers();
    add_chain(p, m, &r, &w, None);
}

/// `add_framed` on the id `next_id` names (any id when none is free: the
/// add must then fail).
fn add_framed(p: &mut Parts<'_>, m: &mut Model, spec: &FramedSpec) {
    let (data, r, w) = spec.buffers(p.q.next_id().unwrap_or(0));
    add_chain(p, m, &r, &w, Some((data, spec.writable)));
}

/// Adds `r` then `w` with `add`, or (`framed`) the same chain with
/// `add_framed`, and checks the result against the model.
fn add_chain(p: &mut Parts<'_>, m: &mut Model, r: &[Buffer], w: &[Buffer], framed: Option<(Buffer, bool)>) {
    let (r, w) = (r.to_vec(), w.to_vec());
    let token = m.next_token;
    m.next_token = m.next_token.wrapping_add(1);
    let free = u32::from(p.cfg.size) - m.used_units();
    let expected = match framed {
        Some(_) => expected_add_framed(&p.cfg, &r, &w, free, m.outstanding.len() as u32),
        None => expected_add(&p.cfg, &r, &w, free, m.outstanding.len() as u32),
    };
    let before = if expected.is_err() { Some((p.snapshot(), p.q.in_flight(), p.q.free_descriptors())) } else { None };
    let res = match framed {
        Some((data, writable)) => p.q.add_framed(data, writable, token),
        None => p.q.add(&r, &w, token),
    };
    match (expected, res) {
        (Ok((indirect, units)), Ok(())) => {
            let writable = w.iter().map(|b| b.len).sum();
            m.pending.push_back(Rec { token, descs: expected_descs(&r, &w), writable, indirect, units });
            m.outstanding.insert(token, units);
        }
        (Err(errs), Err(ae)) => {
            assert!(errs.contains(&ae.error), "add error {:?}, expected one of {errs:?} for r={r:?} w={w:?}", ae.error);
            assert_eq!(ae.token, token, "token handed back");
            let (snap, in_flight, free) = before.expect("snapshot taken");
            assert_eq!((p.q.in_flight(), p.q.free_descriptors()), (in_flight, free), "failed add changed counts");
            for ((off, a), (_, b)) in snap.iter().zip(p.snapshot()) {
                if *a != b {
                    let diff: Vec<(usize, u8, u8)> = a
                        .iter()
                        .zip(&b)
                        .enumerate()
                        .filter(|(_, (x, y))| x != y)
                        .map(|(i, (x, y))| (off.wrapping_add(i), *x, *y))
                        .take(16)
                        .collect();
                    panic!("failed add ({:?}) wrote device-visible memory: (offset, before, after) {diff:?}", ae.error);
                }
            }
        }
        (e, r2) => panic!("add: expected {e:?}, got {r2:?}"),
    }
}

fn publish(p: &mut Parts<'_>, m: &mut Model) {
    let r = p.q.publish().expect("publish");
    if m.pending.is_empty() {
        assert!(!r, "kick requested for an empty publish");
    } else {
        if m.kick_arm {
            assert!(r, "lost kick: device enabled kicks and waited, driver published without kicking");
        }
        m.kick_arm = false;
        m.avail.extend(m.pending.drain(..));
    }
}

fn dev_pop(p: &mut Parts<'_>, m: &mut Model) -> bool {
    match p.dev.pop_avail() {
        Err(e) => panic!("device model rejected a chain our driver built: {e:?}"),
        Ok(None) => {
            assert!(m.avail.is_empty(), "device does not see {} published chain(s)", m.avail.len());
            false
        }
        Ok(Some(c)) => {
            let rec = m.avail.pop_front().expect("device popped a chain the driver had not published");
            assert_eq!(c.descriptors(), &rec.descs[..], "buffers of token {}", rec.token);
            assert_eq!(c.indirect, rec.indirect, "indirect");
            assert_eq!(c.ring_descs, rec.units, "ring descriptors/positions");
            assert!(m.held.iter().all(|(h, _)| h.id != c.id), "id {} given to two chains in flight", c.id);
            m.held.push((c, rec));
            true
        }
    }
}

fn pick_len(sel: u32, writable: u32) -> u32 {
    if writable == 0 {
        0
    } else if sel & 1 == 0 {
        writable
    } else {
        (u64::from(sel >> 1) % (u64::from(writable) + 1)) as u32
    }
}

fn dev_complete(p: &mut Parts<'_>, m: &mut Model, pick: u16, len: u32, batch: u8) {
    if m.held.is_empty() {
        return;
    }
    let packed = p.cfg.packed;
    let units = |r: &Rec| if packed { u64::from(r.units) } else { 1 };
    let mut exps = Vec::new();
    if p.cfg.in_order {
        let k = 1 + usize::from(batch) % m.held.len();
        let done: Vec<(AvailChain, Rec)> = m.held.drain(..k).collect();
        let last_w = done.last().map(|(_, r)| r.writable).unwrap_or(0);
        let len = pick_len(len, last_w);
        if k == 1 && pick & 1 == 0 {
            p.dev.push_used(&done[0].0, len);
        } else {
            let chains: Vec<AvailChain> = done.iter().map(|(c, _)| *c).collect();
            p.dev.push_used_batch(&chains, len);
        }
        for (i, (_, r)) in done.iter().enumerate() {
            let l = if i + 1 == k { len } else { r.writable };
            exps.push(Exp { token: r.token, len: l, notify_units: units(r), starts_entry: i == 0 });
        }
    } else {
        let i = usize::from(pick) % m.held.len();
        let (c, r) = m.held.remove(i);
        let len = pick_len(len, r.writable);
        p.dev.push_used(&c, len);
        exps.push(Exp { token: r.token, len, notify_units: units(&r), starts_entry: true });
    }
    m.dev_pushed += exps.iter().map(|e| e.notify_units).sum::<u64>();
    m.dev_dirty = true;
    if packed {
        // A packed used descriptor is visible as soon as it is written.
        m.visible.extend(exps);
    } else {
        m.pushed.extend(exps);
    }
}

fn dev_publish(p: &mut Parts<'_>, m: &mut Model) {
    let r = p.dev.publish_used();
    if !m.dev_dirty {
        assert!(!r, "device notified without new used entries");
    }
    m.dev_dirty = false;
    let (old, new) = (m.dev_published, m.dev_pushed);
    if let Some(t) = m.int_arm {
        if old <= t && t < new {
            assert!(r, "lost interrupt: driver asked to be notified at {t}, device published [{old}, {new}) silently");
            m.int_arm = None;
        } else if t < old {
            m.int_arm = None;
        }
    }
    m.dev_published = new;
    m.visible.extend(m.pushed.drain(..));
}

fn drv_pop(p: &mut Parts<'_>, m: &mut Model) -> bool {
    let r = p.q.pop_used().unwrap_or_else(|e| panic!("driver reported {e:?} for a correct device"));
    match r {
        None => {
            assert!(m.visible.is_empty(), "driver does not see {} completion(s)", m.visible.len());
            false
        }
        Some(u) => {
            let e = m.visible.pop_front().expect("driver returned a completion the device had not made visible");
            assert_eq!((u.token, u.len), (e.token, e.len), "completion (token, len)");
            assert!(m.outstanding.remove(&u.token).is_some(), "token {} returned twice", u.token);
            m.drv_consumed += e.notify_units;
            true
        }
    }
}

/// `drain_used`: every visible completion, in order, each checked as
/// `drv_pop` checks one.
fn drv_drain_used(p: &mut Parts<'_>, m: &mut Model) {
    let mut got = Vec::new();
    let n = p.q.drain_used(|u| got.push(u)).unwrap_or_else(|e| panic!("driver reported {e:?} for a correct device"));
    assert_eq!(n, got.len(), "drain_used count");
    assert!(
        m.visible.len() == got.len(),
        "drain_used returned {} of {} visible completions",
        got.len(),
        m.visible.len()
    );
    for u in got {
        let e = m.visible.pop_front().expect("counted above");
        assert_eq!((u.token, u.len), (e.token, e.len), "completion (token, len)");
        assert!(m.outstanding.remove(&u.token).is_some(), "token {} returned twice", u.token);
        m.drv_consumed += e.notify_units;
    }
}

fn run(p: &mut Parts<'_>, ops: &[Op]) {
    let mut m = Model {
        next_token: 0,
        pending: VecDeque::new(),
        avail: VecDeque::new(),
        held: Vec::new(),
        pushed: VecDeque::new(),
        visible: VecDeque::new(),
        outstanding: HashMap::new(),
        dev_pushed: 0,
        dev_published: 0,
        dev_dirty: false,
        drv_consumed: 0,
        int_arm: None,
        kick_arm: false,
    };
    let bound = usize::from(p.cfg.size) + 1;
    for op in ops {
        match op {
            Op::Add(spec) => add(p, &mut m, spec),
            Op::AddFramed(spec) => add_framed(p, &mut m, spec),
            Op::Publish => publish(p, &mut m),
            Op::DevPop => {
                dev_pop(p, &mut m);
            }
            Op::DevComplete { pick, len, batch } => dev_complete(p, &mut m, *pick, *len, *batch),
            Op::DevPublish => dev_publish(p, &mut m),
            Op::DrvPop => {
                drv_pop(p, &mut m);
            }
            Op::DrvDrainUsed => drv_drain_used(p, &mut m),
            Op::DrvDrain => {
                let mut n = 0;
                while drv_pop(p, &mut m) {
                    n += 1;
                    assert!(n <= bound, "pop_used does not stop");
                }
            }
            Op::DrvEnable => {
                let r = p.q.enable_used_notifications().expect("enable");
                assert_eq!(r, !m.visible.is_empty(), "enable_used_notifications: used chains waiting?");
                m.int_arm = if r { None } else { Some(m.drv_consumed) };
            }
            Op::DrvEnableDelayed => {
                let bufs = if !p.cfg.event_idx {
                    0
                } else if p.cfg.packed {
                    u64::from(p.cfg.size - p.q.free_descriptors()) * 3 / 4
                } else {
                    (m.outstanding.len() - m.pending.len()) as u64 * 3 / 4
                };
                let r = p.q.enable_used_notifications_delayed().expect("enable delayed");
                let t = m.drv_consumed + bufs;
                if !p.cfg.packed {
                    let mid_batch = m.visible.front().is_some_and(|e| !e.starts_entry);
                    assert_eq!(r, m.visible.len() as u64 > bufs || mid_batch, "delayed enable result (bufs {bufs})");
                }
                if r {
                    m.int_arm = None;
                } else {
                    assert!(
                        m.dev_published <= t,
                        "lost interrupt: delayed enable at {t} said wait, but the device already published up to {} \
                         (driver consumed {}, {} completion(s) visible)",
                        m.dev_published,
                        m.drv_consumed,
                        m.visible.len()
                    );
                    m.int_arm = Some(t);
                }
            }
            Op::DrvDisable => {
                p.q.disable_used_notifications();
                m.int_arm = None;
            }
            Op::DevEnableKicks => {
                let r = p.dev.enable_kicks();
                assert_eq!(r, !m.avail.is_empty(), "enable_kicks: chains waiting?");
                m.kick_arm = !r;
            }
            Op::DevDisableKicks => {
                p.dev.disable_kicks();
                m.kick_arm = false;
            }
            Op::DevRun { len, batch } => {
                let mut n = 0;
                while dev_pop(p, &mut m) {
                    n += 1;
                    assert!(n <= bound);
                }
                while !m.held.is_empty() {
                    dev_complete(p, &mut m, 0, *len, *batch);
                }
                dev_publish(p, &mut m);
            }
        }
        check_counts(p, &m);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((cfg, ops)) = vq_fuzz::decode::<Op>(data) else { return };
    with_queue(cfg, |p| run(p, &ops));
});
