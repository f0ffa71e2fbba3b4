//! Device addresses (IOVAs) for transports whose device sits behind an IOMMU.
//!
//! vhost-vdpa (`VHOST_VDPA_GET_IOVA_RANGE`) and VFIO (`VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`)
//! each report the address ranges the device may be given; everything a driver maps for DMA
//! must get an address inside them. [`IovaAllocator`] hands out aligned, non-overlapping
//! ranges from those windows and takes them back.
//!
//! It is a first-fit allocator over a sorted free list. Mappings are made at set-up time and
//! for buffer pools, not per request, so a list walk is cheap enough and keeps the invariant
//! easy to check: **the free list is sorted, its ranges are disjoint and non-adjacent
//! (coalesced), and every range lies inside one of the windows given at construction**.
//! Address 0 is never handed out, so a zero IOVA always means "not mapped".

use std::fmt;
use std::ops::RangeInclusive;

/// Why an IOVA request or release was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IovaError {
    /// The alignment is not a power of two.
    BadAlignment(u64),
    /// No window (after alignment, and leaving out address 0) is large enough to hold anything.
    NoUsableWindow,
    /// A zero-length allocation or release.
    ZeroLength,
    /// No free range is large enough for this many bytes.
    Exhausted {
        /// Bytes asked for (rounded up to the alignment).
        len: u64,
        /// Largest free range at the time.
        largest_free: u64,
    },
    /// A release of a range that is not (wholly) allocated: outside the windows, already
    /// free, or overlapping a free range.
    NotAllocated {
        /// Start of the range released.
        iova: u64,
        /// Its length.
        len: u64,
    },
}

impl fmt::Display for IovaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IovaError::BadAlignment(a) => write!(f, "IOVA alignment {a:#x} is not a power of two"),
            IovaError::NoUsableWindow => f.write_str("the IOMMU reports no usable IOVA range"),
            IovaError::ZeroLength => f.write_str("zero-length IOVA range"),
            IovaError::Exhausted { len, largest_free } => {
                write!(f, "no free IOVA range of {len:#x} bytes (largest free: {largest_free:#x})")
            }
            IovaError::NotAllocated { iova, len } => {
                write!(f, "IOVA range {iova:#x}+{len:#x} was not allocated")
            }
        }
    }
}

impl std::error::Error for IovaError {}

/// Hands out aligned IOVA ranges from the windows an IOMMU allows.
///
/// ```
/// use virtio_transport_api::iova::IovaAllocator;
///
/// // vhost-vdpa reported [0, 2^48 - 1]; VFIO may report several windows.
/// let mut iovas = IovaAllocator::new([0..=(1u64 << 48) - 1], 4096).unwrap();
/// let a = iovas.alloc(8192).unwrap();
/// let b = iovas.alloc(100).unwrap();
/// assert_ne!(a, 0);
/// assert_eq!(a % 4096, 0);
/// assert!(b >= a + 8192 || b + 4096 <= a);
/// iovas.free(a, 8192).unwrap();
/// assert!(iovas.free(a, 8192).is_err(), "a double free is refused");
/// ```
#[derive(Clone, Debug)]
pub struct IovaAllocator {
    /// Free ranges, inclusive, sorted, disjoint and non-adjacent; each inside a window and
    /// aligned at its start and at `end + 1`.
    free: Vec<RangeInclusive<u64>>,
    /// The windows as given, after alignment: releases must fall inside one.
    windows: Vec<RangeInclusive<u64>>,
    align: u64,
}

impl IovaAllocator {
    /// An allocator over `windows` (inclusive ranges, in any order, possibly overlapping),
    /// handing out ranges aligned to `align` (a power of two; transports use the page size).
    /// Window edges are shrunk to the alignment and address 0 is left out.
    pub fn new(windows: impl IntoIterator<Item = RangeInclusive<u64>>, align: u64) -> Result<Self, IovaError> {
        if !align.is_power_of_two() {
            return Err(IovaError::BadAlignment(align));
        }
        let mut aligned: Vec<RangeInclusive<u64>> = windows
            .into_iter()
            .filter_map(|w| {
                let start = (*w.start()).max(1).checked_next_multiple_of(align)?;
                // Last byte of the last whole aligned block inside the window.
                let end_exclusive = w.end().checked_add(1).map_or(u64::MAX - (align - 1), |e| e & !(align - 1));
                (end_exclusive > start).then(|| start..=end_exclusive - 1)
            })
            .collect();
        aligned.sort_by_key(|r| *r.start());
        // Merge overlapping or adjacent windows so the free list starts coalesced.
        let mut merged: Vec<RangeInclusive<u64>> = Vec::with_capacity(aligned.len());
        for w in aligned {
            match merged.last_mut() {
                Some(last) if last.end().checked_add(1).is_none_or(|next| *w.start() <= next) => {
                    *last = *last.start()..=(*last.end()).max(*w.end());
                }
                _ => merged.push(w),
            }
        }
        if merged.is_empty() {
            return Err(IovaError::NoUsableWindow);
        }
        Ok(IovaAllocator { free: merged.clone(), windows: merged, align })
    }

    /// The alignment of every range handed out.
    pub fn alignment(&self) -> u64 {
        self.align
    }

    /// Bytes still free.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(range_len).fold(0, u64::saturating_add)
    }

    /// The lowest free range of at least `len` bytes (rounded up to the alignment); returns
    /// its start. The whole rounded range is reserved: release it with the same `len`.
    pub fn alloc(&mut self, len: u64) -> Result<u64, IovaError> {
        let len = self.round(len)?;
        let Some(i) = self.free.iter().position(|r| range_len(r) >= len) else {
            let largest_free = self.free.iter().map(range_len).max().unwrap_or(0);
            return Err(IovaError::Exhausted { len, largest_free });
        };
        let r = self.free[i].clone();
        let start = *r.start();
        if range_len(&r) == len {
            self.free.remove(i);
        } else {
            // `len < range_len(r)`, so `start + len` lies inside `r`.
            self.free[i] = start + len..=*r.end();
        }
        Ok(start)
    }

    /// Returns `len` bytes at `iova` (as given to and returned by [`IovaAllocator::alloc`]).
    /// Refuses, and changes nothing, if any of it is already free or outside the windows.
    pub fn free(&mut self, iova: u64, len: u64) -> Result<(), IovaError> {
        let not_allocated = IovaError::NotAllocated { iova, len };
        let rounded = self.round(len)?;
        let end = iova.checked_add(rounded - 1).ok_or(not_allocated.clone())?;
        if iova % self.align != 0 || !self.windows.iter().any(|w| w.contains(&iova) && w.contains(&end)) {
            return Err(not_allocated);
        }
        // First free range that ends at or after `iova`: the candidate successor.
        let i = self.free.partition_point(|r| *r.end() < iova);
        if self.free.get(i).is_some_and(|next| *next.start() <= end) {
            return Err(not_allocated);
        }
        let joins_prev = i > 0 && self.free[i - 1].end().checked_add(1) == Some(iova);
        let joins_next = self.free.get(i).is_some_and(|next| end.checked_add(1) == Some(*next.start()));
        match (joins_prev, joins_next) {
            (true, true) => {
                let next_end = *self.free[i].end();
                self.free[i - 1] = *self.free[i - 1].start()..=next_end;
                self.free.remove(i);
            }
            (true, false) => self.free[i - 1] = *self.free[i - 1].start()..=end,
            (false, true) => self.free[i] = iova..=*self.free[i].end(),
            (false, false) => self.free.insert(i, iova..=end),
        }
        Ok(())
    }

    /// `len` rounded up to the alignment; zero and overflow are refused.
    fn round(&self, len: u64) -> Result<u64, IovaError> {
        if len == 0 {
            return Err(IovaError::ZeroLength);
        }
        len.checked_next_multiple_of(self.align)
            .ok_or(IovaError::Exhausted { len, largest_free: self.free.iter().map(range_len).max().unwrap_or(0) })
    }
}

/// Bytes in an inclusive range, saturating for the full 64-bit space.
fn range_len(r: &RangeInclusive<u64>) -> u64 {
    (r.end() - r.start()).saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    fn check_invariant(a: &IovaAllocator) {
        for pair in a.free.windows(2) {
            assert!(pair[0].end() + 1 < *pair[1].start(), "sorted, disjoint, coalesced: {:?}", a.free);
        }
        for r in &a.free {
            assert_eq!(r.start() % PAGE, 0);
            assert_eq!((r.end() + 1) % PAGE, 0);
            assert!(a.windows.iter().any(|w| w.contains(r.start()) && w.contains(r.end())));
        }
    }

    #[test]
    fn never_hands_out_zero_and_stays_in_windows() {
        let mut a = IovaAllocator::new([0..=4 * PAGE - 1], PAGE).unwrap();
        assert_eq!(a.free_bytes(), 3 * PAGE);
        assert_eq!(a.alloc(1).unwrap(), PAGE);
        assert_eq!(a.alloc(PAGE + 1).unwrap(), 2 * PAGE);
        assert_eq!(a.alloc(1), Err(IovaError::Exhausted { len: PAGE, largest_free: 0 }));
        check_invariant(&a);
    }

    #[test]
    fn windows_are_trimmed_to_whole_aligned_pages() {
        // [0x1001, 0x4ffe] holds only the pages at 0x2000 and 0x3000.
        let mut a = IovaAllocator::new([0x1001..=0x4ffe], PAGE).unwrap();
        assert_eq!(a.free_bytes(), 2 * PAGE);
        assert_eq!(a.alloc(2 * PAGE).unwrap(), 0x2000);
        assert!(matches!(IovaAllocator::new([0x1001..=0x1fff], PAGE), Err(IovaError::NoUsableWindow)));
        assert!(matches!(IovaAllocator::new([0..=PAGE - 1], PAGE), Err(IovaError::NoUsableWindow)));
        assert!(matches!(IovaAllocator::new([0..=u64::MAX], 3), Err(IovaError::BadAlignment(3))));
    }

    #[test]
    fn the_whole_64_bit_space_works() {
        let mut a = IovaAllocator::new([0..=u64::MAX], PAGE).unwrap();
        // Page 0 and the last page (its end would overflow) are left out.
        assert_eq!(a.free_bytes(), u64::MAX - (2 * PAGE - 1));
        let x = a.alloc(1 << 40).unwrap();
        assert_eq!(x, PAGE);
        a.free(x, 1 << 40).unwrap();
        assert_eq!(a.free.len(), 1);
        assert!(a.alloc(u64::MAX).is_err(), "rounding overflow is refused, not wrapped");
        check_invariant(&a);
    }

    #[test]
    fn several_windows_overlapping_and_unsorted() {
        let mut a = IovaAllocator::new([0x10_0000..=0x1f_ffff, 0x1000..=0x2fff, 0x18_0000..=0x27_ffff], PAGE).unwrap();
        assert_eq!(a.free.len(), 2, "the overlapping windows merged: {:?}", a.free);
        assert_eq!(a.alloc(PAGE).unwrap(), 0x1000);
        // Too big for the first window: comes from the second.
        assert_eq!(a.alloc(3 * PAGE).unwrap(), 0x10_0000);
        check_invariant(&a);
    }

    #[test]
    fn free_coalesces_with_both_neighbours() {
        let mut a = IovaAllocator::new([0..=16 * PAGE - 1], PAGE).unwrap();
        let x: Vec<u64> = (0..5).map(|_| a.alloc(PAGE).unwrap()).collect();
        a.free(x[1], PAGE).unwrap();
        a.free(x[3], PAGE).unwrap();
        check_invariant(&a);
        assert_eq!(a.free.len(), 3);
        a.free(x[2], PAGE).unwrap();
        check_invariant(&a);
        assert_eq!(a.free.len(), 2, "{:?}", a.free);
        a.free(x[0], PAGE).unwrap();
        a.free(x[4], PAGE).unwrap();
        assert_eq!(a.free, [PAGE..=16 * PAGE - 1]);
    }

    #[test]
    fn bad_releases_are_refused_and_change_nothing() {
        let mut a = IovaAllocator::new([0..=8 * PAGE - 1], PAGE).unwrap();
        let x = a.alloc(2 * PAGE).unwrap();
        let before = a.free.clone();
        for (iova, len) in [(x, 3 * PAGE), (x + 1, PAGE), (0, PAGE), (100 * PAGE, PAGE), (u64::MAX - 10, PAGE)] {
            assert_eq!(a.free(iova, len), Err(IovaError::NotAllocated { iova, len }), "{iova:#x}+{len:#x}");
            assert_eq!(a.free, before);
        }
        assert_eq!(a.free(x, 0), Err(IovaError::ZeroLength));
        a.free(x, 2 * PAGE).unwrap();
        assert_eq!(a.free(x, PAGE), Err(IovaError::NotAllocated { iova: x, len: PAGE }), "double free");
    }

    #[test]
    fn random_sequences_keep_the_invariant() {
        // A small deterministic generator: no test-only dependency.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let total = 63 * PAGE;
        let mut a = IovaAllocator::new([0..=64 * PAGE - 1], PAGE).unwrap();
        let mut live: Vec<(u64, u64)> = Vec::new();
        for _ in 0..5000 {
            if next() % 2 == 0 || live.is_empty() {
                let len = next() % (8 * PAGE) + 1;
                if let Ok(x) = a.alloc(len) {
                    let rounded = len.next_multiple_of(PAGE);
                    assert!(live.iter().all(|&(y, l)| x + rounded <= y || y + l.next_multiple_of(PAGE) <= x));
                    live.push((x, len));
                }
            } else {
                let (x, len) = live.swap_remove((next() % live.len() as u64) as usize);
                a.free(x, len).unwrap();
            }
            check_invariant(&a);
            let used: u64 = live.iter().map(|&(_, l)| l.next_multiple_of(PAGE)).sum();
            assert_eq!(a.free_bytes() + used, total);
        }
    }
}
