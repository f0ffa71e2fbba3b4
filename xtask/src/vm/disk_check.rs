//! The end-to-end check of the PCI tier's data path: the guest test
//! `pci::data_reaches_the_host_disk` writes a known pattern through transport-pci and flushes;
//! after QEMU exits, the host reads the disk image file QEMU wrote to and compares. Nothing in
//! between (the driver, the guest kernel's IOMMU, QEMU's virtio-blk) can make it pass by
//! reading back its own cache.
//!
//! The region and the pattern are the contract with `vm-tests` (`vm_tests::host_disk`); both
//! sides pin a few bytes of the pattern in a unit test so that a change to one is caught.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The guest test that writes the region.
pub const TEST_NAME: &str = "pci::data_reaches_the_host_disk";
/// Where the region starts on the disk.
pub const OFFSET: u64 = 48 << 20;
/// Its length.
pub const LEN: usize = 1 << 20;

/// Byte `i` of the region (same definition as `vm_tests::host_disk::byte`).
pub fn byte(i: usize) -> u8 {
    ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8 ^ (i >> 12) as u8
}

/// Compares the region of the disk image at `disk` with the pattern.
pub fn check(disk: &Path) -> Result<(), String> {
    let mut got = vec![0u8; LEN];
    File::open(disk)
        .and_then(|f| f.read_exact_at(&mut got, OFFSET))
        .map_err(|e| format!("cannot read {} at {OFFSET:#x}: {e}", disk.display()))?;
    match (0..LEN).find(|&i| got[i] != byte(i)) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{TEST_NAME} passed in the guest, but the host disk image differs at byte {i} of the \
             region at {OFFSET:#x} (got {:#04x}, want {:#04x})",
            got[i],
            byte(i)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_pinned() {
        let first: Vec<u8> = (0..6).map(byte).collect();
        assert_eq!(first, [0x00, 0x9e, 0x3c, 0xda, 0x78, 0x17]);
        assert_eq!(byte(4096), 0x76);
    }

    #[test]
    fn check_finds_a_wrong_byte() {
        let dir = std::env::temp_dir().join(format!("disk-check-{}", std::process::id()));
        let f = File::create(&dir).unwrap();
        f.set_len(OFFSET + LEN as u64).unwrap();
        let region: Vec<u8> = (0..LEN).map(byte).collect();
        f.write_all_at(&region, OFFSET).unwrap();
        check(&dir).unwrap();
        f.write_all_at(&[byte(1000) ^ 1], OFFSET + 1000).unwrap();
        let e = check(&dir).unwrap_err();
        assert!(e.contains("byte 1000"), "{e}");
        std::fs::remove_file(&dir).unwrap();
    }
}
