//! Shared, file-backed memory: `memfd_create` + `ftruncate` + `mmap(MAP_SHARED)`.
//!
//! vhost-user backends (and vhost-vdpa) can only see memory that is shared and
//! file-backed; a transport hands the descriptor to the backend, which maps the
//! same pages.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory arguments.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// An anonymous memory file mapped shared into this process; unmapped and
/// closed on drop.
#[derive(Debug)]
pub struct MemFd {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `MemFd` owns a mapping and a descriptor; neither is tied to a thread.
// It hands out only a raw pointer, whose use is the caller's responsibility.
unsafe impl Send for MemFd {}
// SAFETY: as for `Send`; no method mutates through `&self`.
unsafe impl Sync for MemFd {}

impl MemFd {
    /// A zero-filled memory file of at least `len` bytes (rounded up to whole
    /// pages), mapped read-write and shared. `name` shows in `/proc/PID/fd`.
    pub fn new(name: &str, len: usize) -> std::io::Result<Self> {
        if len == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "memfd of zero bytes"));
        }
        let page = page_size();
        let len = len
            .checked_next_multiple_of(page)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "memfd length overflows"))?;
        let cname = CString::new(name.replace('\0', "_"))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `cname` is a live NUL-terminated string; the result is checked.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "memfd length overflows off_t"))?;
        // SAFETY: plain system call on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of `len` bytes of our file at a place the
        // kernel chooses; nothing else is affected. The result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(MemFd { fd, ptr, len })
    }

    /// The first byte of the mapping (page-aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The first byte of the mapping, non-null.
    pub fn as_non_null(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Bytes mapped (a whole number of pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: a `MemFd` has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory file's descriptor, to hand to a backend.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for MemFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for MemFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for MemFd {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with this address and length and
        // is unmapped only here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_to_pages_and_is_aligned() {
        let m = MemFd::new("test", 10).unwrap();
        assert_eq!(m.len(), page_size());
        assert_eq!(m.as_ptr() as usize % page_size(), 0);
        assert!(MemFd::new("test", 0).is_err());
    }

    #[test]
    fn two_mappings_see_the_same_bytes() {
        let m = MemFd::new("two-maps", 3 * page_size() - 5).unwrap();
        // SAFETY: a second shared mapping of the same file, unmapped below.
        let other = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                m.len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                m.as_raw_fd(),
                0,
            )
        };
        assert_ne!(other, libc::MAP_FAILED);
        let other = other.cast::<u8>();
        let last = m.len() - 1;
        // SAFETY: both pointers cover `m.len()` mapped bytes; no references are formed.
        unsafe {
            assert_eq!(m.as_ptr().add(last).read_volatile(), 0);
            m.as_ptr().add(17).write_volatile(0xa5);
            other.add(last).write_volatile(0x5a);
            assert_eq!(other.add(17).read_volatile(), 0xa5);
            assert_eq!(m.as_ptr().add(last).read_volatile(), 0x5a);
            libc::munmap(other.cast(), m.len());
        }
    }
}
