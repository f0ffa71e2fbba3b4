//! Measurement helpers: a fixed-size latency histogram, per-thread CPU time, a fast PRNG, and
//! human-readable numbers.

/// Values below this are counted exactly (one bucket each).
const LINEAR: u64 = 256;
/// Sub-buckets per power of two above [`LINEAR`]: 2^7, so a bucket spans at most 1/128 of its
/// lower bound, and its midpoint is within 1/256 (0.4 %) of any value in it.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets for every `u64`: 256 exact ones, then 128 per power of two from 2^8 to 2^63.
const BUCKETS: usize = (LINEAR + (64 - 8) * SUB) as usize;

/// A log-linear histogram of nanosecond latencies with a fixed number of buckets (no
/// allocation when recording), mergeable across threads.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    sum: u128,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: Box::new([0; BUCKETS]), total: 0, sum: 0, max: 0 }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= 8
    let shift = e - SUB_BITS; // >= 1
                              // (v >> shift) is in [SUB, 2*SUB).
    ((u64::from(shift) * SUB) + (v >> shift)) as usize
}

/// The midpoint of bucket `i`.
fn value_of(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR {
        return i;
    }
    let shift = i / SUB - 1;
    let m = i % SUB + SUB;
    let low = m << shift;
    low + ((1u64 << shift) - 1) / 2
}

impl Histogram {
    /// Counts one latency of `ns` nanoseconds.
    #[inline]
    pub fn record(&mut self, ns: u64) {
        if let Some(c) = self.counts.get_mut(bucket_of(ns)) {
            *c += 1;
        }
        self.total += 1;
        self.sum += u128::from(ns);
        self.max = self.max.max(ns);
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    /// Values recorded.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Exact mean (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at quantile `q` (0..=1): the smallest bucket holding at least `q` of the
    /// values, as its midpoint (within 0.4 %), never above the largest value seen.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value_of(i).min(self.max);
            }
        }
        self.max
    }
}

/// Timestamps as nanoseconds since a start `Instant`, so that per-request start times are
/// plain `u64`s and a latency is one subtraction. The benchmark loops read the clock once per
/// pass (`Instant::now`, vDSO) and convert it once with [`Clock::ns`].
#[derive(Clone, Copy, Debug)]
pub struct Clock(std::time::Instant);

impl Clock {
    /// A clock that counts from `t0`.
    pub fn new(t0: std::time::Instant) -> Self {
        Clock(t0)
    }

    /// Nanoseconds from the start to `t` (0 if `t` is earlier).
    #[inline]
    pub fn ns(&self, t: std::time::Instant) -> u64 {
        t.saturating_duration_since(self.0).as_nanos() as u64
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

/// SplitMix64: a fast, well-mixed PRNG (one multiply-xorshift chain per value).
#[derive(Clone, Debug)]
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

/// `bytes` with a binary unit: "512 B", "4 KiB", "1.50 GiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// A count with a decimal suffix: "950", "12.3k", "1.25M".
pub fn human_count(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Nanoseconds in the most readable unit: "850 ns", "12.3 µs", "4.56 ms".
pub fn human_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_within_one_percent() {
        let mut last = 0usize;
        for v in (0..100_000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b < BUCKETS, "{v}");
            assert!(b >= last || v > 100_000);
            last = b;
            let mid = value_of(b) as f64;
            assert!((mid - v as f64).abs() <= v as f64 / 100.0, "{v} -> bucket {b} value {mid}");
        }
        assert_eq!(bucket_of(255) + 1, bucket_of(256));
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_and_merge() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        for v in 1..=1000u64 {
            a.record(v * 1000);
        }
        b.record(5_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 1001);
        let p50 = a.quantile(0.5) as f64;
        assert!((p50 - 501_000.0).abs() < 501_000.0 / 100.0, "{p50}");
        assert!((a.quantile(1.0) as f64 - 5e6).abs() <= 5e6 / 100.0);
        assert!((a.quantile(0.99) as f64 - 991_000.0).abs() < 991_000.0 / 100.0);
        assert!(a.mean() > 500_000.0);
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = SplitMix64::new(7);
        for n in [1u64, 2, 3, 1000, u64::MAX] {
            for _ in 0..1000 {
                assert!(r.below(n) < n);
            }
        }
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_count(123_456.0), "123.5k");
        assert_eq!(human_ns(2500.0), "2.50 µs");
    }
}
