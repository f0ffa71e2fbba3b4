//! `vblk verify`: write a seeded pattern over a range, flush, read it back and compare.
//!
//! Every 512-byte sector of the pattern is distinct: it starts with its own byte offset on the
//! device and the seed (both little-endian `u64`), followed by SplitMix64 output seeded from
//! both. A sector found at the wrong place, a stale sector and one from another run (another
//! seed) all differ from what is expected. `--no-write` checks a pattern written earlier (by
//! `verify` or `verify --no-read`), so a change made to the storage in between is detected.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::transport::AnyTransport;
use virtio_blk_dev::{BlkFeatures, BlkQueue, Bufs, DmaBuf};

use super::check_range;
use crate::cli::VerifyArgs;
use crate::stats::{human_bytes, SplitMix64};
use crate::{signals, target};

const SECTOR: usize = 512;
/// Longest wait for one completion.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Fills `out` with the pattern of the bytes at device offset `offset` (a multiple of 512;
/// `out.len()` too).
fn fill_pattern(out: &mut [u8], offset: u64, seed: u64) {
    for (i, sector) in out.chunks_mut(SECTOR).enumerate() {
        let at = offset + (i * SECTOR) as u64;
        let mut rng = SplitMix64::new(seed ^ at.rotate_left(17) ^ 0x7662_6c6b_7665_7269);
        for (j, word) in sector.chunks_mut(8).enumerate() {
            let v = match j {
                0 => at,
                1 => seed,
                _ => rng.next_u64(),
            };
            let b = v.to_le_bytes();
            word.copy_from_slice(&b[..word.len()]);
        }
    }
}

/// The first difference between the data read at `offset` and the pattern, as a message.
fn compare(got: &[u8], want: &[u8], offset: u64) -> Option<(u64, String)> {
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let at = offset + i as u64;
    let sector = i / SECTOR * SECTOR;
    let head = |k: usize| {
        got.get(sector + k..sector + k + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_le_bytes)
    };
    Some((
        at,
        format!(
            "byte {at}: expected {:#04x}, found {:#04x} (that sector's header says offset {}, seed {})",
            want[i],
            got[i],
            head(0),
            head(8)
        ),
    ))
}

/// `verify`'s I/O size unless `--bs` says otherwise (or the device's segments are smaller).
const DEFAULT_BS: u64 = 64 * 1024;

/// Keeps `bufs.len()` requests of one direction in flight over `offsets`; calls `prepare`
/// before each write and `check` after each read completes.
fn pipeline(
    q: &mut BlkQueue<AnyTransport>,
    bufs: &mut Vec<DmaBuf>,
    offsets: &mut dyn Iterator<Item = u64>,
    write: bool,
    scratch: &mut [u8],
    mut on_done: impl FnMut(u64, &DmaBuf, &mut [u8]),
    seed: u64,
) -> Result<(), String> {
    let depth = bufs.len();
    let mut at = vec![0u64; depth];
    let mut in_flight = 0usize;
    let mut free: Vec<(usize, DmaBuf)> = bufs.drain(..).enumerate().collect();
    let mut result = Ok(());
    loop {
        while result.is_ok() && !signals::stop_requested() {
            let Some((tag, mut buf)) = free.pop() else { break };
            let Some(off) = offsets.next() else {
                free.push((tag, buf));
                break;
            };
            let r = if write {
                fill_pattern(&mut scratch[..buf.len()], off, seed);
                buf.write(0, &scratch[..buf.len()]);
                q.submit_write(off, buf, tag as u64)
            } else {
                q.submit_read(off, buf, tag as u64)
            };
            match r {
                Ok(()) => {
                    at[tag] = off;
                    in_flight += 1;
                }
                Err(rej) => {
                    result = Err(format!("{} at byte {off}: {}", if write { "write" } else { "read" }, rej.error));
                    free.push((tag, rej.bufs));
                }
            }
        }
        if in_flight == 0 {
            break;
        }
        let Some(c) = q.wait(Some(IO_TIMEOUT)) else {
            return Err(format!("no completion within {IO_TIMEOUT:?}"));
        };
        in_flight -= 1;
        let tag = c.tag as usize;
        let off = at.get(tag).copied().unwrap_or(0);
        let Bufs::One(buf) = c.bufs else { return Err("a completion came back without its buffer".into()) };
        match c.result {
            Ok(()) => {
                if !write {
                    on_done(off, &buf, scratch);
                }
            }
            Err(e) if result.is_ok() => {
                result = Err(format!("{} at byte {off}: {e}", if write { "write" } else { "read" }))
            }
            Err(_) => {}
        }
        free.push((tag, buf));
    }
    free.sort_by_key(|(tag, _)| *tag);
    bufs.extend(free.into_iter().map(|(_, b)| b));
    if signals::stop_requested() && result.is_ok() {
        result = Err("interrupted".into());
    }
    result
}

/// Runs `vblk verify`.
pub fn run(a: VerifyArgs) -> Result<ExitCode, String> {
    signals::set_graceful();
    let mut t = target::open(&a.target, a.ram.bytes(), a.target.queue_size_for(a.iodepth))?;
    let cap = t.dev.capacity();
    let len = match a.length {
        Some(l) => l,
        None if a.offset < cap => cap - a.offset,
        None => return Err(format!("verify: offset {} is past the end of the device ({cap} bytes)", a.offset)),
    };
    check_range(&t.dev, "verify", a.offset, len)?;
    let bsz = u64::from(t.dev.block_size());
    // By default as large as one segment may be (vdpa_sim_blk allows 4 KiB), at most 64 KiB.
    let requested = a.bs.unwrap_or_else(|| (DEFAULT_BS.min(t.dev.max_segment_size()) / bsz * bsz).max(bsz));
    if requested % bsz != 0 {
        return Err(format!("verify: --bs {requested} is not a multiple of the device's {bsz}-byte block size"));
    }
    if !a.no_write && t.dev.read_only() {
        return Err(format!("{} is read-only (use --no-write to check an existing pattern)", t.name));
    }
    let bs = requested.min(len);
    let full = len / bs;
    let tail = len % bs;
    let depth = usize::from(a.iodepth).min(full.max(1) as usize);
    let flush = t.dev.blk_features().contains(BlkFeatures::FLUSH);
    let mut bufs = t.dev.alloc_bufs(bs as usize, depth).map_err(|e| format!("cannot allocate I/O buffers: {e}"))?;
    let mut q = t.take_queue(0)?;
    let mut scratch = vec![0u8; bs as usize];
    let mut want = vec![0u8; bs as usize];
    let offsets = || (0..full).map(move |i| a.offset + i * bs);
    let tail_at = a.offset + full * bs;
    let started = Instant::now();

    if !a.no_write {
        pipeline(&mut q, &mut bufs, &mut offsets(), true, &mut scratch, |_, _, _| {}, a.seed)?;
        if tail > 0 {
            fill_pattern(&mut want[..tail as usize], tail_at, a.seed);
            q.write_at(tail_at, &want[..tail as usize]).map_err(|e| format!("write at byte {tail_at}: {e}"))?;
        }
        if flush {
            q.flush().map_err(|e| format!("flush: {e}"))?;
        }
    }
    let mut first_bad: Option<(u64, String)> = None;
    let mut bad_ios = 0u64;
    if !a.no_read {
        let mut check = |off: u64, got: &[u8], want: &mut [u8]| {
            fill_pattern(want, off, a.seed);
            if let Some((at, msg)) = compare(got, want, off) {
                bad_ios += 1;
                if first_bad.as_ref().is_none_or(|(f, _)| at < *f) {
                    first_bad = Some((at, msg));
                }
            }
        };
        let seed = a.seed;
        pipeline(
            &mut q,
            &mut bufs,
            &mut offsets(),
            false,
            &mut scratch,
            |off, buf, got| {
                buf.read(0, got);
                check(off, got, &mut want);
            },
            seed,
        )?;
        if tail > 0 {
            let n = tail as usize;
            q.read_at(tail_at, &mut scratch[..n]).map_err(|e| format!("read at byte {tail_at}: {e}"))?;
            let mut w = vec![0u8; n];
            check(tail_at, &scratch[..n], &mut w);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let what = match (a.no_write, a.no_read) {
        (false, false) => "wrote, flushed and read back",
        (false, true) => "wrote and flushed",
        _ => "read back",
    };
    if let Some((_, msg)) = first_bad {
        return Err(format!("verify: mismatch at {msg}; {bad_ios} of {} I/Os differ", full + u64::from(tail > 0)));
    }
    println!(
        "verify: {what} {} at offset {} (seed {}, {} I/Os, depth {depth}) in {secs:.2}s: {}",
        human_bytes(len),
        a.offset,
        a.seed,
        human_bytes(bs),
        if a.no_read { "done" } else { "OK" }
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_differ_and_name_their_offset_and_seed() {
        let mut a = vec![0u8; 2048];
        fill_pattern(&mut a, 4096, 9);
        let (s0, s1) = a.split_at(512);
        assert_ne!(s0, &s1[..512]);
        assert_eq!(u64::from_le_bytes(s0[..8].try_into().unwrap()), 4096);
        assert_eq!(u64::from_le_bytes(s0[8..16].try_into().unwrap()), 9);
        let mut b = vec![0u8; 512];
        fill_pattern(&mut b, 4096 + 512, 9);
        assert_eq!(b, &a[512..1024]);
        let mut c = vec![0u8; 512];
        fill_pattern(&mut c, 4096, 10);
        assert_ne!(c, &a[..512]);
    }

    #[test]
    fn compare_reports_the_first_difference() {
        let mut want = vec![0u8; 1024];
        fill_pattern(&mut want, 0, 1);
        let mut got = want.clone();
        assert!(compare(&got, &want, 0).is_none());
        got[700] ^= 1;
        got[900] ^= 1;
        let (at, msg) = compare(&got, &want, 1 << 20).unwrap();
        assert_eq!(at, (1 << 20) + 700);
        assert!(msg.contains("header says offset 512, seed 1"), "{msg}");
    }
}
