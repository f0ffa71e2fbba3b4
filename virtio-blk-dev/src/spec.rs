//! Wire constants of the virtio-blk request protocol (virtio 1.2 §5.2.6), for
//! the driver here and for anything that plays the device side (the `vblk`
//! embedded server, model devices in tests). Feature bits are
//! [`crate::BlkFeatures`]; the configuration layout is [`crate::BlkConfig`].

/// The sector unit of request headers and the configuration's `capacity`.
pub const SECTOR_SIZE: u64 = 512;

/// `VIRTIO_BLK_T_IN`: read.
pub const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`: write.
pub const T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`: 20 bytes of device ID.
pub const T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_T_DISCARD`.
pub const T_DISCARD: u32 = 11;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const T_WRITE_ZEROES: u32 = 13;
/// `VIRTIO_BLK_T_SECURE_ERASE`.
pub const T_SECURE_ERASE: u32 = 14;

/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = 2;

/// Bytes of the request header `struct virtio_blk_req` before the data:
/// `le32 type`, `le32 reserved`, `le64 sector`.
pub const HEADER_LEN: usize = 16;
/// Bytes of one discard / write-zeroes / secure-erase segment:
/// `le64 sector`, `le32 num_sectors`, `le32 flags`.
pub const SEGMENT_LEN: usize = 16;
/// The `unmap` flag of a write-zeroes segment.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Bytes of a device ID (GET_ID).
pub const ID_LEN: usize = 20;

/// The request header as the driver writes it.
pub fn header(ty: u32, sector: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    let (t, rest) = h.split_at_mut(4);
    t.copy_from_slice(&ty.to_le_bytes());
    if let Some(s) = rest.get_mut(4..12) {
        s.copy_from_slice(&sector.to_le_bytes());
    }
    h
}

/// A discard / write-zeroes / secure-erase segment.
pub fn segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; SEGMENT_LEN] {
    let mut s = [0u8; SEGMENT_LEN];
    let (a, rest) = s.split_at_mut(8);
    a.copy_from_slice(&sector.to_le_bytes());
    let (b, c) = rest.split_at_mut(4);
    b.copy_from_slice(&num_sectors.to_le_bytes());
    c.copy_from_slice(&flags.to_le_bytes());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_segment_layout() {
        let h = header(T_OUT, 0x0102_0304_0506_0708);
        assert_eq!(h, [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
        let s = segment(9, 0x100, WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(s, [9, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0]);
    }
}
