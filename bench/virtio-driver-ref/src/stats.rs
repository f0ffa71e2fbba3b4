//! Measurement helpers with the API of `vblk/src/stats.rs`: latency histogram, per-thread CPU
//! time and the offset generator's PRNG.

use hdrhistogram::Histogram as Hdr;

/// Nanosecond latencies, 3 significant digits (hdrhistogram).
pub struct Histogram(Hdr<u64>);

impl Default for Histogram {
    fn default() -> Self {
        // 1 ns .. 1 minute; longer values are clamped.
        Histogram(Hdr::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Histogram {
    /// Counts one latency of `ns` nanoseconds.
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.0.saturating_record(ns.max(1));
    }

    /// Mean of the recorded values (0 when empty).
    pub fn mean(&self) -> f64 {
        self.0.mean()
    }

    /// The value at quantile `q` (0..=1).
    pub fn quantile(&self, q: f64) -> u64 {
        self.0.value_at_quantile(q)
    }
}

/// User plus system CPU time of the calling thread, in nanoseconds (getrusage(RUSAGE_THREAD)).
pub fn thread_cpu_ns() -> u64 {
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the duration of the call.
    let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    if r != 0 {
        return 0;
    }
    let tv = |t: libc::timeval| (t.tv_sec as u64).saturating_mul(1_000_000_000) + (t.tv_usec as u64) * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// SplitMix64: a fast, well-mixed PRNG.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`), by multiply-high (no division).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}
