//! Support for the tests that `cargo xtask vm-test` runs inside its QEMU guest.
//!
//! # The contract with the guest's `/init`
//!
//! `/init` sets devices up, then runs every test of the test binary whose name starts with one
//! of the current phase's prefixes, each in its own process (`--exact NAME`). It passes:
//!
//! | variable | meaning |
//! | --- | --- |
//! | `VIRTIO_TEST_PCI` | sysfs directory of the virtio-blk-pci function (`/sys/bus/pci/devices/DDDD:BB:DD.F`), bound to `vfio-pci` |
//! | `VIRTIO_TEST_PCI_FEATURES` | the 64-character feature bit string (bit 0 first) the guest kernel's virtio-blk driver negotiated before the device moved to `vfio-pci` |
//! | `VIRTIO_TEST_VDPA_SIM` | `/dev/vhost-vdpa-N` of a `vdpa_sim_blk` device, simulator in VA mode (`use_va=1`) |
//! | `VIRTIO_TEST_VDPA_SIM_PA` | the same in PA mode (`use_va=0`) |
//! | `VIRTIO_TEST_VDUSE` | `/dev/vhost-vdpa-N` of a VDUSE block device served by `qemu-storage-daemon` |
//! | `VIRTIO_TEST_REQUIRE=1` | a device a test asks for must be there: its absence fails the test |
//! | `VIRTIO_TEST_EXPECT_FAIL` | comma-separated negative controls in effect; today only `no-access-platform` (the PCI device was started with `iommu_platform=off`) |
//!
//! Test names (the top-level module inside `tests/guest/main.rs`) pick the phase: `pci::`,
//! `vdpa_sim::`, `vduse::` run with the VA-mode devices, `vdpa_sim_pa::` after the simulator
//! is reloaded with `use_va=0`, `pci_no_access_platform::` in the negative-control boot.
//!
//! On a developer machine none of the variables is set and every test returns at once
//! (printing why), so `cargo test --workspace` stays green.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u32 = 32;
/// `VIRTIO_F_ACCESS_PLATFORM`: the device's DMA goes through the platform IOMMU.
pub const F_ACCESS_PLATFORM: u32 = 33;
/// Virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// The negative control in which the PCI device lacks `VIRTIO_F_ACCESS_PLATFORM`.
pub const EXPECT_NO_ACCESS_PLATFORM: &str = "no-access-platform";

/// A device the guest may provide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk-pci with ACCESS_PLATFORM, bound to vfio-pci.
    Pci,
    /// virtio-blk-pci without ACCESS_PLATFORM (the `no-access-platform` negative control).
    PciNoAccessPlatform,
    /// `vdpa_sim_blk`, VA mode.
    VdpaSim,
    /// `vdpa_sim_blk`, PA mode.
    VdpaSimPa,
    /// VDUSE block device from `qemu-storage-daemon`.
    Vduse,
}

impl DeviceKind {
    /// The environment variable carrying the device's path.
    pub fn env_var(self) -> &'static str {
        match self {
            DeviceKind::Pci | DeviceKind::PciNoAccessPlatform => "VIRTIO_TEST_PCI",
            DeviceKind::VdpaSim => "VIRTIO_TEST_VDPA_SIM",
            DeviceKind::VdpaSimPa => "VIRTIO_TEST_VDPA_SIM_PA",
            DeviceKind::Vduse => "VIRTIO_TEST_VDUSE",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DeviceKind::Pci => "virtio-blk-pci on vfio-pci",
            DeviceKind::PciNoAccessPlatform => "virtio-blk-pci without ACCESS_PLATFORM",
            DeviceKind::VdpaSim => "vdpa_sim_blk (use_va=1)",
            DeviceKind::VdpaSimPa => "vdpa_sim_blk (use_va=0)",
            DeviceKind::Vduse => "VDUSE (qemu-storage-daemon)",
        };
        f.write_str(name)
    }
}

/// A non-empty environment variable.
fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Whether `VIRTIO_TEST_REQUIRE=1`.
pub fn required() -> bool {
    var("VIRTIO_TEST_REQUIRE").is_some_and(|v| v == "1")
}

/// Whether the negative control `name` is listed in `VIRTIO_TEST_EXPECT_FAIL`.
pub fn expect_fail(name: &str) -> bool {
    var("VIRTIO_TEST_EXPECT_FAIL").is_some_and(|v| v.split(',').any(|n| n.trim() == name))
}

/// Where a test finds its device: `Ok(Some(path))`, `Ok(None)` when absent and not required
/// (the test should return), or `Err` when absent but required.
pub fn lookup(kind: DeviceKind) -> Result<Option<PathBuf>, String> {
    let negative = expect_fail(EXPECT_NO_ACCESS_PLATFORM);
    let value = var(kind.env_var()).filter(|_| match kind {
        DeviceKind::Pci => !negative,
        DeviceKind::PciNoAccessPlatform => negative,
        _ => true,
    });
    match value {
        Some(path) => Ok(Some(PathBuf::from(path))),
        None if required() => Err(format!(
            "{kind} is required (VIRTIO_TEST_REQUIRE=1) but not available: {} is unset{}",
            kind.env_var(),
            match kind {
                DeviceKind::Pci => " or VIRTIO_TEST_EXPECT_FAIL names no-access-platform",
                DeviceKind::PciNoAccessPlatform => " or VIRTIO_TEST_EXPECT_FAIL lacks no-access-platform",
                _ => "",
            }
        )),
        None => Ok(None),
    }
}

/// The device for a test: returns its path, or returns from the calling test when the device
/// is absent and not required; panics (fails the test) when it is required but absent.
#[macro_export]
macro_rules! device_or_skip {
    ($kind:expr) => {
        match $crate::lookup($kind) {
            Ok(Some(path)) => path,
            Ok(None) => {
                eprintln!("skipped: {} not available ({} unset)", $kind, $kind.env_var());
                return;
            }
            Err(e) => panic!("{e}"),
        }
    };
}

/// Parses the kernel's virtio `features` sysfs string (one `0`/`1` per bit, bit 0 first).
pub fn parse_feature_bits(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.is_empty() || text.len() > 64 {
        return None;
    }
    let mut bits = 0u64;
    for (i, c) in text.chars().enumerate() {
        match c {
            '1' => bits |= 1 << i,
            '0' => {}
            _ => return None,
        }
    }
    Some(bits)
}

/// Whether feature `bit` is set in `features`.
pub fn has_feature(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// Reads a sysfs attribute, trimmed.
pub fn sysfs(dir: &Path, attr: &str) -> io::Result<String> {
    std::fs::read_to_string(dir.join(attr)).map(|s| s.trim().to_string())
}

/// The last path component of a sysfs symlink (`driver` -> `vfio-pci`).
pub fn link_name(dir: &Path, link: &str) -> io::Result<String> {
    let target = std::fs::read_link(dir.join(link))?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("odd link target {}", target.display())))
}

/// Opens `path` read-write, close-on-exec.
pub fn open_rw(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `_IOC` with the Linux x86 encoding.
const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}

/// Linux ioctl request numbers used by the tests.
pub mod nr {
    use super::ioc;

    const READ: u64 = 2;
    const VHOST: u64 = 0xAF;
    const VFIO: u64 = b';' as u64;

    /// `VHOST_GET_FEATURES`: `_IOR(0xAF, 0x00, __u64)`.
    pub const VHOST_GET_FEATURES: u64 = ioc(READ, VHOST, 0x00, 8);
    /// `VHOST_VDPA_GET_DEVICE_ID`: `_IOR(0xAF, 0x70, __u32)`.
    pub const VHOST_VDPA_GET_DEVICE_ID: u64 = ioc(READ, VHOST, 0x70, 4);
    /// `VHOST_VDPA_GET_CONFIG`: `_IOR(0xAF, 0x73, struct vhost_vdpa_config)` (8-byte header).
    pub const VHOST_VDPA_GET_CONFIG: u64 = ioc(READ, VHOST, 0x73, 8);
    /// `VFIO_GET_API_VERSION`: `_IO(';', 100)`.
    pub const VFIO_GET_API_VERSION: u64 = ioc(0, VFIO, 100, 0);
    /// `VFIO_CHECK_EXTENSION`: `_IO(';', 101)`.
    pub const VFIO_CHECK_EXTENSION: u64 = ioc(0, VFIO, 101, 0);
    /// `VFIO_GROUP_GET_STATUS`: `_IO(';', 103)`.
    pub const VFIO_GROUP_GET_STATUS: u64 = ioc(0, VFIO, 103, 0);
}

/// `VFIO_TYPE1v2_IOMMU`, the IOMMU model transport-pci uses.
pub const VFIO_TYPE1V2_IOMMU: u64 = 3;
/// `VFIO_GROUP_FLAGS_VIABLE`.
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;

/// A `/dev/vhost-vdpa-N` opened for the read-only queries a test can make without a driver.
pub struct VhostVdpa {
    fd: OwnedFd,
}

impl VhostVdpa {
    /// Opens the device node (vhost-vdpa allows one opener at a time).
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(VhostVdpa { fd: open_rw(path)? })
    }

    /// `VHOST_VDPA_GET_DEVICE_ID`.
    pub fn device_id(&self) -> io::Result<u32> {
        let mut id = 0u32;
        // SAFETY: the ioctl writes one u32 to the pointer, which is valid for that write.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), nr::VHOST_VDPA_GET_DEVICE_ID as _, &mut id) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(id)
    }

    /// `VHOST_GET_FEATURES`: the device features.
    pub fn features(&self) -> io::Result<u64> {
        let mut features = 0u64;
        // SAFETY: the ioctl writes one u64 to the pointer, which is valid for that write.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), nr::VHOST_GET_FEATURES as _, &mut features) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(features)
    }

    /// `VHOST_VDPA_GET_CONFIG`: `len` bytes of device config space from `offset`.
    pub fn config(&self, offset: u32, len: u32) -> io::Result<Vec<u8>> {
        // struct vhost_vdpa_config { __u32 off; __u32 len; __u8 buf[]; }
        let mut buf = vec![0u8; 8 + len as usize];
        buf[..4].copy_from_slice(&offset.to_ne_bytes());
        buf[4..8].copy_from_slice(&len.to_ne_bytes());
        // SAFETY: `buf` holds the 8-byte header plus `len` bytes, as the header says.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), nr::VHOST_VDPA_GET_CONFIG as _, buf.as_mut_ptr()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(buf.split_off(8))
    }
}

/// An ioctl without an argument pointer (`_IO`), returning its non-negative result.
pub fn ioctl_value(fd: &OwnedFd, request: u64, arg: u64) -> io::Result<i32> {
    // SAFETY: these requests take an integer argument (or none) and write no memory.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// `VFIO_GROUP_GET_STATUS` flags of an open group.
pub fn vfio_group_flags(group: &OwnedFd) -> io::Result<u32> {
    // struct vfio_group_status { __u32 argsz; __u32 flags; }
    let mut status = [8u32, 0u32];
    // SAFETY: the ioctl reads argsz and writes flags inside the 8-byte array.
    let rc = unsafe { libc::ioctl(group.as_raw_fd(), nr::VFIO_GROUP_GET_STATUS as _, status.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(status[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(nr::VHOST_GET_FEATURES, 0x8008_AF00);
        assert_eq!(nr::VHOST_VDPA_GET_DEVICE_ID, 0x8004_AF70);
        assert_eq!(nr::VHOST_VDPA_GET_CONFIG, 0x8008_AF73);
        assert_eq!(nr::VFIO_GET_API_VERSION, 0x3B64);
        assert_eq!(nr::VFIO_GROUP_GET_STATUS, 0x3B67);
    }

    #[test]
    fn feature_strings() {
        // Bits 9 (FLUSH) and 32 (VERSION_1): what a device without iommu_platform offers.
        let mut s = "0".repeat(64);
        s.replace_range(9..10, "1");
        s.replace_range(32..33, "1");
        assert_eq!(parse_feature_bits(&format!("{s}\n")), Some(0x1_0000_0200));
        let f = parse_feature_bits(&s).unwrap_or(0);
        assert!(has_feature(f, F_VERSION_1) && !has_feature(f, F_ACCESS_PLATFORM));
        assert_eq!(parse_feature_bits(""), None);
        assert_eq!(parse_feature_bits("012"), None);
        assert_eq!(parse_feature_bits(&"1".repeat(65)), None);
    }
}

/// The region `pci::data_reaches_the_host_disk` writes, which `cargo xtask vm-test` then
/// compares with the disk image file on the host after QEMU exits (xtask's
/// `vm/disk_check.rs` holds the same definitions; both pin the pattern in a test).
pub mod host_disk {
    /// Where the region starts on the disk.
    pub const OFFSET: u64 = 48 << 20;
    /// Its length.
    pub const LEN: usize = 1 << 20;

    /// Byte `i` of the region.
    pub fn byte(i: usize) -> u8 {
        ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8 ^ (i >> 12) as u8
    }

    /// The whole region's contents.
    pub fn pattern() -> Vec<u8> {
        (0..LEN).map(byte).collect()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn pattern_is_pinned() {
            let first: Vec<u8> = (0..6).map(super::byte).collect();
            assert_eq!(first, [0x00, 0x9e, 0x3c, 0xda, 0x78, 0x17]);
            assert_eq!(super::byte(4096), 0x76);
        }
    }
}

/// Runs the guest's `/bin/vblk` (or `$VIRTIO_TEST_VBLK`) with `args` and returns its
/// standard output; panics with the command, its status and its stderr if it fails.
pub fn run_vblk(args: &[&str]) -> String {
    let program = std::env::var("VIRTIO_TEST_VBLK").unwrap_or_else(|_| "/bin/vblk".into());
    let out = std::process::Command::new(&program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!(
            "`{program} {}` failed ({}):\nstdout: {stdout}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("$ vblk {}\n{stdout}", args.join(" "));
    stdout
}
