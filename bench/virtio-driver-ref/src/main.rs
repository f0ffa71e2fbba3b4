//! `virtio-driver-ref`: the reference side of `cargo xtask compare`.
//!
//! Drives a vhost-user-blk back-end with libblkio's `virtio-driver` crate, version 0.6.1, the way
//! libblkio's `virtio-blk-vhost-user` driver does, and measures it exactly like `vblk bench`: the
//! same flags, the same JSON object on stdout, the same offset generator, the same
//! keep-`iodepth`-in-flight loop, the same latency histogram and the same per-thread CPU
//! accounting. See README.md beside this file for the fairness notes.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
// The very file `vblk bench` measures with (latency histogram, RUSAGE_THREAD CPU time, the
// offset generator's PRNG), so both sides are measured by the same code. Its formatting helpers
// are unused here.
#[allow(dead_code)]
#[path = "../../../vblk/src/stats.rs"]
mod stats;

use stats::{thread_cpu_ns, Clock, Histogram, SplitMix64};
use virtio_driver::{
    EventFd, QueueNotifier, VhostUser, VirtioBlkFeatureFlags, VirtioBlkQueue, VirtioBlkTransport, VirtioFeatureFlags,
};

/// Seed of the offset generator: `vblk bench`'s seed for its first (here: only) queue.
const SEED: u64 = 0x5eed;

/// Bytes per sector in the virtio-blk request protocol.
const SECTOR: u64 = 512;

/// Queue size libblkio uses unless told otherwise.
const LIBBLKIO_DEFAULT_QUEUE_SIZE: u16 = 256;

/// Descriptors one data request takes in `virtio-driver` 0.6.1 (header, data, status): it has
/// no indirect descriptors.
const DESCRIPTORS_PER_REQUEST: usize = 3;

/// Empty polls between two clock reads while nothing completes (as in `vblk bench`).
const SPINS_PER_CLOCK: u32 = 32;

/// How long requests still in flight at the end of the run may take (as in `vblk bench`).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Marks a slot in the pass's completion list whose request failed (slots are below
/// `iodepth` <= 10922).
const FAILED: u16 = 1 << 15;

/// Benchmark libblkio's `virtio-driver` 0.6.1 against a vhost-user-blk back-end.
#[derive(Parser, Debug)]
#[command(name = "virtio-driver-ref", version, about)]
struct Args {
    /// vhost-user-blk socket of the back-end.
    #[arg(long, value_name = "PATH")]
    vhost_user: String,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Block size, e.g. 4K, 4096, 64K (a multiple of 512 bytes).
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    bs: u64,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=10922))]
    iodepth: u16,
    /// Number of queues; only 1 is supported (the comparison is single-queue).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1))]
    queues: u16,
    /// Measured interval in seconds.
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Busy-poll the used ring for completions, with used-buffer notifications off.
    #[arg(long, conflicts_with = "interrupt")]
    poll: bool,
    /// Sleep in poll(2) on the completion eventfd when nothing has completed.
    #[arg(long)]
    interrupt: bool,
    /// Virtqueue size; default: libblkio's 256, or the next power of two that holds
    /// `iodepth` requests of 3 descriptors each.
    #[arg(long, value_name = "N")]
    queue_size: Option<u16>,
    /// Also accept VIRTIO_F_RING_PACKED when offered (libblkio never does).
    #[arg(long)]
    packed: bool,
    /// Print one JSON object on stdout instead of a human-readable summary.
    #[arg(long)]
    json: bool,
    /// Print the negotiated features and queue size on stderr.
    #[arg(long)]
    verbose: bool,
}

/// Access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rw {
    /// Uniformly random reads.
    Randread,
    /// Uniformly random writes.
    Randwrite,
    /// Sequential reads, wrapping at the end of the device.
    Read,
    /// Sequential writes, wrapping at the end of the device.
    Write,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
        }
    }

    fn is_write(self) -> bool {
        matches!(self, Rw::Randwrite | Rw::Write)
    }

    fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite)
    }
}

/// Parses a byte count with an optional K/M/G suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (try 4K)"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("'{s}' has an unknown unit (use K, M or G)")),
    };
    let bytes = n.checked_mul(1 << shift).ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes == 0 || !bytes.is_multiple_of(SECTOR) {
        return Err(format!("'{s}' is not a non-zero multiple of 512 bytes"));
    }
    Ok(bytes)
}

/// Offsets as `vblk bench` picks them: random ones are `below(blocks) * bs` from a SplitMix64
/// seeded with [`SEED`]; sequential ones advance by `bs` from 0 and wrap.
struct Offsets {
    rng: SplitMix64,
    random: bool,
    blocks: u64,
    bs: u64,
    next_block: u64,
}

impl Offsets {
    fn new(random: bool, capacity: u64, bs: u64) -> Self {
        Offsets { rng: SplitMix64::new(SEED), random, blocks: capacity / bs, bs, next_block: 0 }
    }

    #[inline]
    fn next(&mut self) -> u64 {
        let block = if self.random {
            self.rng.below(self.blocks)
        } else {
            let b = self.next_block;
            self.next_block = if b + 1 >= self.blocks { 0 } else { b + 1 };
            b
        };
        block * self.bs
    }
}

/// Data buffers in a memfd, shared with the back-end (vhost-user needs an fd for every region).
struct DataBuffers {
    addr: *mut u8,
    len: usize,
    fd: RawFd,
}

impl DataBuffers {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: the name is a NUL-terminated string; flags are valid.
        let fd = unsafe { libc::memfd_create(c"virtio-driver-ref-data".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is the memfd just created and owned here.
        if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: fd is ours and closed once.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        // SAFETY: a fresh shared mapping of the whole memfd; nothing else refers to that range.
        let addr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if addr == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            // SAFETY: fd is ours and closed once.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        // Fault the pages in now rather than inside the measured interval; 0xa5 as `vblk bench`.
        // SAFETY: addr..addr+len is the mapping just made, writable.
        unsafe { std::ptr::write_bytes(addr.cast::<u8>(), 0xa5, len) };
        Ok(DataBuffers { addr: addr.cast(), len, fd })
    }
}

impl Drop for DataBuffers {
    fn drop(&mut self) {
        // SAFETY: the mapping and fd were created in `new` and are released once, after the
        // queue that used them is gone.
        unsafe {
            libc::munmap(self.addr.cast(), self.len);
            libc::close(self.fd);
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes, then resets the eventfd counter: what
/// libblkio's `wait_for_completion_fd` does. The back-end may have made the eventfd
/// non-blocking (qemu-storage-daemon does), so a plain blocking read would not wait.
fn wait_for_completion_fd(fd: &EventFd, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
    }
    if rc > 0 {
        // EAGAIN (someone else reset it) is fine.
        let _ = fd.read();
    }
    Ok(())
}

/// What one run measured.
struct Report {
    ios: u64,
    errors: u64,
    elapsed: Duration,
    cpu_ns: u64,
    hist: Histogram,
    /// Passes that found completions, kicks sent, sleeps on the eventfd.
    counts: Counts,
}

/// Event counts of the measured interval (from the first submission to the end of the
/// runtime), printed with `--verbose` and in the JSON to explain CPU per I/O.
#[derive(Default, Debug, Clone, Copy)]
struct Counts {
    batches: u64,
    kicks: u64,
    sleeps: u64,
}

/// Default queue size: libblkio's default, raised to the next power of two that holds
/// `iodepth` requests.
fn default_queue_size(iodepth: u16) -> u16 {
    let need = (usize::from(iodepth) * DESCRIPTORS_PER_REQUEST).next_power_of_two();
    need.max(usize::from(LIBBLKIO_DEFAULT_QUEUE_SIZE)).min(32768) as u16
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad arguments").trim_start_matches("error: ");
            eprintln!("virtio-driver-ref: {first}");
            return ExitCode::from(2);
        }
    };
    if args.poll == args.interrupt {
        eprintln!("virtio-driver-ref: give exactly one of --poll and --interrupt");
        return ExitCode::from(2);
    }
    if !(args.runtime > 0.0 && args.runtime.is_finite()) {
        eprintln!("virtio-driver-ref: --runtime must be a positive number of seconds");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virtio-driver-ref: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    // The features libblkio's virtio-blk driver accepts (src/virtio_blk.rs, `connect`).
    let blk_features = VirtioBlkFeatureFlags::SIZE_MAX
        | VirtioBlkFeatureFlags::SEG_MAX
        | VirtioBlkFeatureFlags::RO
        | VirtioBlkFeatureFlags::BLK_SIZE
        | VirtioBlkFeatureFlags::FLUSH
        | VirtioBlkFeatureFlags::TOPOLOGY
        | VirtioBlkFeatureFlags::MQ
        | VirtioBlkFeatureFlags::DISCARD
        | VirtioBlkFeatureFlags::WRITE_ZEROES
        | VirtioBlkFeatureFlags::CONFIG_WCE;
    let mut ring_features = VirtioFeatureFlags::VERSION_1 | VirtioFeatureFlags::RING_EVENT_IDX;
    if args.packed {
        ring_features |= VirtioFeatureFlags::RING_PACKED;
    }
    let wanted = blk_features.bits() | ring_features.bits();

    // Allocated first so that it outlives the transport and the queue that use it.
    let depth = usize::from(args.iodepth);
    let bs = usize::try_from(args.bs).map_err(|_| "--bs is too large".to_string())?;
    let buffers = DataBuffers::new(depth * bs).map_err(|e| format!("allocating data buffers: {e}"))?;

    let vhost = VhostUser::new(&args.vhost_user, wanted)
        .map_err(|e| format!("cannot connect to vhost-user socket {}: {e}", args.vhost_user))?;
    let mut transport: Box<VirtioBlkTransport> = Box::new(vhost);

    let features = transport.get_features();
    let blk = VirtioBlkFeatureFlags::from_bits_truncate(features);
    let ring = VirtioFeatureFlags::from_bits_truncate(features);
    let cfg = transport.get_config().map_err(|e| format!("reading the device config: {e}"))?;
    let capacity = u64::from(cfg.capacity) * SECTOR;
    if args.rw.is_write() && blk.contains(VirtioBlkFeatureFlags::RO) {
        return Err("the device is read-only".into());
    }
    let blk_size =
        if blk.contains(VirtioBlkFeatureFlags::BLK_SIZE) { u64::from(cfg.blk_size.to_native()) } else { SECTOR };
    if !args.bs.is_multiple_of(blk_size) {
        return Err(format!("--bs {} is not a multiple of the device block size {blk_size}", args.bs));
    }
    if capacity < args.bs {
        return Err(format!("the device ({capacity} bytes) is smaller than one block of {} bytes", args.bs));
    }

    let queue_size = args.queue_size.unwrap_or_else(|| default_queue_size(args.iodepth));
    if usize::from(args.iodepth) * DESCRIPTORS_PER_REQUEST > usize::from(queue_size) {
        return Err(format!(
            "--queue-size {queue_size} holds at most {} requests of {DESCRIPTORS_PER_REQUEST} descriptors, \
             less than --iodepth {}",
            usize::from(queue_size) / DESCRIPTORS_PER_REQUEST,
            args.iodepth
        ));
    }
    if args.verbose {
        eprintln!(
            "virtio-driver-ref: features {features:#x}: {} ring, EVENT_IDX {}, INDIRECT no (not supported by \
             virtio-driver), queue size {queue_size}, capacity {capacity} bytes",
            if ring.contains(VirtioFeatureFlags::RING_PACKED) { "packed" } else { "split" },
            if ring.contains(VirtioFeatureFlags::RING_EVENT_IDX) { "yes" } else { "no" },
        );
    }

    let mut queues = VirtioBlkQueue::<u16>::setup_queues(&mut *transport, 1, queue_size)
        .map_err(|e| format!("setting up the queue (size {queue_size}): {e}"))?;
    let notifier = transport.get_submission_notifier(0);
    let completion_fd = transport.get_completion_fd(0);

    transport
        .map_mem_region(buffers.addr as usize, buffers.len, buffers.fd, 0)
        .map_err(|e| format!("registering data buffers with the back-end: {e}"))?;

    let report = {
        let queue = &mut queues[0];
        bench(args, queue, &*notifier, &completion_fd, &buffers, capacity)?
    };
    drop(queues);
    let _ = transport.unmap_mem_region(buffers.addr as usize, buffers.len);
    drop(transport);

    print_report(args, &report);
    // As vblk bench: the report is printed either way, failed requests fail the command.
    match report.errors {
        0 => Ok(()),
        n => Err(format!("{n} requests failed")),
    }
}

/// Submits one request for `slot`'s buffer at the next offset.
fn submit(
    queue: &mut VirtioBlkQueue<'_, u16>,
    args: &Args,
    offsets: &mut Offsets,
    buffers: &DataBuffers,
    slot: u16,
) -> Result<(), String> {
    let bs = args.bs as usize;
    // SAFETY: slot < iodepth, so the buffer lies inside the mapping, which outlives the queue's
    // use of it (every request is completed before `buffers` is dropped); each slot's buffer
    // belongs to at most one request in flight.
    let buf = unsafe { buffers.addr.add(usize::from(slot) * bs) };
    let offset = offsets.next();
    // SAFETY: as above: `buf..buf+bs` is valid, registered with the back-end, and not reused
    // until this request completes.
    let r = unsafe {
        if args.rw.is_write() {
            queue.write_raw(offset, buf, bs, slot)
        } else {
            queue.read_raw(offset, buf, bs, slot)
        }
    };
    r.map_err(|e| format!("submitting a request: {e}"))
}

/// Kicks the device if it asked for kicks: once per batch of submissions.
fn kick(queue: &mut VirtioBlkQueue<'_, u16>, notifier: &dyn QueueNotifier, kicks: &mut u64) -> Result<(), String> {
    if queue.avail_notif_needed() {
        notifier.notify().map_err(|e| format!("kicking the device: {e}"))?;
        *kicks += 1;
    }
    Ok(())
}

/// The measured loop: keep `iodepth` requests in flight for `runtime` seconds, shaped like
/// `vblk bench`'s worker.
///
/// It works in passes, as `vblk bench` does: drain every completion the used ring holds, read
/// the clock once for all of them, record their latencies, resubmit their slots with that
/// timestamp, and kick the device (if it asks for kicks) once for the batch: virtio-driver
/// leaves kicking to the caller, and one kick per batch is what libblkio's `do_io` does (an
/// application gets its completions from `do_io`, then queues the next requests). With nothing completed, `--poll`
/// spins on the used ring (notifications stay off); `--interrupt` enables used-buffer
/// notifications, re-checks the ring, and sleeps in poll(2) on the completion eventfd,
/// disabling notifications again once woken, as libblkio does.
///
/// When the runtime is over the measured interval ends (elapsed time and CPU time are taken
/// then); requests still in flight are completed but not counted.
fn bench(
    args: &Args,
    queue: &mut VirtioBlkQueue<'_, u16>,
    notifier: &dyn QueueNotifier,
    completion_fd: &EventFd,
    buffers: &DataBuffers,
    capacity: u64,
) -> Result<Report, String> {
    let depth = usize::from(args.iodepth);
    let interrupt = args.interrupt;
    let mut offsets = Offsets::new(args.rw.is_random(), capacity, args.bs);
    let mut hist = Histogram::default();
    // Start time of the request in each slot, in `Clock` nanoseconds.
    let mut started = vec![0u64; depth];
    // Slots completed in the current pass (never grows past `iodepth`).
    let mut done: Vec<u16> = Vec::with_capacity(depth);
    let mut counts = Counts::default();
    let (mut ios, mut errors) = (0u64, 0u64);

    // libblkio keeps used-buffer notifications off except while it waits, and makes the
    // completion eventfd non-blocking.
    queue.set_used_notif_enabled(false);
    set_nonblocking(completion_fd).map_err(|e| format!("making the completion eventfd non-blocking: {e}"))?;

    let cpu0 = thread_cpu_ns();
    let t0 = Instant::now();
    let clock = Clock::new(t0);
    let mut deadline = t0 + Duration::from_secs_f64(args.runtime);
    for slot in 0..args.iodepth {
        submit(queue, args, &mut offsets, buffers, slot)?;
        started[usize::from(slot)] = 0;
    }
    kick(queue, notifier, &mut counts.kicks)?;
    let mut in_flight = depth;
    let mut now = t0;
    // Set when the measured interval ends: its length, the CPU time used in it and the event
    // counts up to then.
    let mut end: Option<(Duration, u64, Counts)> = None;
    let mut spins = 0u32;
    loop {
        if end.is_none() && now >= deadline {
            end = Some((now.duration_since(t0), thread_cpu_ns().saturating_sub(cpu0), counts));
            deadline = now;
        }
        if in_flight == 0 {
            break;
        }
        // One pass, as in `vblk bench`: drain every completion the used ring holds, then one
        // clock read for all of them, record, resubmit their slots, one kick decision.
        let measuring = end.is_none();
        while let Some(c) = queue.completions().next() {
            in_flight -= 1;
            if c.ret == 0 {
                done.push(c.context);
            } else {
                errors += 1;
                done.push(c.context | FAILED);
            }
        }
        if !done.is_empty() {
            counts.batches += 1;
            now = Instant::now();
            let now_ns = clock.ns(now);
            let resubmit = measuring && now < deadline;
            for &entry in &done {
                let slot = entry & !FAILED;
                if measuring && entry & FAILED == 0 {
                    hist.record(now_ns.saturating_sub(started[usize::from(slot)]));
                    ios += 1;
                }
                if resubmit {
                    submit(queue, args, &mut offsets, buffers, slot)?;
                    started[usize::from(slot)] = now_ns;
                    in_flight += 1;
                }
            }
            done.clear();
            if resubmit {
                kick(queue, notifier, &mut counts.kicks)?;
            }
            continue;
        }
        if interrupt {
            queue.set_used_notif_enabled(true);
            if !queue.completions().has_next() {
                now = Instant::now();
                let limit = match end {
                    None => deadline.saturating_duration_since(now),
                    Some(_) => (deadline + DRAIN_TIMEOUT).saturating_duration_since(now),
                };
                counts.sleeps += 1;
                wait_for_completion_fd(completion_fd, limit)
                    .map_err(|e| format!("waiting on the completion eventfd: {e}"))?;
                now = Instant::now();
            }
            queue.set_used_notif_enabled(false);
        } else {
            std::hint::spin_loop();
            spins += 1;
            if spins < SPINS_PER_CLOCK {
                continue;
            }
            spins = 0;
            now = Instant::now();
        }
        if end.is_some() && now >= deadline + DRAIN_TIMEOUT {
            return Err(format!("{in_flight} requests did not complete within {DRAIN_TIMEOUT:?} after the run"));
        }
    }
    let (elapsed, cpu_ns, counts) =
        end.unwrap_or_else(|| (now.duration_since(t0), thread_cpu_ns().saturating_sub(cpu0), counts));
    Ok(Report { ios, errors, elapsed, cpu_ns, hist, counts })
}

/// Sets `O_NONBLOCK` on the eventfd, as libblkio does before it polls it.
fn set_nonblocking(fd: &EventFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an open descriptor we hold; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Prints the report as `vblk bench` does: JSON with `--json`, else a short summary.
fn print_report(args: &Args, r: &Report) {
    let secs = r.elapsed.as_secs_f64();
    let iops = if secs > 0.0 { r.ios as f64 / secs } else { 0.0 };
    let (read_ios, write_ios) = if args.rw.is_write() { (0, r.ios) } else { (r.ios, 0) };
    let cpu_per_io = if r.ios > 0 { r.cpu_ns as f64 / r.ios as f64 } else { 0.0 };
    let mode = if args.poll { "poll" } else { "interrupt" };
    let p50 = r.hist.quantile(0.50);
    let p99 = r.hist.quantile(0.99);
    let p999 = r.hist.quantile(0.999);
    if args.verbose {
        let per = |n: u64| if r.ios > 0 { n as f64 / r.ios as f64 } else { 0.0 };
        eprintln!(
            "virtio-driver-ref: per I/O: {:.3} completion batches, {:.3} kicks, {:.3} sleeps on the eventfd",
            per(r.counts.batches),
            per(r.counts.kicks),
            per(r.counts.sleeps)
        );
    }
    if args.json {
        let v = serde_json::json!({
            "target": format!("vhost-user:{}", args.vhost_user),
            "rw": args.rw.name(),
            "bs": args.bs,
            "iodepth": args.iodepth,
            "queues": args.queues,
            "mode": mode,
            // vblk bench's option; virtio-driver has no such thing.
            "batch_completions": false,
            "runtime_s": secs,
            "ios": r.ios,
            "read_ios": read_ios,
            "write_ios": write_ios,
            "errors": r.errors,
            "iops": iops,
            "bw_bytes_per_s": iops * args.bs as f64,
            "lat_ns": {
                "mean": r.hist.mean(),
                "p50": p50,
                "p99": p99,
                "p99_9": p999,
            },
            "cpu_ns_per_io": cpu_per_io,
            "kicks": r.counts.kicks,
            "waits": r.counts.sleeps,
        });
        println!("{v}");
    } else {
        println!(
            "virtio-driver 0.6.1 {} bs={} iodepth={} {mode}: {:.0} IOPS, {:.1} MiB/s, {} I/Os, {} errors in {secs:.2} s",
            args.rw.name(),
            args.bs,
            args.iodepth,
            iops,
            iops * args.bs as f64 / f64::from(1 << 20),
            r.ios,
            r.errors,
        );
        println!(
            "latency ns: mean {:.0}  p50 {p50}  p99 {p99}  p99.9 {p999};  driver CPU {cpu_per_io:.0} ns per I/O",
            r.hist.mean()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_stay_in_range_and_aligned() {
        let mut o = Offsets::new(true, 1 << 30, 4096);
        for _ in 0..10_000 {
            let off = o.next();
            assert!(off < 1 << 30);
            assert_eq!(off % 4096, 0);
        }
        let mut s = Offsets::new(false, 3 * 4096, 4096);
        let seq: Vec<u64> = (0..4).map(|_| s.next()).collect();
        assert_eq!(seq, [0, 4096, 8192, 0]);
    }

    #[test]
    fn queue_size_holds_the_depth() {
        assert_eq!(default_queue_size(1), 256);
        assert_eq!(default_queue_size(32), 256);
        assert_eq!(default_queue_size(128), 512);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("100").is_err());
    }
}
