//! The virtio-blk feature bits and configuration layout (virtio 1.2 §5.2.3, §5.2.4).

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

bitflags::bitflags! {
    /// The virtio-blk device-specific feature bits (virtio 1.2 §5.2.3), at
    /// their specification positions in the 64-bit feature word.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct BlkFeatures: u64 {
        /// VIRTIO_BLK_F_SIZE_MAX (1): `size_max` limits one segment.
        const SIZE_MAX = 1 << 1;
        /// VIRTIO_BLK_F_SEG_MAX (2): `seg_max` limits the segments of one request.
        const SEG_MAX = 1 << 2;
        /// VIRTIO_BLK_F_GEOMETRY (4): legacy geometry is valid.
        const GEOMETRY = 1 << 4;
        /// VIRTIO_BLK_F_RO (5): the device is read-only.
        const RO = 1 << 5;
        /// VIRTIO_BLK_F_BLK_SIZE (6): `blk_size` is the logical block size.
        const BLK_SIZE = 1 << 6;
        /// VIRTIO_BLK_F_FLUSH (9): flush requests.
        const FLUSH = 1 << 9;
        /// VIRTIO_BLK_F_TOPOLOGY (10): the topology fields are valid.
        const TOPOLOGY = 1 << 10;
        /// VIRTIO_BLK_F_CONFIG_WCE (11): `writeback` reports the cache mode.
        const CONFIG_WCE = 1 << 11;
        /// VIRTIO_BLK_F_MQ (12): `num_queues` request queues.
        const MQ = 1 << 12;
        /// VIRTIO_BLK_F_DISCARD (13): discard requests.
        const DISCARD = 1 << 13;
        /// VIRTIO_BLK_F_WRITE_ZEROES (14): write-zeroes requests.
        const WRITE_ZEROES = 1 << 14;
        /// VIRTIO_BLK_F_SECURE_ERASE (16): secure-erase requests.
        const SECURE_ERASE = 1 << 16;
    }
}

/// The virtio-blk configuration space up to the secure-erase fields
/// (virtio 1.2 §5.2.4), little-endian as the device presents it.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: U64,
    /// Largest segment in bytes (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: U32,
    /// Most data segments in one request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: U32,
    /// Legacy geometry: cylinders.
    pub cylinders: U16,
    /// Legacy geometry: heads.
    pub heads: u8,
    /// Legacy geometry: sectors.
    pub sectors: u8,
    /// Logical block size in bytes (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: U32,
    /// log2 of logical blocks per physical block (VIRTIO_BLK_F_TOPOLOGY).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block (VIRTIO_BLK_F_TOPOLOGY).
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in logical blocks (VIRTIO_BLK_F_TOPOLOGY).
    pub min_io_size: U16,
    /// Optimal (suggested maximum) I/O size in logical blocks (VIRTIO_BLK_F_TOPOLOGY).
    pub opt_io_size: U32,
    /// 1 if the cache is write-back, 0 if write-through (VIRTIO_BLK_F_CONFIG_WCE).
    pub writeback: u8,
    /// Reserved.
    pub unused0: u8,
    /// Number of request queues (VIRTIO_BLK_F_MQ).
    pub num_queues: U16,
    /// Largest discard in sectors (VIRTIO_BLK_F_DISCARD).
    pub max_discard_sectors: U32,
    /// Most discard segments in one request (VIRTIO_BLK_F_DISCARD).
    pub max_discard_seg: U32,
    /// Discard alignment in sectors (VIRTIO_BLK_F_DISCARD).
    pub discard_sector_alignment: U32,
    /// Largest write-zeroes in sectors (VIRTIO_BLK_F_WRITE_ZEROES).
    pub max_write_zeroes_sectors: U32,
    /// Most write-zeroes segments in one request (VIRTIO_BLK_F_WRITE_ZEROES).
    pub max_write_zeroes_seg: U32,
    /// 1 if write-zeroes may unmap (VIRTIO_BLK_F_WRITE_ZEROES).
    pub write_zeroes_may_unmap: u8,
    /// Reserved.
    pub unused1: [u8; 3],
    /// Largest secure erase in sectors (VIRTIO_BLK_F_SECURE_ERASE).
    pub max_secure_erase_sectors: U32,
    /// Most secure-erase segments in one request (VIRTIO_BLK_F_SECURE_ERASE).
    pub max_secure_erase_seg: U32,
    /// Secure-erase alignment in sectors (VIRTIO_BLK_F_SECURE_ERASE).
    pub secure_erase_sector_alignment: U32,
}

/// The block topology (VIRTIO_BLK_F_TOPOLOGY), in logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Topology {
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size, in logical blocks.
    pub opt_io_size: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_offsets_follow_the_spec() {
        assert_eq!(core::mem::offset_of!(BlkConfig, seg_max), 12);
        assert_eq!(core::mem::offset_of!(BlkConfig, blk_size), 20);
        assert_eq!(core::mem::offset_of!(BlkConfig, physical_block_exp), 24);
        assert_eq!(core::mem::offset_of!(BlkConfig, writeback), 32);
        assert_eq!(core::mem::offset_of!(BlkConfig, num_queues), 34);
        assert_eq!(core::mem::offset_of!(BlkConfig, max_discard_sectors), 36);
        assert_eq!(core::mem::offset_of!(BlkConfig, max_write_zeroes_sectors), 48);
        assert_eq!(core::mem::offset_of!(BlkConfig, write_zeroes_may_unmap), 56);
        assert_eq!(core::mem::offset_of!(BlkConfig, max_secure_erase_sectors), 60);
        assert_eq!(core::mem::size_of::<BlkConfig>(), 72);
    }
}
