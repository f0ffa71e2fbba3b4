//! The driver against a device that scribbles over the ring and the indirect
//! tables between driver calls, and sometimes behaves correctly. The driver
//! must never panic, never hand back a token twice or one it was not given,
//! keep its counts, and stay broken with the same error once broken.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_queue_core::device::AvailChain;
use virtio_queue_core::Buffer;
use virtio_queue_core::{DeviceError, DriverQueue, Error};
use vq_fuzz::{expected_add, expected_add_framed, with_queue, AddSpec, Dev, FramedSpec, Parts};

#[derive(Arbitrary, Debug)]
enum Op {
    Add(AddSpec),
    /// `add_framed`: it leaves the header and status descriptors in the
    /// split table, or in the id's indirect table, for the next chain of the
    /// same id, which `Scribble` may change.
    AddFramed(FramedSpec),
    Publish,
    Pop,
    PopAll,
    /// `drain_used`.
    Drain,
    Enable,
    EnableDelayed,
    Disable,
    /// Correct device behaviour (unless the ring was tampered with, in
    /// which case the model may pop garbage and complete it).
    DevPop,
    DevComplete {
        pick: u16,
        len: u32,
        batch: u8,
    },
    DevPublish,
    DevRun,
    DevEnableKicks,
    DevDisableKicks,
    /// Arbitrary bytes at an arbitrary offset of the ring or of the tables.
    Scribble {
        tables: bool,
        offset: u16,
        bytes: Vec<u8>,
    },
    /// Split: set the used index to the device's plus `delta` (or to `raw`).
    /// Packed: mark the descriptor `delta` positions after the device's used
    /// position used (current or other wrap) with id/len from the next op.
    UsedIndex {
        delta: i8,
        raw: Option<u16>,
    },
    /// A used element (split) or used descriptor (packed) with any id and
    /// length, `index` entries after the device's next one.
    UsedEntry {
        index: u8,
        id: IdSel,
        len: u32,
        flags: FlagSel,
    },
    /// The model device completes a popped chain with a length larger than
    /// its writable bytes, or completes one twice, or out of order.
    BadComplete {
        pick: u16,
        extra: u32,
        twice: bool,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum IdSel {
    /// Reduced modulo queue size + 2 (mostly plausible ids).
    Near(u16),
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum FlagSel {
    UsedCurrent,
    UsedOther,
    Raw(u16),
}

struct Info {
    units: u16,
    writable: u32,
    published: bool,
}

struct Model {
    next_token: u32,
    /// Every chain added and not yet returned, by token (tokens grow, so the
    /// first entry is the oldest).
    outstanding: BTreeMap<u32, Info>,
    held: Vec<AvailChain>,
    /// Something other than the correct device touched the ring.
    tampered: bool,
    broken: Option<DeviceError>,
}

impl Model {
    fn units(&self) -> u32 {
        self.outstanding.values().map(|i| u32::from(i.units)).sum()
    }
}

/// Checks a result that may only fail with `Broken`; returns whether it succeeded.
fn check_result<T: std::fmt::Debug>(m: &mut Model, what: &str, r: &Result<T, Error>, may_detect: bool) -> bool {
    match (r, m.broken) {
        (Ok(_), None) => true,
        (Ok(v), Some(e)) => panic!("{what} returned {v:?} on a queue broken by {e:?}"),
        (Err(Error::Broken(e)), Some(prev)) => {
            assert_eq!(*e, prev, "{what}: broken error changed");
            false
        }
        (Err(Error::Broken(e)), None) => {
            assert!(may_detect, "{what} broke the queue ({e:?}); only reading used entries can");
            assert!(m.tampered, "queue broken ({e:?}) by {what} although the device behaved correctly");
            m.broken = Some(*e);
            false
        }
        (Err(e), _) => panic!("{what} returned {e:?}"),
    }
}

fn check_counts(p: &Parts<'_>, m: &Model) {
    let qs = p.cfg.size;
    assert!(p.q.in_flight() <= qs, "in_flight {} above queue size {qs}", p.q.in_flight());
    assert_eq!(usize::from(p.q.in_flight()), m.outstanding.len(), "in_flight");
    assert_eq!(u32::from(p.q.free_descriptors()), u32::from(qs) - m.units(), "free descriptors/positions");
    assert_eq!(p.q.broken(), m.broken, "broken()");
}

fn add(p: &mut Parts<'_>, m: &mut Model, spec: &AddSpec) {
    let (r, w) = spec.buffers();
    add_chain(p, m, &r, &w, None);
}

/// `add_framed` on the id `next_id` names (any id when none is free).
fn add_framed(p: &mut Parts<'_>, m: &mut Model, spec: &FramedSpec) {
    let (data, r, w) = spec.buffers(p.q.next_id().unwrap_or(0));
    add_chain(p, m, &r, &w, Some((data, spec.writable)));
}

/// Adds `r` then `w` with `add`, or (`framed`) the same chain with
/// `add_framed`.
fn add_chain(p: &mut Parts<'_>, m: &mut Model, r: &[Buffer], w: &[Buffer], framed: Option<(Buffer, bool)>) {
    let token = m.next_token;
    m.next_token = m.next_token.wrapping_add(1);
    let (free, in_flight) = (u32::from(p.cfg.size) - m.units(), m.outstanding.len() as u32);
    let expected = match framed {
        Some(_) => expected_add_framed(&p.cfg, r, w, free, in_flight),
        None => expected_add(&p.cfg, r, w, free, in_flight),
    };
    let res = match framed {
        Some((data, writable)) => p.q.add_framed(data, writable, token),
        None => p.q.add(r, w, token),
    };
    match (m.broken, expected, res) {
        (Some(e), _, res) => {
            let ae = res.expect_err("add succeeded on a broken queue");
            assert_eq!(ae.error, Error::Broken(e), "add on a broken queue");
            assert_eq!(ae.token, token);
        }
        (None, Ok((_, units)), Ok(())) => {
            let writable = w.iter().map(|b| b.len).sum();
            m.outstanding.insert(token, Info { units, writable, published: false });
        }
        (None, Err(errs), Err(ae)) => {
            assert!(errs.contains(&ae.error), "add error {:?}, expected one of {errs:?}", ae.error);
            assert_eq!(ae.token, token);
        }
        (None, e, r2) => panic!("add: expected {e:?}, got {r2:?}"),
    }
}

/// One `pop_used`; returns whether it returned a chain.
/// Checks a chain the driver handed back against the model.
fn check_used(p: &Parts<'_>, m: &mut Model, token: u32, len: u32) {
    let oldest = m.outstanding.keys().next().copied();
    let info = m
        .outstanding
        .remove(&token)
        .unwrap_or_else(|| panic!("the driver returned token {token} that is not outstanding"));
    assert!(info.published, "token {token} returned before it was published");
    assert!(len <= info.writable, "used len {len} above the chain's {} writable bytes", info.writable);
    if p.cfg.in_order {
        assert_eq!(Some(token), oldest, "IN_ORDER: not the oldest chain");
    }
}

/// One `drain_used`: every chain it hands out is checked, in order; then it
/// either stops with nothing left or breaks the queue.
fn drain(p: &mut Parts<'_>, m: &mut Model) {
    let before = p.q.in_flight();
    let mut got = Vec::new();
    let r = p.q.drain_used(|u| got.push(u));
    check_result(m, "drain_used", &r, true);
    if let Ok(n) = r {
        assert_eq!(n, got.len(), "drain_used count");
    }
    assert!(got.len() <= usize::from(before), "{} completions with only {before} chains in flight", got.len());
    for u in &got {
        check_used(p, m, u.token, u.len);
    }
    assert_eq!(usize::from(p.q.in_flight()), usize::from(before) - got.len(), "in_flight must drop by one per Used");
}

fn pop(p: &mut Parts<'_>, m: &mut Model) -> bool {
    let before = p.q.in_flight();
    let r = p.q.pop_used();
    let ok = check_result(m, "pop_used", &r, true);
    match r {
        Ok(Some(u)) => {
            assert!(ok);
            check_used(p, m, u.token, u.len);
            assert_eq!(p.q.in_flight(), before - 1, "in_flight must drop by one per Used");
            true
        }
        _ => {
            assert_eq!(p.q.in_flight(), before, "in_flight changed without a Used");
            false
        }
    }
}

fn pick_len(sel: u32, writable: u64) -> u32 {
    if writable == 0 {
        0
    } else {
        (u64::from(sel) % (writable + 1)) as u32
    }
}

fn dev_complete(p: &mut Parts<'_>, m: &mut Model, pick: u16, len: u32, batch: u8) {
    if m.held.is_empty() {
        return;
    }
    if p.cfg.in_order {
        let k = 1 + usize::from(batch) % m.held.len();
        let done: Vec<AvailChain> = m.held.drain(..k).collect();
        let last = done[k - 1];
        let len = pick_len(len, last.writable_len());
        if k == 1 && pick & 1 == 0 {
            p.dev.push_used(&last, len);
        } else {
            p.dev.push_used_batch(&done, len);
        }
    } else {
        let c = m.held.remove(usize::from(pick) % m.held.len());
        p.dev.push_used(&c, pick_len(len, c.writable_len()));
    }
}

fn run(p: &mut Parts<'_>, ops: &[Op]) {
    let mut m = Model { next_token: 0, outstanding: BTreeMap::new(), held: Vec::new(), tampered: false, broken: None };
    let qs = p.cfg.size;
    for op in ops {
        match op {
            Op::Add(spec) => add(p, &mut m, spec),
            Op::AddFramed(spec) => add_framed(p, &mut m, spec),
            Op::Drain => drain(p, &mut m),
            Op::Publish => {
                let r = p.q.publish();
                if check_result(&mut m, "publish", &r, false) {
                    m.outstanding.values_mut().for_each(|i| i.published = true);
                }
            }
            Op::Pop => {
                pop(p, &mut m);
            }
            Op::PopAll => {
                let start = p.q.in_flight();
                let mut got = 0u32;
                for _ in 0..=qs {
                    if !pop(p, &mut m) {
                        break;
                    }
                    got += 1;
                }
                assert!(got <= u32::from(start), "{got} completions with only {start} chains in flight");
            }
            Op::Enable => {
                let r = p.q.enable_used_notifications();
                check_result(&mut m, "enable_used_notifications", &r, true);
            }
            Op::EnableDelayed => {
                let r = p.q.enable_used_notifications_delayed();
                check_result(&mut m, "enable_used_notifications_delayed", &r, true);
            }
            Op::Disable => p.q.disable_used_notifications(),
            Op::DevPop => match p.dev.pop_avail() {
                Ok(Some(c)) => m.held.push(c),
                Ok(None) => {}
                Err(e) => assert!(m.tampered, "device model rejected a chain of an untampered ring: {e:?}"),
            },
            Op::DevComplete { pick, len, batch } => dev_complete(p, &mut m, *pick, *len, *batch),
            Op::DevPublish => {
                p.dev.publish_used();
            }
            Op::DevRun => {
                for _ in 0..=qs {
                    match p.dev.pop_avail() {
                        Ok(Some(c)) => m.held.push(c),
                        _ => break,
                    }
                }
                while !m.held.is_empty() {
                    dev_complete(p, &mut m, 0, u32::MAX, 0);
                }
                p.dev.publish_used();
            }
            Op::DevEnableKicks => {
                p.dev.enable_kicks();
            }
            Op::DevDisableKicks => p.dev.disable_kicks(),
            Op::Scribble { tables, offset, bytes } => {
                m.tampered = true;
                let mem = if *tables && !p.tables.is_empty() { p.tables } else { p.ring };
                let bytes = &bytes[..bytes.len().min(16)];
                let off = usize::from(*offset) % mem.len();
                let end = (off + bytes.len()).min(mem.len());
                assert!(mem.write_bytes(off, &bytes[..end - off]));
            }
            Op::UsedIndex { delta, raw } => {
                m.tampered = true;
                match &mut p.dev {
                    Dev::Split(d) => {
                        let idx = raw.unwrap_or_else(|| d.used_idx().wrapping_add(*delta as i16 as u16));
                        d.set_used_idx_raw(idx);
                    }
                    Dev::Packed(d) => {
                        let (pos, wrap) = d.used_position();
                        let pos = (u32::from(pos) + u32::from(*delta as u8)) % u32::from(qs);
                        let flags = if wrap ^ raw.is_some() { 0x8080 } else { 0 };
                        // Keep whatever id and length are there.
                        let at = pos as usize * 16 + 14;
                        assert!(p.ring.write_bytes(at, &u16::to_le_bytes(flags)));
                    }
                }
            }
            Op::UsedEntry { index, id, len, flags } => {
                m.tampered = true;
                let id = match *id {
                    IdSel::Near(v) => u32::from(v) % (u32::from(qs) + 2),
                    IdSel::Raw(v) => v,
                };
                match &mut p.dev {
                    Dev::Split(d) => {
                        let at = d.used_idx().wrapping_add(u16::from(*index));
                        d.write_used_elem_raw(at, id, *len);
                    }
                    Dev::Packed(d) => {
                        let (pos, wrap) = d.used_position();
                        let off = u32::from(*index) % u32::from(qs);
                        let lapped = u32::from(pos) + off >= u32::from(qs);
                        let pos = ((u32::from(pos) + off) % u32::from(qs)) as u16;
                        let w = wrap ^ lapped;
                        let f = match flags {
                            FlagSel::UsedCurrent => {
                                if w {
                                    0x8080
                                } else {
                                    0
                                }
                            }
                            FlagSel::UsedOther => {
                                if w {
                                    0
                                } else {
                                    0x8080
                                }
                            }
                            FlagSel::Raw(f) => *f,
                        };
                        d.write_used_raw(pos, id as u16, *len, f);
                    }
                }
            }
            Op::BadComplete { pick, extra, twice } => {
                if m.held.is_empty() {
                    continue;
                }
                m.tampered = true;
                let i = usize::from(*pick) % m.held.len();
                let c = if *twice { m.held[i] } else { m.held.remove(i) };
                let len = (c.writable_len() + 1 + u64::from(*extra)).min(u64::from(u32::MAX)) as u32;
                p.dev.push_used(&c, if *twice { pick_len(*extra, c.writable_len()) } else { len });
                p.dev.publish_used();
            }
        }
        check_counts(p, &m);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((cfg, ops)) = vq_fuzz::decode::<Op>(data) else { return };
    with_queue(cfg, |p| run(p, &ops));
});
