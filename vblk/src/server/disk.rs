//! The server's storage: a memfd (RAM) or an image file, accessed with positioned I/O so that
//! every queue's worker thread can use it at the same time without a shared file cursor.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

pub use virtio_blk_dev::spec::SECTOR_SIZE;

/// Backing store of the device.
#[derive(Debug)]
pub(crate) struct Disk {
    file: File,
    /// Usable size in sectors (a trailing partial sector of an image is not exposed).
    sectors: u64,
    /// RAM (memfd) storage: holes can always be punched, zero ranges cannot be allocated.
    ram: bool,
}

impl Disk {
    /// Sparse RAM storage of `size` bytes: pages that were never written cost nothing.
    pub(crate) fn ram(size: u64) -> io::Result<Self> {
        let name: &CStr = c"vblk-ram";
        // SAFETY: `name` is a valid NUL-terminated string; the flags are valid for memfd_create.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        Ok(Disk { file, sectors: size / SECTOR_SIZE, ram: true })
    }

    /// An existing image file; opened read-only when `read_only` is set.
    pub(crate) fn image(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        Ok(Disk { file, sectors: meta.len() / SECTOR_SIZE, ram: false })
    }

    /// Capacity in 512-byte sectors.
    pub(crate) fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether `count` sectors starting at `sector` lie inside the disk.
    pub(crate) fn in_range(&self, sector: u64, count: u64) -> bool {
        sector.checked_add(count).is_some_and(|end| end <= self.sectors)
    }

    /// Reads `len` bytes at byte `offset` of the disk into guest memory at `addr`.
    pub(crate) fn read_to_guest<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        self.guest_io(mem, addr, len, offset, Permissions::Write, true)
    }

    /// Writes `len` bytes from guest memory at `addr` to byte `offset` of the disk.
    pub(crate) fn write_from_guest<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        self.guest_io(mem, addr, len, offset, Permissions::Read, false)
    }

    fn guest_io<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        addr: GuestAddress,
        len: usize,
        mut offset: u64,
        access: Permissions,
        to_guest: bool,
    ) -> io::Result<()> {
        let slices = mem.get_slices(addr, len, access).map_err(io::Error::other)?;
        let mut total = 0usize;
        for slice in slices {
            let slice = slice.map_err(io::Error::other)?;
            let guard = slice.ptr_guard_mut();
            let base = guard.as_ptr();
            let n = slice.len();
            let mut done = 0usize;
            while done < n {
                let pos = libc::off64_t::try_from(offset + done as u64)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
                // SAFETY: `base` points at `n` bytes of mapped guest memory that stay mapped while
                // `guard` lives; `done < n`, so the range `base + done .. base + n` is in bounds. The
                // kernel copies to or from that range; nothing in this process holds a Rust
                // reference to guest memory.
                let r = unsafe {
                    let p = base.add(done).cast::<libc::c_void>();
                    if to_guest {
                        libc::pread64(self.file.as_raw_fd(), p, n - done, pos)
                    } else {
                        libc::pwrite64(self.file.as_raw_fd(), p, n - done, pos)
                    }
                };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if r == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "image shorter than its capacity"));
                }
                done += r as usize;
            }
            if to_guest {
                slice.bitmap().mark_dirty(0, n);
            }
            offset += n as u64;
            total += n;
        }
        if total != len {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "guest buffer outside guest memory"));
        }
        Ok(())
    }

    /// Makes data written so far durable.
    pub(crate) fn flush(&self) -> io::Result<()> {
        if self.ram {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Deallocates a byte range; later reads of it return zeros.
    pub(crate) fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    /// Zeroes a byte range, deallocating it when `unmap` allows and the storage can.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap || self.ram {
            // On a memfd a hole is the cheapest zero range and there is no ZERO_RANGE.
            if self.punch_hole(offset, len).is_ok() {
                return Ok(());
            }
        }
        if self.fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len).is_ok() {
            return Ok(());
        }
        self.write_zeroes_slow(offset, len)
    }

    fn write_zeroes_slow(&self, mut offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        const CHUNK: u64 = 64 * 1024;
        let zeros = vec![0u8; CHUNK as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(CHUNK) as usize;
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let invalid = || io::Error::new(io::ErrorKind::InvalidInput, "range too large");
        let off = libc::off64_t::try_from(offset).map_err(|_| invalid())?;
        let len = libc::off64_t::try_from(len).map_err(|_| invalid())?;
        loop {
            // SAFETY: fallocate only reads its integer arguments; the fd is owned by `self.file`.
            let r = unsafe { libc::fallocate64(self.file.as_raw_fd(), mode, off, len) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
