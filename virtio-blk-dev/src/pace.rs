//! Pacing for a driver that polls its used ring.
//!
//! # Why a polling driver should sometimes not poll
//!
//! A driver that polls reads the used ring's index and elements, the lines
//! the device writes for every request it completes. A read of a line the
//! device has just written moves the line to the driver's core; the device's
//! next write must take it back. When the device is a process on another
//! core (qemu-storage-daemon and `vblk serve` were measured) and is the
//! limit, a driver polling flat out makes the device pay that transfer on
//! every request.
//!
//! [`PollPacer`] has the driver, after a pass that found completions, leave
//! the ring alone for an eighth of the time the requests still in flight
//! need ([`PollPacer::SHARE`]), never longer than [`PollPacer::MAX_HOLD`].
//! By Little's law the requests in flight times the time between
//! completions is the latency of a request, so the hold is an eighth of the
//! latency: the device still has seven eighths of the work queued when the
//! driver looks again, so it never runs dry, and it completes several
//! requests per visit instead of one. A request waits at most the hold, on
//! average half of it, for its completion to be seen; at queue depth 1 the
//! hold is an eighth of the time the device takes, so the completion still
//! arrives after the driver looks again.
//!
//! Measured on this project's 2-vCPU AMD EPYC VM, 4 KiB random reads
//! against qemu-storage-daemon 7.2 (Debian's, null-co, pinned to the other
//! vCPU), `vblk bench --poll` with and without `--no-pacing`, alternating
//! with `bench/virtio-driver-ref` (which polls flat out), three rounds of
//! 2 s, medians:
//!
//! | depth | paced: IOPS, p50 | flat out: IOPS, p50 | reference: IOPS, p50 |
//! |--:|--:|--:|--:|
//! | 1 | 358 k, 2.7 µs | 358 k, 2.7 µs | 338 k, 2.7 µs |
//! | 32 | 1.73 M, 17.9 µs | 1.49 M, 20.8 µs | 1.47 M, 20.8 µs |
//! | 128 | 1.79 M, 71.9 µs | 1.37 M, 91.4 µs | 1.43 M, 87.8 µs |
//!
//! In earlier rounds holding for half the latency starved the device at
//! depth 32 (0.90× the reference), a quarter did as well as an eighth, and
//! a limit of 2 µs instead of 4 lost a little at depth 128 (1.20× the
//! reference instead of 1.26×).

use std::time::Duration;

/// How long a polling driver leaves the used ring alone after a pass that
/// found completions (see the module docs).
///
/// Feed it every pass that completed something; it keeps an estimate of the
/// time between completions (an exponentially weighted mean, weight 1/8).
/// The times are the caller's, in nanoseconds from any fixed origin.
///
/// ```
/// use virtio_blk_dev::PollPacer;
///
/// let mut pacer = PollPacer::new();
/// // The first pass gives no estimate yet: poll again at once.
/// assert_eq!(pacer.after_pass(1_000, 1, 32), 0);
/// // 4 completions in the next 2 µs: 500 ns each; 32 in flight take
/// // 16 µs, so hold for 2 µs.
/// assert_eq!(pacer.after_pass(3_000, 4, 32), 2_000);
/// ```
#[derive(Clone, Debug, Default)]
pub struct PollPacer {
    /// Estimated nanoseconds between completions; 0 until a first interval.
    per_completion_ns: u64,
    /// When the last pass with completions ran.
    last_ns: Option<u64>,
}

impl PollPacer {
    /// The hold is the latency of the requests in flight divided by this.
    pub const SHARE: u64 = 8;
    /// The longest hold.
    pub const MAX_HOLD: Duration = Duration::from_micros(4);

    /// A pacer with no estimate yet (its first pass asks for no hold).
    pub const fn new() -> Self {
        PollPacer { per_completion_ns: 0, last_ns: None }
    }

    /// Records a pass at `now_ns` that took `completions` completions and
    /// left `in_flight` requests in flight (after resubmitting); returns how
    /// many nanoseconds to wait before polling again. A pass without
    /// completions changes nothing and asks for no hold.
    pub fn after_pass(&mut self, now_ns: u64, completions: usize, in_flight: usize) -> u64 {
        if completions == 0 {
            return 0;
        }
        if let Some(last) = self.last_ns {
            let per = now_ns.saturating_sub(last) / completions as u64;
            self.per_completion_ns = if self.per_completion_ns == 0 {
                per
            } else {
                self.per_completion_ns - self.per_completion_ns / 8 + per / 8
            };
        }
        self.last_ns = Some(now_ns);
        let latency = self.per_completion_ns.saturating_mul(in_flight as u64);
        (latency / Self::SHARE).min(Self::MAX_HOLD.as_nanos() as u64)
    }

    /// Forgets the estimate, for a queue whose load changed (after a sleep
    /// or a pause in submissions, say).
    pub fn reset(&mut self) {
        *self = PollPacer::new();
    }

    /// The current estimate of the time between completions, in
    /// nanoseconds (0 before the second pass with completions).
    pub fn per_completion_ns(&self) -> u64 {
        self.per_completion_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_is_an_eighth_of_the_latency_of_what_is_in_flight() {
        let mut p = PollPacer::new();
        assert_eq!(p.after_pass(10_000, 3, 16), 0, "no estimate from one pass");
        // 2 completions in 1 µs: 500 ns each; 16 in flight: 8 µs of work.
        assert_eq!(p.after_pass(11_000, 2, 16), 1_000);
        assert_eq!(p.per_completion_ns(), 500);
        // Nothing completed: nothing learnt, no hold.
        assert_eq!(p.after_pass(11_500, 0, 16), 0);
        assert_eq!(p.per_completion_ns(), 500);
        // 2.5 µs since the last pass with completions: the estimate moves an
        // eighth of the way.
        p.after_pass(13_500, 1, 16);
        assert_eq!(p.per_completion_ns(), 500 - 500 / 8 + 2_500 / 8);
    }

    #[test]
    fn the_hold_is_bounded_and_vanishes_with_nothing_in_flight() {
        let mut p = PollPacer::new();
        p.after_pass(0, 1, 1);
        // One completion per 100 µs: a slow device.
        assert_eq!(p.after_pass(100_000, 1, 128), PollPacer::MAX_HOLD.as_nanos() as u64);
        assert_eq!(p.after_pass(200_000, 1, 0), 0);
        // At depth 1 the hold is an eighth of the device's time.
        let mut p = PollPacer::new();
        p.after_pass(0, 1, 1);
        assert_eq!(p.after_pass(2_000, 1, 1), 250);
    }

    #[test]
    fn odd_clocks_and_huge_estimates_do_not_overflow_or_panic() {
        let mut p = PollPacer::new();
        p.after_pass(u64::MAX, 1, usize::MAX);
        // A clock that went backwards counts as no time.
        assert_eq!(p.after_pass(0, 1, usize::MAX), 0);
        p.after_pass(u64::MAX, 1, usize::MAX);
        assert_eq!(p.after_pass(u64::MAX, 1, usize::MAX), PollPacer::MAX_HOLD.as_nanos() as u64);
        p.reset();
        assert_eq!(p.per_completion_ns(), 0);
        assert_eq!(p.after_pass(5, 1, 1), 0);
    }
}
