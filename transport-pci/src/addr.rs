//! Finding the device: a PCI address (`DDDD:BB:DD.F`) or a sysfs directory, its driver
//! binding and its IOMMU group.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where sysfs lists PCI functions.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// A PCI function address, `domain:bus:device.function`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PciAddress {
    /// PCI segment (domain).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

/// Why a device address is not one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadAddress(pub String);

impl fmt::Display for BadAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` is not a PCI address of the form DDDD:BB:DD.F", self.0)
    }
}

impl std::error::Error for BadAddress {}

impl FromStr for PciAddress {
    type Err = BadAddress;

    /// Parses `DDDD:BB:DD.F` (hexadecimal; the function is 0-7, the device 00-1f).
    fn from_str(s: &str) -> Result<Self, BadAddress> {
        let bad = || BadAddress(s.to_string());
        let hex = |t: &str, len: usize| -> Result<u32, BadAddress> {
            if t.len() != len || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(t, 16).map_err(|_| bad())
        };
        let (rest, function) = s.rsplit_once('.').ok_or_else(bad)?;
        let mut parts = rest.split(':');
        let (Some(d), Some(b), Some(dev), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let domain = hex(d, 4)? as u16;
        let bus = hex(b, 2)? as u8;
        let device = hex(dev, 2)?;
        let function = hex(function, 1)?;
        if device > 0x1f || function > 7 {
            return Err(bad());
        }
        Ok(PciAddress { domain, bus, device: device as u8, function: function as u8 })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.device, self.function)
    }
}

impl PciAddress {
    /// The function's sysfs directory under `root` (normally [`SYSFS_PCI_DEVICES`]).
    pub fn sysfs_dir(&self, root: &Path) -> PathBuf {
        root.join(self.to_string())
    }
}

/// Resolves `device` (a PCI address, or a sysfs directory such as
/// `/sys/bus/pci/devices/0000:00:03.0`) to the address and its sysfs directory.
pub fn resolve(device: &str) -> Result<(PciAddress, PathBuf), BadAddress> {
    if let Ok(a) = device.parse::<PciAddress>() {
        return Ok((a, a.sysfs_dir(Path::new(SYSFS_PCI_DEVICES))));
    }
    let path = Path::new(device);
    // A sysfs path names the function in its last component (also through symlinks such as
    // /sys/bus/pci/devices/X -> ../../../devices/pci0000:00/X).
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| BadAddress(device.to_string()))?;
    let a = name.parse::<PciAddress>().map_err(|_| BadAddress(device.to_string()))?;
    Ok((a, path.to_path_buf()))
}

/// The last path component of the symlink `dir/link` (`driver` -> `vfio-pci`,
/// `iommu_group` -> `5`).
pub fn link_name(dir: &Path, link: &str) -> std::io::Result<String> {
    let target = std::fs::read_link(dir.join(link))?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("odd {link} link")))
}

/// The IOMMU group number of a `iommu_group` link target name.
pub fn parse_group(name: &str) -> Option<u32> {
    name.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        let a: PciAddress = "0000:00:03.0".parse().unwrap();
        assert_eq!(a, PciAddress { domain: 0, bus: 0, device: 3, function: 0 });
        assert_eq!(a.to_string(), "0000:00:03.0");
        let b: PciAddress = "abcd:Ef:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "abcd:ef:1f.7");
        assert_eq!(b.sysfs_dir(Path::new("/sys/bus/pci/devices")), Path::new("/sys/bus/pci/devices/abcd:ef:1f.7"));
    }

    #[test]
    fn bad_addresses_are_refused() {
        for s in [
            "",
            "00:03.0",
            "0000:00:03",
            "0000:00:20.0",
            "0000:00:03.8",
            "0000:000:03.0",
            "0000:00:03.0.1",
            "0000:00:03:0.0",
            "g000:00:03.0",
            "+000:00:03.0",
            "0000:00:+3.0",
        ] {
            let e = s.parse::<PciAddress>().unwrap_err();
            assert!(e.to_string().contains("DDDD:BB:DD.F"), "{s}");
        }
    }

    #[test]
    fn resolve_takes_an_address_or_a_sysfs_path() {
        let (a, p) = resolve("0000:00:04.0").unwrap();
        assert_eq!(a.device, 4);
        assert_eq!(p, Path::new("/sys/bus/pci/devices/0000:00:04.0"));
        let (a, p) = resolve("/sys/devices/pci0000:00/0000:00:05.1").unwrap();
        assert_eq!((a.device, a.function), (5, 1));
        assert_eq!(p, Path::new("/sys/devices/pci0000:00/0000:00:05.1"));
        assert!(resolve("/dev/vhost-vdpa-0").is_err());
        assert!(resolve("/").is_err());
    }

    #[test]
    fn group_names() {
        assert_eq!(parse_group("12"), Some(12));
        assert_eq!(parse_group("noiommu-0"), None);
    }

    #[test]
    fn link_names_come_from_the_target() {
        let dir = std::env::temp_dir().join(format!("transport-pci-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink("../../../kernel/iommu_groups/7", dir.join("iommu_group")).unwrap();
        assert_eq!(link_name(&dir, "iommu_group").unwrap(), "7");
        assert!(link_name(&dir, "driver").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
