//! Hybrid waiting: poll the used ring for a bounded time before sleeping.
//!
//! # When a spin is worth it
//!
//! A sleep on the completion eventfd costs the waiting thread a context
//! switch out and one back in, and the request the time the device's signal
//! takes to wake it: on this project's VM about 5–6 µs of driver CPU and
//! ~14 µs per request at queue depth 1 against qemu-storage-daemon, whose
//! requests take ~3 µs when polled. Polling for the completion instead
//! costs the time it takes and nothing else. So a spin pays while the wait
//! is shorter than a sleep's cost, which is the case at low depth, where
//! each sleep serves one completion. At depth the batched sleeps of
//! [`BlkQueue::set_batch_completions`](super::BlkQueue::set_batch_completions)
//! serve dozens of completions each, and a spin that returns at the first one
//! would turn the wait into polling. Hence the two rules of [`SpinWait`]:
//!
//! * only with at most [`SpinWait::MAX_IN_FLIGHT`] requests in flight;
//! * a spin that runs out its limit without a completion (the device is
//!   slower than the limit) makes the next ones skip, 1, 2, 4 … up to
//!   [`SpinWait::MAX_SKIP`] waits, until one finds its completion again; a
//!   slow device costs at most one limit per that many sleeps.

use std::time::{Duration, Instant};

/// The hybrid-wait policy of a queue (see the module docs).
#[derive(Clone, Copy, Debug)]
pub(super) struct SpinWait {
    limit: Duration,
    /// Waits still to skip after a miss.
    skip: u32,
    /// What the next miss sets `skip` to (doubles per miss in a row).
    backoff: u32,
}

impl SpinWait {
    /// Most requests in flight for which a wait spins first.
    pub const MAX_IN_FLIGHT: usize = 2;
    /// Most waits skipped after misses in a row.
    pub const MAX_SKIP: u32 = 64;
    /// Ring polls between clock reads.
    const POLLS_PER_CLOCK: u32 = 32;

    pub fn new(limit: Duration) -> Self {
        SpinWait { limit, skip: 0, backoff: 1 }
    }

    /// The configured limit.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Whether the wait about to sleep with `in_flight` requests should spin
    /// first; counts a skipped wait.
    pub fn should_spin(&mut self, in_flight: usize) -> bool {
        if in_flight == 0 || in_flight > Self::MAX_IN_FLIGHT {
            return false;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// Polls with `poll` (which returns `Some` once there is something to
    /// return) until it succeeds or the limit (or the shorter `timeout`)
    /// passes, and learns from which came first.
    pub fn spin<R>(&mut self, timeout: Option<Duration>, mut poll: impl FnMut() -> Option<R>) -> Option<R> {
        let limit = timeout.map_or(self.limit, |t| t.min(self.limit));
        let start = Instant::now();
        loop {
            for _ in 0..Self::POLLS_PER_CLOCK {
                if let Some(r) = poll() {
                    self.backoff = 1;
                    return Some(r);
                }
                std::hint::spin_loop();
            }
            if start.elapsed() >= limit {
                self.skip = self.backoff;
                self.backoff = (self.backoff * 2).min(Self::MAX_SKIP);
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spins_only_at_low_depth() {
        let mut s = SpinWait::new(Duration::from_micros(10));
        assert!(!s.should_spin(0));
        assert!(s.should_spin(1));
        assert!(s.should_spin(SpinWait::MAX_IN_FLIGHT));
        assert!(!s.should_spin(SpinWait::MAX_IN_FLIGHT + 1));
    }

    #[test]
    fn a_hit_returns_what_the_poll_found() {
        let mut s = SpinWait::new(Duration::from_secs(5));
        let mut n = 0;
        assert_eq!(
            s.spin(None, || {
                n += 1;
                (n == 100).then_some(7)
            }),
            Some(7)
        );
        assert!(s.should_spin(1));
    }

    #[test]
    fn misses_in_a_row_skip_1_2_4_up_to_the_maximum_and_a_hit_resets() {
        let mut s = SpinWait::new(Duration::ZERO);
        let mut skipped = Vec::new();
        assert!(s.should_spin(1));
        for _ in 0..9 {
            assert_eq!(s.spin(None, || None::<()>), None);
            let mut k = 0;
            // The `true` that ends this loop is the next spin's go-ahead.
            while !s.should_spin(1) {
                k += 1;
            }
            skipped.push(k);
        }
        assert_eq!(skipped, [1, 2, 4, 8, 16, 32, 64, 64, 64]);
        // A hit after all that: the next miss skips one wait again.
        let mut s = SpinWait { limit: Duration::from_secs(5), ..s };
        assert_eq!(s.spin(None, || Some(())), Some(()));
        s.limit = Duration::ZERO;
        assert_eq!(s.spin(None, || None::<()>), None);
        assert!(!s.should_spin(1));
        assert!(s.should_spin(1));
    }
}
