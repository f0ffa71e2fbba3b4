//! The error type of the block driver.

use std::fmt;

use crate::config::BlkFeatures;

/// A status byte other than `VIRTIO_BLK_S_OK` (or none at all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceStatus {
    /// `VIRTIO_BLK_S_IOERR` (1): the device failed the request.
    IoErr,
    /// `VIRTIO_BLK_S_UNSUPP` (2): the device does not support the request.
    Unsupp,
    /// The device completed the chain without writing the status byte (it
    /// still holds the driver's preset value, which no device returns).
    NotWritten,
    /// Any other value: not defined by the specification.
    Other(u8),
}

impl fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceStatus::IoErr => f.write_str("I/O error (VIRTIO_BLK_S_IOERR)"),
            DeviceStatus::Unsupp => f.write_str("request not supported (VIRTIO_BLK_S_UNSUPP)"),
            DeviceStatus::NotWritten => f.write_str("the device did not write the status byte"),
            DeviceStatus::Other(v) => write!(f, "undefined status byte {v:#04x}"),
        }
    }
}

/// Why a block request or device operation failed.
///
/// The variants up to [`BlkError::QueueFull`] are found before the request
/// touches the ring: nothing was submitted and any buffer comes back with the
/// error.
#[derive(Debug)]
#[non_exhaustive]
pub enum BlkError {
    /// Offset or length not a multiple of the logical block size, or a zero length.
    Misaligned {
        /// Byte offset asked for.
        offset: u64,
        /// Byte length asked for.
        len: u64,
        /// The device's logical block size.
        block_size: u32,
    },
    /// The request reaches past the end of the device.
    OutOfRange {
        /// Byte offset asked for.
        offset: u64,
        /// Byte length asked for.
        len: u64,
        /// Capacity of the device in bytes.
        capacity: u64,
    },
    /// More data segments than the device (`seg_max`) or the queue allows.
    TooManySegments {
        /// Segments in the request.
        segments: usize,
        /// The most allowed.
        max: usize,
    },
    /// A data segment longer than the device's `size_max` (or 4 GiB).
    SegmentTooLarge {
        /// Bytes in the segment.
        len: u64,
        /// The most allowed.
        max: u64,
    },
    /// A write-type request on a read-only device.
    ReadOnly,
    /// The request needs a feature that was not negotiated.
    Unsupported(BlkFeatures),
    /// No room in the queue now; complete requests and retry.
    QueueFull,
    /// The device answered with a status other than OK.
    Device(DeviceStatus),
    /// The transport failed (kick, wait, backend gone ...).
    Transport(virtio_transport_api::Error),
    /// The virtqueue refused the chain or the device broke the ring protocol.
    Queue(virtio_queue_core::Error),
    /// Queue index out of range, or the queue was already taken.
    NoSuchQueue(u16),
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::Misaligned { offset, len, block_size } => write!(
                f,
                "request at byte {offset} of {len} bytes is not a non-empty multiple of the {block_size}-byte block size"
            ),
            BlkError::OutOfRange { offset, len, capacity } => {
                write!(f, "request at byte {offset} of {len} bytes ends past the device capacity of {capacity} bytes")
            }
            BlkError::TooManySegments { segments, max } => {
                write!(f, "request of {segments} segments, at most {max} allowed")
            }
            BlkError::SegmentTooLarge { len, max } => write!(f, "segment of {len} bytes, at most {max} allowed"),
            BlkError::ReadOnly => f.write_str("the device is read-only"),
            BlkError::Unsupported(feat) => write!(f, "feature not negotiated: {feat:?}"),
            BlkError::QueueFull => f.write_str("virtqueue full"),
            BlkError::Device(s) => write!(f, "device error: {s}"),
            BlkError::Transport(e) => write!(f, "{e}"),
            BlkError::Queue(e) => write!(f, "{e}"),
            BlkError::NoSuchQueue(i) => write!(f, "queue {i} does not exist or was already taken"),
        }
    }
}

impl std::error::Error for BlkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BlkError::Transport(e) => Some(e),
            _ => None,
        }
    }
}

impl From<virtio_transport_api::Error> for BlkError {
    fn from(e: virtio_transport_api::Error) -> Self {
        BlkError::Transport(e)
    }
}

impl From<virtio_queue_core::Error> for BlkError {
    fn from(e: virtio_queue_core::Error) -> Self {
        match e {
            virtio_queue_core::Error::QueueFull => BlkError::QueueFull,
            e => BlkError::Queue(e),
        }
    }
}

/// `Result` with [`BlkError`].
pub type Result<T, E = BlkError> = std::result::Result<T, E>;
