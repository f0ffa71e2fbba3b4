//! The shared, file-backed memory check of [`crate::VdpaTransport::map_memory`].
//!
//! In VA mode (`use_va=1`: `vdpa_sim` with `use_va=1`, VDUSE) the kernel's
//! `vhost_vdpa_va_map` walks the process's VMAs over an IOTLB update and
//! **silently skips** every VMA that is not a `MAP_SHARED` mapping of a file
//! (anonymous memory, private mappings): the update succeeds and the device
//! sees nothing there. So before mapping caller memory this module reads
//! `/proc/self/maps` (at map time, never on the I/O path) and refuses any
//! range that is not wholly shared and file-backed, naming what it found.

use std::os::fd::{AsRawFd, BorrowedFd};

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Vma {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// The `s` of `rw-s`: `MAP_SHARED`.
    pub shared: bool,
    /// File offset of `start`.
    pub offset: u64,
    /// Device of the backing file (`major`, `minor`); `(0, 0)` for anonymous memory.
    pub dev: (u32, u32),
    /// Inode of the backing file; 0 for anonymous memory.
    pub inode: u64,
    /// The path column (`/memfd:name (deleted)`, `[heap]`, empty ...).
    pub path: String,
}

impl Vma {
    /// Parses one line: `start-end perms offset major:minor inode [path]`.
    pub(crate) fn parse(line: &str) -> Option<Vma> {
        let mut fields = line.splitn(6, ' ');
        let (start, end) = fields.next()?.split_once('-')?;
        let perms = fields.next()?.as_bytes();
        let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
        let (major, minor) = fields.next()?.split_once(':')?;
        let inode = fields.next()?.parse().ok()?;
        Some(Vma {
            start: usize::from_str_radix(start, 16).ok()?,
            end: usize::from_str_radix(end, 16).ok()?,
            shared: *perms.get(3)? == b's',
            offset,
            dev: (u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?),
            inode,
            path: fields.next().unwrap_or("").trim_start().to_string(),
        })
    }

    /// Whether the kernel's VA-mode IOTLB update maps this VMA: shared and
    /// backed by a file.
    fn is_shared_file(&self) -> bool {
        self.shared && self.inode != 0
    }

    /// What this VMA is, for the refusal message.
    fn describe(&self) -> String {
        let what = if self.path.is_empty() { "anonymous memory".to_string() } else { self.path.clone() };
        match (self.inode != 0, self.shared) {
            (false, _) => format!("is anonymous ({what}, {:#x}..{:#x})", self.start, self.end),
            (true, false) => format!("is a private mapping of {what} ({:#x}..{:#x})", self.start, self.end),
            (true, true) => format!("is a shared mapping of {what}"),
        }
    }
}

/// The identity of the file behind a descriptor (what `/proc/self/maps` shows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileId {
    pub dev: (u32, u32),
    pub inode: u64,
}

impl FileId {
    /// `fstat(fd)`.
    pub(crate) fn of(fd: BorrowedFd<'_>) -> std::io::Result<FileId> {
        // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open for the borrow; `st` is a live, writable stat.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(FileId { dev: (libc::major(st.st_dev), libc::minor(st.st_dev)), inode: st.st_ino })
    }
}

/// Checks that `start .. end` (page aligned) is covered, without gaps, by
/// shared mappings of a file, and, when `expect` is given, that the file is
/// that one and `start` lies at file offset `offset`. `maps` is the text of
/// `/proc/self/maps`. The error is the reason, in words.
pub(crate) fn check_shared_file_backed(
    maps: &str,
    start: usize,
    end: usize,
    expect: Option<(FileId, u64)>,
) -> Result<(), String> {
    let need = "vhost-vdpa needs shared, file-backed memory (memfd)";
    let mut at = start;
    for vma in maps.lines().filter_map(Vma::parse) {
        if at >= end {
            break;
        }
        if vma.end <= at {
            continue;
        }
        if vma.start > at {
            return Err(format!("{need}: {at:#x}..{:#x} is not mapped", vma.start.min(end)));
        }
        if !vma.is_shared_file() {
            return Err(format!("{need}: {at:#x} {}", vma.describe()));
        }
        if let Some((file, offset)) = expect {
            if vma.dev != file.dev || vma.inode != file.inode {
                return Err(format!(
                    "{at:#x} is a shared mapping of {} (inode {}), not of the descriptor given (inode {})",
                    vma.path, vma.inode, file.inode
                ));
            }
            let here = vma.offset + (at - vma.start) as u64;
            let want = offset + (at - start) as u64;
            if here != want {
                return Err(format!("{at:#x} maps file offset {here:#x}, not {want:#x} as given"));
            }
        }
        at = vma.end;
    }
    if at < end {
        return Err(format!("{need}: {at:#x}..{end:#x} is not mapped"));
    }
    Ok(())
}

/// [`check_shared_file_backed`] against this process's current mappings.
pub(crate) fn check_own_memory(start: usize, end: usize, expect: Option<(FileId, u64)>) -> Result<(), String> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("/proc/self/maps: {e}"))?;
    check_shared_file_backed(&maps, start, end, expect)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use virtio_transport_api::memfd::page_size;
    use virtio_transport_api::MemFd;

    const MAPS: &str = "\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon
00e03000-00e24000 rw-p 00000000 00:00 0           [heap]
7f0000000000-7f0000004000 rw-s 00000000 00:01 4242 /memfd:uvirtio-dma (deleted)
7f0000004000-7f0000008000 rw-s 00004000 00:01 4242 /memfd:uvirtio-dma (deleted)
7f0000008000-7f000000a000 rw-p 00000000 00:00 0
7f000000a000-7f000000b000 rw-p 00001000 08:02 99 /tmp/private file
7f000000c000-7f000000d000 rw-s 00000000 00:01 4243 /memfd:other (deleted)
";

    #[test]
    fn parses_the_maps_columns() {
        let v = Vma::parse("7f0000000000-7f0000004000 rw-s 00001000 fd:0a 4242 /memfd:x (deleted)").unwrap();
        assert_eq!((v.start, v.end, v.shared, v.offset), (0x7f00_0000_0000, 0x7f00_0000_4000, true, 0x1000));
        assert_eq!((v.dev, v.inode, v.path.as_str()), ((0xfd, 0x0a), 4242, "/memfd:x (deleted)"));
        let v = Vma::parse("7f0000008000-7f000000a000 rw-p 00000000 00:00 0").unwrap();
        assert!(!v.shared && v.inode == 0 && v.path.is_empty());
        // Spaces inside the path survive.
        assert_eq!(Vma::parse(MAPS.lines().nth(5).unwrap()).unwrap().path, "/tmp/private file");
        assert_eq!(Vma::parse("garbage"), None);
        assert_eq!(Vma::parse(""), None);
    }

    #[test]
    fn shared_file_ranges_pass_across_vmas() {
        let file = FileId { dev: (0, 1), inode: 4242 };
        check_shared_file_backed(MAPS, 0x7f00_0000_0000, 0x7f00_0000_8000, None).unwrap();
        check_shared_file_backed(MAPS, 0x7f00_0000_1000, 0x7f00_0000_6000, Some((file, 0x1000))).unwrap();
    }

    #[test]
    fn anonymous_private_and_gaps_are_refused_with_the_reason() {
        let e = check_shared_file_backed(MAPS, 0x7f00_0000_6000, 0x7f00_0000_9000, None).unwrap_err();
        assert!(
            e.starts_with("vhost-vdpa needs shared, file-backed memory (memfd): 0x7f0000008000 is anonymous"),
            "{e}"
        );
        let e = check_shared_file_backed(MAPS, 0xe03000, 0xe04000, None).unwrap_err();
        assert!(e.contains("is anonymous ([heap]"), "{e}");
        let e = check_shared_file_backed(MAPS, 0x7f00_0000_a000, 0x7f00_0000_b000, None).unwrap_err();
        assert!(e.contains("is a private mapping of /tmp/private file"), "{e}");
        let e = check_shared_file_backed(MAPS, 0x7f00_0000_b000, 0x7f00_0000_d000, None).unwrap_err();
        assert!(e.contains("0x7f000000b000..0x7f000000c000 is not mapped"), "{e}");
        let e = check_shared_file_backed(MAPS, 0x7f00_0000_c000, 0x7f00_0000_e000, None).unwrap_err();
        assert!(e.contains("0x7f000000d000..0x7f000000e000 is not mapped"), "{e}");
    }

    #[test]
    fn the_wrong_file_or_offset_is_refused() {
        let other = FileId { dev: (0, 1), inode: 4243 };
        let e = check_shared_file_backed(MAPS, 0x7f00_0000_0000, 0x7f00_0000_1000, Some((other, 0))).unwrap_err();
        assert!(e.contains("not of the descriptor given"), "{e}");
        let file = FileId { dev: (0, 1), inode: 4242 };
        let e = check_shared_file_backed(MAPS, 0x7f00_0000_4000, 0x7f00_0000_5000, Some((file, 0))).unwrap_err();
        assert!(e.contains("maps file offset 0x4000, not 0x0"), "{e}");
    }

    #[test]
    fn live_memfd_is_accepted_and_anonymous_memory_refused() {
        let page = page_size();
        let m = MemFd::new("maps-test", 3 * page).unwrap();
        let start = m.as_ptr() as usize;
        let id = FileId::of(m.as_fd()).unwrap();
        check_own_memory(start, start + m.len(), Some((id, 0))).unwrap();
        check_own_memory(start + page, start + 2 * page, Some((id, page as u64))).unwrap();

        // SAFETY: a new private anonymous mapping, unmapped below; nothing else is touched.
        let anon = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(anon, libc::MAP_FAILED);
        let a = anon as usize;
        let e = check_own_memory(a, a + page, None).unwrap_err();
        assert!(e.contains("vhost-vdpa needs shared, file-backed memory (memfd)") && e.contains("is anonymous"), "{e}");
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(anon, page) };
    }

    #[test]
    fn live_private_file_mapping_is_refused() {
        let page = page_size();
        let f = tempfile::tempfile().unwrap();
        f.set_len(page as u64).unwrap();
        // SAFETY: a new private mapping of our temp file, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let e = check_own_memory(p as usize, p as usize + page, None).unwrap_err();
        assert!(e.contains("is a private mapping of"), "{e}");
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, page) };
    }
}
