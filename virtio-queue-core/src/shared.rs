//! Memory shared with the device: the only code that touches it.
//!
//! The device may read or write ring memory at any moment, so the driver never
//! forms a Rust reference to it: every access is an atomic operation of the
//! field's natural width through a raw pointer. Two kinds of field exist, and
//! each field is always accessed as one kind by both sides:
//!
//! * **Synchronising fields** (`load_*`/`store_*`, explicit [`Ordering`]): the
//!   split avail and used indices, the split ring flags and event indices, the
//!   packed descriptor flags and the packed event suppression structures. They
//!   hand ownership of other memory from one side to the other.
//! * **Data fields** (`read_*`/`write_*`, relaxed): descriptor contents, avail
//!   ring entries, used elements. They are only ever read after an acquire that
//!   synchronises with the release that followed their writing, so relaxed
//!   atomics are enough; being atomic at all keeps a racing (hostile) device
//!   from turning a data race into undefined behaviour on our side.
//!
//! Under `cfg(loom)` the same API is backed by loom atomics for synchronising
//! fields and by `loom::cell::UnsafeCell` for data fields, so the loom models
//! run the real queue code and loom reports any data-field access that is not
//! ordered by the synchronising fields: exactly the "device reads a descriptor
//! before it was published" bug.

#[cfg(not(loom))]
pub use core::sync::atomic::Ordering;
#[cfg(loom)]
pub use loom::sync::atomic::Ordering;

/// 64 bytes of shared memory, cache-line aligned: the unit a ring area is made of.
///
/// A ring area must start on a 16-byte boundary (descriptor alignment); using
/// whole cache lines also keeps the driver-written and device-written areas of
/// a [`RingLayout`](crate::layout::RingLayout) on separate lines.
#[repr(C, align(64))]
pub struct SharedLine {
    #[cfg(not(loom))]
    words: [core::sync::atomic::AtomicU32; 16],
    #[cfg(loom)]
    sync: [loom::sync::atomic::AtomicU16; 32],
    #[cfg(loom)]
    data: [loom::cell::UnsafeCell<u16>; 32],
}

// SAFETY: under loom the data cells are only accessed through loom's
// `UnsafeCell::with`/`with_mut`, which loom checks for races; sharing the line
// between loom threads is what the models are for.
#[cfg(loom)]
unsafe impl Sync for SharedLine {}

impl SharedLine {
    /// Bytes of device-visible memory one line stands for (its size, except
    /// under loom, where a line carries loom's bookkeeping as well).
    pub const BYTES: usize = 64;

    /// A zeroed line, for initialising arrays: `[SharedLine::ZERO; N]`.
    #[cfg(not(loom))]
    #[allow(clippy::declare_interior_mutable_const)]
    pub const ZERO: SharedLine = SharedLine { words: [const { core::sync::atomic::AtomicU32::new(0) }; 16] };

    /// A zeroed line.
    pub fn new() -> Self {
        #[cfg(not(loom))]
        {
            SharedLine::ZERO
        }
        #[cfg(loom)]
        {
            SharedLine {
                sync: core::array::from_fn(|_| loom::sync::atomic::AtomicU16::new(0)),
                data: core::array::from_fn(|_| loom::cell::UnsafeCell::new(0)),
            }
        }
    }
}

#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<SharedLine>() == SharedLine::BYTES);

impl Default for SharedLine {
    fn default() -> Self {
        Self::new()
    }
}

/// A window of memory that the device can see, starting on a 16-byte boundary.
///
/// `SharedMemory` is a copyable view: the driver queue, the device model of
/// a test and an indirect-table allocator may all hold one over the same
/// memory. It never hands out references to the bytes, only atomic accesses.
#[derive(Clone, Copy)]
pub struct SharedMemory<'a> {
    #[cfg(not(loom))]
    base: core::ptr::NonNull<u8>,
    #[cfg(not(loom))]
    _lines: core::marker::PhantomData<&'a [SharedLine]>,
    #[cfg(loom)]
    lines: &'a [SharedLine],
    #[cfg(loom)]
    start: usize,
    len: usize,
}

// SAFETY: every access through `SharedMemory` is atomic (or, under loom, checked
// by loom), so sharing and sending the view between threads cannot create a
// data race on the Rust side.
unsafe impl Send for SharedMemory<'_> {}
// SAFETY: as for `Send`.
unsafe impl Sync for SharedMemory<'_> {}

impl core::fmt::Debug for SharedMemory<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SharedMemory").field("len", &self.len).finish_non_exhaustive()
    }
}

impl<'a> SharedMemory<'a> {
    /// Shared memory made of whole lines: always valid and aligned.
    pub fn new(lines: &'a [SharedLine]) -> Self {
        let len = lines.len() * SharedLine::BYTES;
        #[cfg(not(loom))]
        {
            SharedMemory { base: core::ptr::NonNull::from(lines).cast::<u8>(), _lines: core::marker::PhantomData, len }
        }
        #[cfg(loom)]
        {
            SharedMemory { lines, start: 0, len }
        }
    }

    /// Shared memory at a raw address, such as an `mmap` of memory registered
    /// with the device. Returns `None` if `base` is not 16-byte aligned.
    ///
    /// # Safety
    ///
    /// For `'a`, the `len` bytes at `base` must stay mapped, readable and
    /// writable, and must not be accessed by this process other than through
    /// `SharedMemory` views or other atomic operations (the device, another
    /// process, may access them in any way).
    #[cfg(not(loom))]
    pub unsafe fn from_raw_parts(base: core::ptr::NonNull<u8>, len: usize) -> Option<Self> {
        if (base.as_ptr() as usize) % 16 != 0 {
            return None;
        }
        Some(SharedMemory { base, _lines: core::marker::PhantomData, len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The process address of the first byte (what a transport translates to a
    /// device address).
    #[cfg(not(loom))]
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// The sub-window `[offset, offset + len)`, or `None` if it is out of
    /// bounds or `offset` is not a multiple of 16.
    pub fn slice(&self, offset: usize, len: usize) -> Option<SharedMemory<'a>> {
        let end = offset.checked_add(len)?;
        if end > self.len || offset % 16 != 0 {
            return None;
        }
        #[cfg(not(loom))]
        {
            // SAFETY: `offset <= self.len`, so the result stays inside (or one
            // past the end of) the memory `self` covers.
            let base = unsafe { self.base.add(offset) };
            Some(SharedMemory { base, _lines: core::marker::PhantomData, len })
        }
        #[cfg(loom)]
        {
            Some(SharedMemory { lines: self.lines, start: self.start + offset, len })
        }
    }

    /// Copies `bytes` into the window at `offset` with relaxed atomic stores:
    /// the bytes up to the first 8-byte boundary and after the last one one at
    /// a time, the aligned middle a word at a time (`AtomicU64`, or `AtomicU32`
    /// on targets without 64-bit atomics). `false` if out of bounds (nothing is
    /// written then). For request headers and data buffers of device crates,
    /// and for tests and fuzzing that play a device scribbling over memory.
    ///
    /// Each byte is written exactly once by an atomic store, so a device that
    /// reads or writes the same bytes at the same time sees some mix of old
    /// and new bytes, never undefined behaviour on our side.
    #[cfg(not(loom))]
    pub fn write_bytes(&self, offset: usize, bytes: &[u8]) -> bool {
        let Some(end) = offset.checked_add(bytes.len()) else { return false };
        if end > self.len {
            return false;
        }
        // SAFETY: `offset <= end <= self.len`: inside the window or one past its end.
        let dst = unsafe { self.base.as_ptr().add(offset) };
        let Some((head, words, tail)) = split_for_words(dst.addr(), bytes) else { return false };
        let mut p = dst;
        for &b in head {
            // SAFETY: `p` walks `dst .. dst + bytes.len()`, inside the window
            // (checked above); a byte has no alignment requirement; the window's
            // memory is only accessed atomically (module docs), as `from_ptr` requires.
            unsafe {
                core::sync::atomic::AtomicU8::from_ptr(p).store(b, Ordering::Relaxed);
                p = p.add(1);
            }
        }
        for w in words.chunks_exact(word::BYTES) {
            let mut v = [0u8; word::BYTES];
            v.copy_from_slice(w);
            // SAFETY: as above, and `p` is now word-aligned (`split_for_words`
            // put the head's end on a word boundary) with `word::BYTES` bytes of
            // the window left at it.
            unsafe {
                word::Atomic::from_ptr(p.cast()).store(word::Int::from_ne_bytes(v), Ordering::Relaxed);
                p = p.add(word::BYTES);
            }
        }
        for &b in tail {
            // SAFETY: as for the head bytes.
            unsafe {
                core::sync::atomic::AtomicU8::from_ptr(p).store(b, Ordering::Relaxed);
                p = p.add(1);
            }
        }
        true
    }

    /// Copies bytes out of the window at `offset` into `out`, with relaxed
    /// atomic loads of the same shape as [`SharedMemory::write_bytes`];
    /// `false` if out of bounds (`out` is untouched then).
    #[cfg(not(loom))]
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) -> bool {
        let Some(end) = offset.checked_add(out.len()) else { return false };
        if end > self.len {
            return false;
        }
        // SAFETY: `offset <= end <= self.len`: inside the window or one past its end.
        let src = unsafe { self.base.as_ptr().add(offset) };
        let Some((head, words, tail)) = split_for_words_mut(src.addr(), out) else { return false };
        let mut p = src;
        for b in head {
            // SAFETY: as in `write_bytes`.
            unsafe {
                *b = core::sync::atomic::AtomicU8::from_ptr(p).load(Ordering::Relaxed);
                p = p.add(1);
            }
        }
        for w in words.chunks_exact_mut(word::BYTES) {
            // SAFETY: as in `write_bytes`: `p` is word-aligned with a word of the
            // window at it.
            let v = unsafe { word::Atomic::from_ptr(p.cast()).load(Ordering::Relaxed) };
            w.copy_from_slice(&v.to_ne_bytes());
            // SAFETY: stays inside the window or one past its end.
            p = unsafe { p.add(word::BYTES) };
        }
        for b in tail {
            // SAFETY: as in `write_bytes`.
            unsafe {
                *b = core::sync::atomic::AtomicU8::from_ptr(p).load(Ordering::Relaxed);
                p = p.add(1);
            }
        }
        true
    }
}

/// The word of [`SharedMemory::read_bytes`] and [`SharedMemory::write_bytes`]:
/// the widest atomic the target has, up to 64 bits.
#[cfg(not(loom))]
mod word {
    #[cfg(target_has_atomic = "64")]
    pub type Atomic = core::sync::atomic::AtomicU64;
    #[cfg(target_has_atomic = "64")]
    pub type Int = u64;
    #[cfg(not(target_has_atomic = "64"))]
    pub type Atomic = core::sync::atomic::AtomicU32;
    #[cfg(not(target_has_atomic = "64"))]
    pub type Int = u32;
    /// Bytes in a word (also its alignment).
    pub const BYTES: usize = core::mem::size_of::<Int>();
}

/// Bytes before the first word boundary at or after address `addr`, at most `len`.
#[cfg(not(loom))]
#[inline(always)]
fn head_len(addr: usize, len: usize) -> usize {
    (addr.wrapping_neg() % word::BYTES).min(len)
}

/// Splits `bytes`, to be copied to or from address `addr`, into the head
/// before the first word boundary, whole words, and the tail. Never `None`
/// (every split point is within the slice); an `Option` keeps it panic-free.
#[cfg(not(loom))]
#[inline(always)]
fn split_for_words(addr: usize, bytes: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let h = head_len(addr, bytes.len());
    let (head, rest) = bytes.split_at_checked(h)?;
    let (words, tail) = rest.split_at_checked(rest.len() - rest.len() % word::BYTES)?;
    Some((head, words, tail))
}

/// [`split_for_words`] of a mutable slice.
#[cfg(not(loom))]
#[inline(always)]
fn split_for_words_mut(addr: usize, bytes: &mut [u8]) -> Option<(&mut [u8], &mut [u8], &mut [u8])> {
    let h = head_len(addr, bytes.len());
    let (head, rest) = bytes.split_at_mut_checked(h)?;
    let n = rest.len() - rest.len() % word::BYTES;
    let (words, tail) = rest.split_at_mut_checked(n)?;
    Some((head, words, tail))
}

impl SharedMemory<'_> {
    /// Writes the little-endian 64-bit word `v` at `offset` with one relaxed
    /// atomic store (a data field: order it with a synchronising field).
    /// `false`, and nothing written, if `offset` is not a multiple of 8 or
    /// the word is not inside the window. For device crates that fill
    /// request headers in place.
    #[inline]
    pub fn write_le_u64(&self, offset: usize, v: u64) -> bool {
        if offset % 8 != 0 || offset.checked_add(8).is_none_or(|end| end > self.len) {
            return false;
        }
        // SAFETY: 8-aligned (the window starts on a 16-byte boundary) and
        // inside the window, checked above.
        unsafe { self.write_u64(offset, v) };
        true
    }

    /// Reads the little-endian 64-bit word at `offset` with one relaxed atomic
    /// load; `None` if `offset` is not a multiple of 8 or the word is not
    /// inside the window.
    #[inline]
    pub fn read_le_u64(&self, offset: usize) -> Option<u64> {
        if offset % 8 != 0 || offset.checked_add(8).is_none_or(|end| end > self.len) {
            return None;
        }
        // SAFETY: as in `write_le_u64`.
        Some(unsafe { self.read_u64(offset) })
    }

    /// [`write_le_u64`](Self::write_le_u64) without its checks, for a device
    /// crate whose own invariants place the word (a request id below the
    /// queue size in an array sized for the queue).
    ///
    /// # Safety
    ///
    /// `offset` is a multiple of 8 and `offset + 8 <= self.len()`.
    #[inline(always)]
    pub unsafe fn write_le_u64_unchecked(&self, offset: usize, v: u64) {
        // SAFETY: the caller's promise: 8-aligned (the window starts on a
        // 16-byte boundary) and inside the window.
        unsafe { self.write_u64(offset, v) };
    }

    /// [`read_le_u64`](Self::read_le_u64) without its checks (see
    /// [`write_le_u64_unchecked`](Self::write_le_u64_unchecked)).
    ///
    /// # Safety
    ///
    /// `offset` is a multiple of 8 and `offset + 8 <= self.len()`.
    #[inline(always)]
    pub unsafe fn read_le_u64_unchecked(&self, offset: usize) -> u64 {
        // SAFETY: as in `write_le_u64_unchecked`.
        unsafe { self.read_u64(offset) }
    }

    /// Zeroes the whole window (both field kinds under loom). Only done while
    /// the device does not yet know the memory.
    pub(crate) fn zero(&self) {
        let mut off = 0;
        while off + 2 <= self.len {
            // SAFETY: `off` is even and `off + 2 <= len`.
            unsafe {
                self.store_u16(off, 0, Ordering::Relaxed);
                #[cfg(loom)]
                self.write_u16(off, 0);
            }
            off += 2;
        }
    }
}

/// Generates the accessor pairs. Every accessor has the same contract:
///
/// # Safety
///
/// `off` is a multiple of the field's width and `off + width <= self.len()`.
/// Callers derive `off` from a [`RingLayout`](crate::layout::RingLayout) that
/// was checked against `len()` when the queue was built, and from indices that
/// are below the queue size.
#[cfg(not(loom))]
mod imp {
    use super::*;
    use core::sync::atomic::{AtomicU16, AtomicU32};

    impl SharedMemory<'_> {
        #[inline(always)]
        unsafe fn at16(&self, off: usize) -> &AtomicU16 {
            // SAFETY: the caller keeps `off` inside the window and 2-aligned, the
            // window's base is 16-aligned, and the memory is only ever accessed
            // atomically (module docs), as `from_ptr` requires.
            unsafe { AtomicU16::from_ptr(self.base.as_ptr().add(off).cast()) }
        }

        #[inline(always)]
        unsafe fn at32(&self, off: usize) -> &AtomicU32 {
            // SAFETY: as in `at16`, with 4-byte alignment.
            unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(off).cast()) }
        }

        /// Loads a synchronising 16-bit field.
        #[inline(always)]
        pub(crate) unsafe fn load_u16(&self, off: usize, order: Ordering) -> u16 {
            // SAFETY: forwarded caller contract.
            u16::from_le(unsafe { self.at16(off) }.load(order))
        }

        /// Stores a synchronising 16-bit field.
        #[inline(always)]
        pub(crate) unsafe fn store_u16(&self, off: usize, v: u16, order: Ordering) {
            // SAFETY: forwarded caller contract.
            unsafe { self.at16(off) }.store(v.to_le(), order)
        }

        /// Reads a 16-bit data field.
        #[inline(always)]
        pub(crate) unsafe fn read_u16(&self, off: usize) -> u16 {
            // SAFETY: forwarded caller contract.
            u16::from_le(unsafe { self.at16(off) }.load(Ordering::Relaxed))
        }

        /// Writes a 16-bit data field.
        #[inline(always)]
        pub(crate) unsafe fn write_u16(&self, off: usize, v: u16) {
            // SAFETY: forwarded caller contract.
            unsafe { self.at16(off) }.store(v.to_le(), Ordering::Relaxed)
        }

        /// Reads a 32-bit data field.
        #[inline(always)]
        pub(crate) unsafe fn read_u32(&self, off: usize) -> u32 {
            // SAFETY: forwarded caller contract.
            u32::from_le(unsafe { self.at32(off) }.load(Ordering::Relaxed))
        }

        /// Writes a 32-bit data field.
        #[inline(always)]
        pub(crate) unsafe fn write_u32(&self, off: usize, v: u32) {
            // SAFETY: forwarded caller contract.
            unsafe { self.at32(off) }.store(v.to_le(), Ordering::Relaxed)
        }

        /// Writes the last 8 bytes of a packed descriptor: `len` and `id`
        /// (data) and `flags` (synchronising, stored relaxed), in one store
        /// where the target has 64-bit atomics. Only for descriptors whose
        /// flags are ordered by a later release store (non-head descriptors).
        #[inline(always)]
        pub(crate) unsafe fn write_u32_u16_flags(&self, off: usize, len: u32, id: u16, flags: u16) {
            #[cfg(target_has_atomic = "64")]
            // SAFETY: forwarded caller contract (8-aligned, 8 bytes inside the window).
            unsafe {
                self.write_u64(off, u64::from(len) | u64::from(id) << 32 | u64::from(flags) << 48)
            }
            #[cfg(not(target_has_atomic = "64"))]
            // SAFETY: forwarded caller contract.
            unsafe {
                self.write_u32(off, len);
                self.write_u16(off + 4, id);
                self.store_u16(off + 6, flags, Ordering::Relaxed);
            }
        }

        /// Reads a 64-bit data field.
        #[inline(always)]
        pub(crate) unsafe fn read_u64(&self, off: usize) -> u64 {
            #[cfg(target_has_atomic = "64")]
            {
                // SAFETY: forwarded caller contract (8-aligned, inside the window).
                let a = unsafe { core::sync::atomic::AtomicU64::from_ptr(self.base.as_ptr().add(off).cast()) };
                u64::from_le(a.load(Ordering::Relaxed))
            }
            #[cfg(not(target_has_atomic = "64"))]
            {
                // SAFETY: forwarded caller contract; both halves are inside the field.
                let (lo, hi) = unsafe { (self.read_u32(off), self.read_u32(off + 4)) };
                u64::from(lo) | (u64::from(hi) << 32)
            }
        }

        /// Writes a 64-bit data field (as two halves where the target has no
        /// 64-bit atomics; the field is ordered by a synchronising field anyway).
        #[inline(always)]
        pub(crate) unsafe fn write_u64(&self, off: usize, v: u64) {
            #[cfg(target_has_atomic = "64")]
            {
                // SAFETY: forwarded caller contract (8-aligned, inside the window).
                let a = unsafe { core::sync::atomic::AtomicU64::from_ptr(self.base.as_ptr().add(off).cast()) };
                a.store(v.to_le(), Ordering::Relaxed)
            }
            #[cfg(not(target_has_atomic = "64"))]
            {
                // SAFETY: forwarded caller contract; both halves are inside the field.
                unsafe {
                    self.write_u32(off, v as u32);
                    self.write_u32(off + 4, (v >> 32) as u32);
                }
            }
        }
    }
}

// Loom builds are test-only; an out-of-range index there is a test bug and
// loom reports the panic.
#[cfg(loom)]
#[allow(clippy::indexing_slicing)]
mod imp {
    use super::*;

    impl SharedMemory<'_> {
        fn slot(&self, off: usize) -> (&SharedLine, usize) {
            let abs = self.start + off;
            (&self.lines[abs / 64], (abs % 64) / 2)
        }

        pub(crate) unsafe fn load_u16(&self, off: usize, order: Ordering) -> u16 {
            let (l, i) = self.slot(off);
            l.sync[i].load(order)
        }

        pub(crate) unsafe fn store_u16(&self, off: usize, v: u16, order: Ordering) {
            let (l, i) = self.slot(off);
            l.sync[i].store(v, order)
        }

        pub(crate) unsafe fn read_u16(&self, off: usize) -> u16 {
            let (l, i) = self.slot(off);
            // SAFETY: loom checks that this read does not race with a write.
            l.data[i].with(|p| unsafe { *p })
        }

        pub(crate) unsafe fn write_u16(&self, off: usize, v: u16) {
            let (l, i) = self.slot(off);
            // SAFETY: loom checks that this write does not race with another access.
            l.data[i].with_mut(|p| unsafe { *p = v })
        }

        pub(crate) unsafe fn read_u32(&self, off: usize) -> u32 {
            // SAFETY: forwarded caller contract.
            unsafe { u32::from(self.read_u16(off)) | (u32::from(self.read_u16(off + 2)) << 16) }
        }

        pub(crate) unsafe fn write_u32(&self, off: usize, v: u32) {
            // SAFETY: forwarded caller contract.
            unsafe {
                self.write_u16(off, v as u16);
                self.write_u16(off + 2, (v >> 16) as u16);
            }
        }

        pub(crate) unsafe fn read_u64(&self, off: usize) -> u64 {
            // SAFETY: forwarded caller contract.
            unsafe { u64::from(self.read_u32(off)) | (u64::from(self.read_u32(off + 4)) << 32) }
        }

        pub(crate) unsafe fn write_u64(&self, off: usize, v: u64) {
            // SAFETY: forwarded caller contract.
            unsafe {
                self.write_u32(off, v as u32);
                self.write_u32(off + 4, (v >> 32) as u32);
            }
        }

        pub(crate) unsafe fn write_u32_u16_flags(&self, off: usize, len: u32, id: u16, flags: u16) {
            // SAFETY: forwarded caller contract.
            unsafe {
                self.write_u32(off, len);
                self.write_u16(off + 4, id);
                self.store_u16(off + 6, flags, Ordering::Relaxed);
            }
        }
    }
}

/// Full fence between a store that tells the other side something (a new avail
/// index, a new `used_event`, a re-enabled notification flag) and the load that
/// reads what the other side told us (its event index or flags, or the used
/// index). Without it the two sides can each miss the other's store (the
/// store-buffering pattern) and a kick or a used-buffer notification is lost;
/// release/acquire does not order a store before a later load.
#[inline(always)]
pub(crate) fn fence_store_before_load() {
    #[cfg(not(loom))]
    core::sync::atomic::fence(Ordering::SeqCst);
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A pattern byte that differs at every position of a few lines.
    fn pat(i: usize, salt: u8) -> u8 {
        (i as u8).wrapping_mul(31).wrapping_add(salt)
    }

    #[test]
    fn byte_copies_at_every_head_and_tail_alignment() {
        let lines = [const { SharedLine::ZERO }; 1];
        let m = SharedMemory::new(&lines);
        // Every start alignment within two words and every length up to
        // three words plus one, so heads, tails, no words and several words
        // all occur, as do copies that end exactly on a boundary. (One line
        // of memory, checked whole each time: small enough for Miri.)
        for offset in 0..16 {
            for len in 0..=25 {
                let mut init = [0u8; 64];
                for (i, b) in init.iter_mut().enumerate() {
                    *b = pat(i, 1);
                }
                assert!(m.write_bytes(0, &init));
                let data: Vec<u8> = (0..len).map(|i| pat(i, 77)).collect();
                assert!(m.write_bytes(offset, &data), "write {offset}+{len}");
                let mut all = [0u8; 64];
                assert!(m.read_bytes(0, &mut all));
                for (i, &b) in all.iter().enumerate() {
                    let want = if (offset..offset + len).contains(&i) { pat(i - offset, 77) } else { pat(i, 1) };
                    assert_eq!(b, want, "byte {i} after writing {len} bytes at {offset}");
                }
                // Read back at the same place, and into a misaligned buffer.
                let mut back = vec![0xeeu8; len + 3];
                assert!(m.read_bytes(offset, &mut back[3..]), "read {offset}+{len}");
                assert_eq!(&back[3..], &data[..]);
                assert_eq!(&back[..3], &[0xee; 3]);
            }
        }
    }

    #[test]
    fn byte_copies_from_and_to_misaligned_slices() {
        let lines = [const { SharedLine::ZERO }; 2];
        let m = SharedMemory::new(&lines);
        let src: Vec<u8> = (0..64).map(|i| pat(i, 5)).collect();
        for skew in 0..8 {
            assert!(m.write_bytes(8, &src[skew..skew + 40]));
            let mut out = [0u8; 48];
            assert!(m.read_bytes(8, &mut out[skew..skew + 40]));
            assert_eq!(&out[skew..skew + 40], &src[skew..skew + 40]);
        }
    }

    #[test]
    fn words_are_little_endian_aligned_and_bounded() {
        let lines = [const { SharedLine::ZERO }; 1];
        let m = SharedMemory::new(&lines);
        assert!(m.write_le_u64(8, 0x0102_0304_0506_0708));
        let mut b = [0u8; 8];
        assert!(m.read_bytes(8, &mut b));
        assert_eq!(b, [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(m.read_le_u64(8), Some(0x0102_0304_0506_0708));
        assert!(m.write_bytes(56, &[0xff, 1]));
        assert_eq!(m.read_le_u64(56), Some(0x01ff));
        for bad in [4, 60, 64, usize::MAX - 7] {
            assert!(!m.write_le_u64(bad, 1), "{bad}");
            assert_eq!(m.read_le_u64(bad), None, "{bad}");
        }
        assert_eq!(m.read_le_u64(0), Some(0), "nothing written by the refused stores");
        // The unchecked accessors are the same words (the last one of the window included).
        // SAFETY: offsets 8-aligned with the word inside the 64-byte window.
        unsafe {
            m.write_le_u64_unchecked(56, 0x1122_3344_5566_7788);
            assert_eq!(m.read_le_u64_unchecked(8), 0x0102_0304_0506_0708);
        }
        let mut b = [0u8; 8];
        assert!(m.read_bytes(56, &mut b));
        assert_eq!(b, [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
    }

    #[test]
    fn byte_copies_out_of_bounds_touch_nothing() {
        let lines = [const { SharedLine::ZERO }; 1];
        let m = SharedMemory::new(&lines);
        assert!(!m.write_bytes(60, &[1; 5]));
        assert!(!m.write_bytes(usize::MAX, &[1]));
        assert!(m.write_bytes(64, &[]));
        assert!(m.write_bytes(59, &[2; 5]));
        let mut out = [9u8; 5];
        assert!(!m.read_bytes(61, &mut out));
        assert_eq!(out, [9; 5]);
        assert!(!m.read_bytes(usize::MAX, &mut out[..1]));
        let mut all = [9u8; 64];
        assert!(m.read_bytes(0, &mut all));
        assert!(all[..59].iter().all(|&b| b == 0));
        assert_eq!(&all[59..], &[2; 5]);
        // A sub-window copies relative to its own start and stays inside it.
        let sub = m.slice(16, 32).unwrap();
        assert!(!sub.write_bytes(30, &[3; 3]));
        assert!(sub.write_bytes(29, &[3; 3]));
        assert!(m.read_bytes(0, &mut all));
        assert_eq!(&all[45..48], &[3; 3]);
        assert_eq!(all[48], 0);
    }
}
