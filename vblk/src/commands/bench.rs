//! `vblk bench`: fio-like load with `iodepth` requests in flight on each of `queues` queues,
//! one worker thread per queue.
//!
//! Each worker owns its `BlkQueue` and `iodepth` pre-allocated `DmaBuf`s. The loop works in
//! passes: it drains every completion the used ring holds (`poll_each`), reads the clock
//! once (vDSO, no system call) for all of them, records their latencies in a fixed-size
//! histogram, resubmits their buffers with the same tags and makes the batch visible with one
//! `publish` (one kick decision per pass). In poll mode each pass that completed something is
//! followed by a hold, spinning on the clock without reading the ring, of an eighth of the
//! latency of what is in flight and at most 4 µs (`PollPacer`; `--no-pacing` polls flat out).
//! With `--interrupt`, a pass that finds nothing sleeps
//! in `BlkQueue::wait`, by default with batched completions (`set_batch_completions`). The only
//! system calls are the kicks the device asks for and those sleeps; the reference tool
//! (`bench/virtio-driver-ref`) runs the same passes, without holds.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use virtio_blk_dev::{Bufs, Completion, DmaBuf, PollPacer, RequestKind};

use crate::cli::{BenchArgs, Rw};
use crate::signals;
use crate::stats::{human_bytes, human_count, human_ns, thread_cpu_ns, Clock, Histogram, SplitMix64};
use crate::target::{self, Queue};

/// How long requests still in flight at the end of the run may take before they count as errors.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Empty polls between two clock reads while nothing completes.
const SPINS_PER_CLOCK: u32 = 32;
/// Marks a tag in `Worker::done` whose request failed (tags are below `iodepth` <= 32768).
const FAILED: usize = 1 << 31;

/// What one worker does.
#[derive(Clone, Copy, Debug)]
struct Job {
    rw: Rw,
    rwmixread: u8,
    bs: u64,
    /// First byte of the range.
    start: u64,
    /// I/Os of `bs` bytes that fit in the range.
    blocks: u64,
    /// Sequential patterns: the block this worker starts at.
    first_block: u64,
    interrupt: bool,
    /// With `interrupt`: `BlkQueue::set_batch_completions`.
    batch_completions: bool,
    /// With `interrupt`: `BlkQueue::set_spin_before_sleep`.
    spin: Option<Duration>,
    /// Without `interrupt`: hold off polling after each pass as `PollPacer` says.
    pacing: bool,
    runtime: Duration,
    seed: u64,
}

/// What one worker measured.
#[derive(Default)]
struct Outcome {
    hist: Histogram,
    ios: u64,
    reads: u64,
    writes: u64,
    errors: u64,
    first_error: Option<String>,
    cpu_ns: u64,
    elapsed: Duration,
    /// Kicks sent in the measured interval.
    kicks: u64,
    /// Sleeps on the completion eventfd in the measured interval.
    waits: u64,
}

impl Outcome {
    fn error(&mut self, what: impl FnOnce() -> String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what());
        }
    }
}

/// A counter on its own cache lines, written by one worker and read by the progress line.
#[repr(align(128))]
#[derive(Default)]
struct Progress(AtomicU64);

/// Chooses the next request: offset and direction.
struct Picker {
    job: Job,
    rng: SplitMix64,
    next: u64,
}

impl Picker {
    #[inline]
    fn pick(&mut self) -> (u64, bool) {
        let j = &self.job;
        let block = if j.rw.random() {
            self.rng.below(j.blocks)
        } else {
            let b = self.next;
            self.next = if b + 1 >= j.blocks { 0 } else { b + 1 };
            b
        };
        let write = match j.rw {
            Rw::Read | Rw::Randread => false,
            Rw::Write | Rw::Randwrite => true,
            Rw::Randrw => self.rng.below(100) >= u64::from(j.rwmixread),
        };
        (j.start + block * j.bs, write)
    }
}

/// Takes one completion: its buffer back into its slot, its tag into `done` (marked
/// [`FAILED`] if it failed), its direction counted when `measuring`; errors are counted either
/// way.
#[inline(always)]
fn take(
    slots: &mut [Option<DmaBuf>],
    done: &mut Vec<usize>,
    out: &mut Outcome,
    in_flight: &mut usize,
    c: Completion,
    measuring: bool,
) {
    *in_flight -= 1;
    let tag = c.tag as usize;
    if let Bufs::One(b) = c.bufs {
        if let Some(s) = slots.get_mut(tag) {
            *s = Some(b);
        }
    }
    match c.result {
        Ok(()) => {
            if measuring {
                if c.kind == RequestKind::Write {
                    out.writes += 1;
                } else {
                    out.reads += 1;
                }
            }
            done.push(tag);
        }
        Err(e) => {
            out.error(|| e.to_string());
            // Resubmitted like a success, but without a latency.
            done.push(tag | FAILED);
        }
    }
}

struct Worker {
    q: Queue,
    slots: Vec<Option<DmaBuf>>,
    /// Start time of the request in each slot, in `Clock` nanoseconds.
    started: Vec<u64>,
    /// Tags completed in the current pass (capacity `iodepth`: never grows).
    done: Vec<usize>,
    picker: Picker,
    out: Outcome,
    in_flight: usize,
}

/// Where the measured interval ended: its length, and the worker's CPU time, kicks and sleeps
/// in it.
#[derive(Clone, Copy)]
struct Mark {
    elapsed: Duration,
    cpu_ns: u64,
    kicks: u64,
    waits: u64,
}

/// What a worker hands back: its outcome, its queue and its buffers.
type Finished = (Outcome, Queue, Vec<Option<DmaBuf>>);

impl Worker {
    /// Submits a request in slot `tag`, started at `now` (`Clock` nanoseconds), without
    /// publishing it. On refusal the buffer goes back to its slot and the error is counted.
    #[inline]
    fn submit(&mut self, tag: usize, now: u64) {
        let Some(buf) = self.slots.get_mut(tag).and_then(Option::take) else { return };
        let (offset, write) = self.picker.pick();
        if let Some(s) = self.started.get_mut(tag) {
            *s = now;
        }
        let r = if write {
            self.q.submit_write(offset, buf, tag as u64)
        } else {
            self.q.submit_read(offset, buf, tag as u64)
        };
        match r {
            Ok(()) => self.in_flight += 1,
            Err(rej) => {
                if let Some(s) = self.slots.get_mut(tag) {
                    *s = Some(rej.bufs);
                }
                let e = rej.error;
                self.out.error(|| format!("submission refused: {e}"));
            }
        }
    }

    /// Makes the requests submitted in this pass visible: one kick at most.
    #[inline]
    fn publish(&mut self) {
        if let Err(e) = self.q.publish() {
            // The queue completes every request in flight with this error; they are counted
            // as they come back.
            self.out.error(|| format!("publish failed: {e}"));
        }
    }

    /// Drains every completion the used ring holds into `done` ([`take`]); returns how many.
    #[inline]
    fn drain(&mut self, measuring: bool) -> usize {
        let Worker { q, slots, done, out, in_flight, .. } = self;
        q.poll_each(|c| take(slots, done, out, in_flight, c, measuring))
    }

    fn mark(&self, t0: Instant, now: Instant, cpu0: u64, kicks0: u64, waits0: u64) -> Mark {
        Mark {
            elapsed: now.duration_since(t0),
            cpu_ns: thread_cpu_ns().saturating_sub(cpu0),
            kicks: self.q.kicks() - kicks0,
            waits: self.q.waits() - waits0,
        }
    }

    /// Runs the job; hands the queue back, to be dropped with the target once every worker is done.
    /// Runs the job; returns the outcome, the queue and the buffers. The buffers go back to
    /// the caller rather than being freed here: freeing them unmaps them, and on vhost-vdpa
    /// parents that take whole maps (VDUSE) any map change while another worker's requests
    /// are in flight makes the back-end drop every mapping it holds (see transport-vdpa's
    /// README); qemu-storage-daemon 7.2 then fails those requests with IOERR.
    fn run(mut self, barrier: &Barrier, progress: &Progress) -> Finished {
        let job = self.picker.job;
        self.q.set_batch_completions(job.interrupt && job.batch_completions);
        self.q.set_spin_before_sleep(job.spin);
        barrier.wait();
        let cpu0 = thread_cpu_ns();
        let (kicks0, waits0) = (self.q.kicks(), self.q.waits());
        let t0 = Instant::now();
        let clock = Clock::new(t0);
        let mut deadline = t0 + job.runtime;
        for tag in 0..self.slots.len() {
            self.submit(tag, 0);
        }
        self.publish();
        let mut now = t0;
        // Set when the measured interval ends.
        let mut end: Option<Mark> = None;
        let mut spins = 0u32;
        let mut pacer = PollPacer::new();
        // Poll mode: when the ring may be looked at again (see `PollPacer`).
        let mut hold_until: Option<Instant> = None;
        loop {
            if let Some(until) = hold_until.take() {
                // Spinning on the clock (vDSO, no system call) touches no memory the device
                // writes.
                while now < until {
                    std::hint::spin_loop();
                    now = Instant::now();
                }
            }
            if end.is_none() && (now >= deadline || signals::stop_requested()) {
                end = Some(self.mark(t0, now, cpu0, kicks0, waits0));
                deadline = now;
            }
            if self.in_flight == 0 {
                break;
            }
            let measuring = end.is_none();
            // One pass: everything the used ring holds now.
            let mut got = self.drain(measuring);
            if got == 0 && job.interrupt {
                let limit = match end {
                    None => deadline.saturating_duration_since(now),
                    Some(_) => (deadline + DRAIN_TIMEOUT).saturating_duration_since(now),
                };
                if let Some(c) = self.q.wait(Some(limit)) {
                    let Worker { slots, done, out, in_flight, .. } = &mut self;
                    take(slots, done, out, in_flight, c, measuring);
                    got = 1 + self.drain(measuring);
                }
            }
            if got == 0 {
                spins += 1;
                if job.interrupt || spins >= SPINS_PER_CLOCK {
                    spins = 0;
                    now = Instant::now();
                    if end.is_some() && now >= deadline + DRAIN_TIMEOUT {
                        let n = self.in_flight;
                        self.out.errors += n as u64;
                        if self.out.first_error.is_none() {
                            self.out.first_error =
                                Some(format!("{n} requests did not complete within {DRAIN_TIMEOUT:?}"));
                        }
                        break;
                    }
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            // One clock read for the whole pass: the completion time of its requests and the
            // start time of the ones resubmitted in their slots.
            now = Instant::now();
            let now_ns = clock.ns(now);
            let resubmit = measuring && now < deadline;
            let mut done = std::mem::take(&mut self.done);
            for &entry in &done {
                let tag = entry & !FAILED;
                if measuring && entry & FAILED == 0 {
                    let lat = self.started.get(tag).map_or(0, |&s| now_ns.saturating_sub(s));
                    self.out.hist.record(lat);
                    self.out.ios += 1;
                }
                if resubmit {
                    self.submit(tag, now_ns);
                }
            }
            done.clear();
            self.done = done;
            if measuring {
                progress.0.store(self.out.ios, Ordering::Relaxed);
            }
            if resubmit {
                self.publish();
            }
            if job.pacing {
                let hold = pacer.after_pass(now_ns, got, self.in_flight);
                if hold > 0 {
                    hold_until = Some(now + Duration::from_nanos(hold));
                }
            }
        }
        let m = end.unwrap_or_else(|| self.mark(t0, now, cpu0, kicks0, waits0));
        self.out.elapsed = m.elapsed;
        self.out.cpu_ns = m.cpu_ns;
        self.out.kicks = m.kicks;
        self.out.waits = m.waits;
        (self.out, self.q, self.slots)
    }
}

/// The merged result of a run.
struct Report {
    target: String,
    rw: Rw,
    bs: u64,
    iodepth: u16,
    queues: u16,
    interrupt: bool,
    batch_completions: bool,
    /// Interrupt mode with hybrid waiting: the spin limit in µs.
    spin_us: Option<u64>,
    /// Poll mode with `PollPacer` holds.
    pacing: bool,
    /// Every queue put one-buffer requests straight into the ring.
    direct_descriptors: bool,
    runtime_s: f64,
    total: Outcome,
    cpu_ns_per_io: f64,
}

impl Report {
    fn iops(&self) -> f64 {
        if self.runtime_s > 0.0 {
            self.total.ios as f64 / self.runtime_s
        } else {
            0.0
        }
    }

    /// `n` events per I/O completed in the measured interval.
    fn per_io(&self, n: u64) -> f64 {
        if self.total.ios > 0 {
            n as f64 / self.total.ios as f64
        } else {
            0.0
        }
    }

    fn mode(&self) -> &'static str {
        if self.interrupt {
            "interrupt"
        } else {
            "poll"
        }
    }

    fn json(&self) -> serde_json::Value {
        let h = &self.total.hist;
        serde_json::json!({
            "target": self.target,
            "rw": self.rw.name(),
            "bs": self.bs,
            "iodepth": self.iodepth,
            "queues": self.queues,
            "mode": self.mode(),
            "batch_completions": self.batch_completions,
            "spin_us": self.spin_us,
            "poll_pacing": self.pacing,
            "direct_descriptors": self.direct_descriptors,
            "runtime_s": self.runtime_s,
            "ios": self.total.ios,
            "read_ios": self.total.reads,
            "write_ios": self.total.writes,
            "errors": self.total.errors,
            "iops": self.iops(),
            "bw_bytes_per_s": self.iops() * self.bs as f64,
            "lat_ns": {
                "mean": h.mean(),
                "p50": h.quantile(0.50),
                "p99": h.quantile(0.99),
                "p99_9": h.quantile(0.999),
            },
            "cpu_ns_per_io": self.cpu_ns_per_io,
            "kicks": self.total.kicks,
            "waits": self.total.waits,
        })
    }

    fn text(&self) -> String {
        let h = &self.total.hist;
        let t = &self.total;
        format!(
            "{} {} bs={} iodepth={} queues={} {} runtime={:.2}s\n  \
             ios:     {} (read {}, write {}), errors {}\n  \
             iops:    {}\n  \
             bw:      {}/s\n  \
             latency: mean {}, p50 {}, p99 {}, p99.9 {}\n  \
             cpu/io:  {} (user+sys of the {} worker thread{})\n  \
             events:  {:.3} kicks, {:.3} waits per I/O\n",
            self.target,
            self.rw.name(),
            human_bytes(self.bs),
            self.iodepth,
            self.queues,
            {
                let mode = match (self.interrupt, self.batch_completions) {
                    (true, true) => "interrupt (batched completions)",
                    (true, false) => "interrupt",
                    (false, _) if self.pacing => "poll (paced)",
                    (false, _) => "poll",
                };
                match self.spin_us {
                    Some(us) => format!("{mode}, spin up to {us} µs"),
                    None => mode.to_string(),
                }
            },
            self.runtime_s,
            t.ios,
            t.reads,
            t.writes,
            t.errors,
            human_count(self.iops()),
            human_bytes((self.iops() * self.bs as f64) as u64),
            human_ns(h.mean()),
            human_ns(h.quantile(0.50) as f64),
            human_ns(h.quantile(0.99) as f64),
            human_ns(h.quantile(0.999) as f64),
            human_ns(self.cpu_ns_per_io),
            self.queues,
            if self.queues == 1 { "" } else { "s" },
            self.per_io(t.kicks),
            self.per_io(t.waits),
        )
    }
}

/// Runs `vblk bench`.
pub fn run(a: BenchArgs) -> Result<ExitCode, String> {
    signals::set_graceful();
    // The embedded RAM disk holds at least the range asked for.
    let ram = a.size.map_or(0, |s| a.offset.saturating_add(s)).max(vblk::server::DEFAULT_RAM_SIZE);
    let mut t = target::open(&a.target, ram, a.target.queue_size_for(a.iodepth))?;
    let mut queues = t.queues();
    let dev = &t.dev;
    let cap = dev.capacity();
    let bsz = u64::from(dev.block_size());
    if a.bs % bsz != 0 {
        return Err(format!("--bs {} is not a multiple of the device's {bsz}-byte block size", a.bs));
    }
    if a.offset % bsz != 0 {
        return Err(format!("--offset {} is not a multiple of the device's {bsz}-byte block size", a.offset));
    }
    if a.offset >= cap {
        return Err(format!("--offset {} is past the end of the device ({cap} bytes)", a.offset));
    }
    let len = match a.size {
        Some(s) if a.offset.checked_add(s).is_none_or(|e| e > cap) => {
            return Err(format!("--offset {} + --size {s} ends past the end of the device ({cap} bytes)", a.offset))
        }
        Some(s) => s,
        None => cap - a.offset,
    };
    let blocks = len / a.bs;
    if blocks == 0 {
        return Err(format!("the range of {len} bytes holds no {}-byte I/O", a.bs));
    }
    if a.rw.writes() && dev.read_only() {
        return Err(format!("{} is read-only; --rw {} writes", t.name, a.rw.name()));
    }
    if dev.num_queues() < a.target.queues {
        return Err(format!("asked for {} queues, {} has {}", a.target.queues, t.name, dev.num_queues()));
    }
    let nq = queues.len() as u16;
    let depth = usize::from(a.iodepth);
    let fits = |q: &Queue| {
        let per = if dev.ring_features().contains(virtio_queue_core::RingFeatures::INDIRECT_DESC) { 1 } else { 3 };
        depth * per <= usize::from(q.queue_size())
    };
    if let Some(q) = queues.iter().find(|q| !fits(q)) {
        return Err(format!(
            "--iodepth {depth} does not fit in a queue of {} entries (raise --queue-size)",
            q.queue_size()
        ));
    }
    // Direct descriptors where the ring holds three per request in flight (see
    // `BlkQueue::set_direct_descriptors`): the device then reads no indirect tables.
    for q in &mut queues {
        let room = depth * 3 <= usize::from(q.queue_size());
        q.set_direct_descriptors(room && !a.all_indirect);
    }
    let direct_descriptors = queues.iter().all(|q| q.direct_descriptors());
    let pacing = !a.interrupt && !a.no_pacing;
    let mut workers = Vec::with_capacity(queues.len());
    for (i, q) in queues.into_iter().enumerate() {
        let bs = usize::try_from(a.bs).map_err(|_| "--bs is too large".to_string())?;
        let mut bufs = dev.alloc_bufs(bs, depth).map_err(|e| format!("cannot allocate I/O buffers: {e}"))?;
        for b in &mut bufs {
            b.fill(0xa5);
        }
        let job = Job {
            rw: a.rw,
            rwmixread: a.rwmixread,
            bs: a.bs,
            start: a.offset,
            blocks,
            first_block: blocks / u64::from(nq) * i as u64,
            interrupt: a.interrupt,
            batch_completions: !a.no_batch_completions,
            spin: a.spin_us.map(Duration::from_micros),
            pacing,
            runtime: Duration::from_secs_f64(a.runtime),
            seed: 0x5eed ^ (i as u64).wrapping_mul(0x9e37_79b9),
        };
        workers.push(Worker {
            q,
            slots: bufs.into_iter().map(Some).collect(),
            started: vec![0; depth],
            done: Vec::with_capacity(depth),
            picker: Picker { job, rng: SplitMix64::new(job.seed), next: job.first_block },
            out: Outcome::default(),
            in_flight: 0,
        });
    }

    let show_progress = !a.json && std::io::stderr().is_terminal();
    let barrier = Barrier::new(workers.len() + 1);
    let counters: Vec<Progress> = workers.iter().map(|_| Progress::default()).collect();
    let done = thread::scope(|s| -> Result<Vec<Finished>, String> {
        let mut handles = Vec::with_capacity(workers.len());
        for (i, (w, c)) in workers.into_iter().zip(&counters).enumerate() {
            let b = &barrier;
            let h = thread::Builder::new()
                .name(format!("vblk-bench-{i}"))
                .spawn_scoped(s, move || w.run(b, c))
                .map_err(|e| format!("cannot start a worker thread: {e}"))?;
            handles.push(h);
        }
        barrier.wait();
        let t0 = Instant::now();
        let mut next_report = t0 + Duration::from_secs(1);
        while !handles.iter().all(|h| h.is_finished()) {
            thread::sleep(Duration::from_millis(50));
            if show_progress && Instant::now() >= next_report {
                let el = t0.elapsed().as_secs_f64();
                let ios: u64 = counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
                eprint!("\r\x1b[Kvblk: {el:5.1}s  {} IOPS", human_count(ios as f64 / el));
                next_report += Duration::from_secs(1);
            }
        }
        if show_progress && t0.elapsed() >= Duration::from_secs(1) {
            eprint!("\r\x1b[K");
        }
        handles.into_iter().map(|h| h.join().map_err(|_| "a worker thread panicked".to_string())).collect()
    })?;

    // Every worker is done: the buffers may be unmapped now, after the queues.
    let mut outcomes = Vec::with_capacity(done.len());
    let mut queues = Vec::with_capacity(done.len());
    let mut _buffers = Vec::with_capacity(done.len());
    for (o, q, b) in done {
        outcomes.push(o);
        queues.push(q);
        _buffers.push(b);
    }
    let mut total = Outcome::default();
    let mut runtime = Duration::ZERO;
    for o in &outcomes {
        total.hist.merge(&o.hist);
        total.ios += o.ios;
        total.reads += o.reads;
        total.writes += o.writes;
        total.errors += o.errors;
        total.cpu_ns += o.cpu_ns;
        total.kicks += o.kicks;
        total.waits += o.waits;
        runtime = runtime.max(o.elapsed);
        if total.first_error.is_none() {
            total.first_error.clone_from(&o.first_error);
        }
    }
    let cpu_ns_per_io = if total.ios > 0 { total.cpu_ns as f64 / total.ios as f64 } else { 0.0 };
    let report = Report {
        target: t.name.clone(),
        rw: a.rw,
        bs: a.bs,
        iodepth: a.iodepth,
        queues: nq,
        interrupt: a.interrupt,
        batch_completions: a.interrupt && !a.no_batch_completions,
        spin_us: a.spin_us,
        pacing,
        direct_descriptors,
        runtime_s: runtime.as_secs_f64(),
        total,
        cpu_ns_per_io,
    };
    if a.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.text());
    }
    drop(queues);
    drop(t);
    match (&report.total.first_error, report.total.errors) {
        (_, 0) => Ok(ExitCode::SUCCESS),
        (first, n) => Err(format!("{n} requests failed; first: {}", first.as_deref().unwrap_or("unknown error"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picker(rw: Rw, blocks: u64, first_block: u64) -> Picker {
        let job = Job {
            rw,
            rwmixread: 70,
            bs: 4096,
            start: 1 << 20,
            blocks,
            first_block,
            interrupt: false,
            batch_completions: false,
            spin: None,
            pacing: false,
            runtime: Duration::from_secs(1),
            seed: 3,
        };
        Picker { job, rng: SplitMix64::new(job.seed), next: first_block }
    }

    #[test]
    fn sequential_offsets_wrap_inside_the_range() {
        let mut p = picker(Rw::Write, 3, 2);
        let got: Vec<(u64, bool)> = (0..4).map(|_| p.pick()).collect();
        let at = |b: u64| (1 << 20) + b * 4096;
        assert_eq!(got, [(at(2), true), (at(0), true), (at(1), true), (at(2), true)]);
    }

    #[test]
    fn random_offsets_are_aligned_in_range_and_mixed_as_asked() {
        let mut p = picker(Rw::Randrw, 1000, 0);
        let mut reads = 0;
        for _ in 0..10_000 {
            let (off, write) = p.pick();
            assert!(((1 << 20)..(1 << 20) + 1000 * 4096).contains(&off) && off % 4096 == 0);
            reads += u32::from(!write);
        }
        assert!((6500..7500).contains(&reads), "{reads}");
        let mut p = picker(Rw::Randread, 1, 0);
        assert_eq!(p.pick(), (1 << 20, false));
    }
}
