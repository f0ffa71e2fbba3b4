//! Errors of the driver-side queues.

use core::fmt;

/// Something the device wrote that a correct device never writes. The queue
/// that saw it is broken from then on: every later call returns
/// [`Error::Broken`] with this value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// A used id (split: head descriptor index; packed: buffer ID) not below the queue size.
    UsedIdOutOfRange {
        /// The id the device wrote.
        id: u32,
        /// The queue size.
        queue_size: u16,
    },
    /// A used id that names no chain in flight (never submitted, already
    /// completed, or not yet published).
    UsedIdNotInFlight {
        /// The id the device wrote.
        id: u32,
    },
    /// A used length larger than the chain's writable bytes.
    UsedLenTooLarge {
        /// The id the device wrote.
        id: u32,
        /// The length it reported.
        len: u32,
        /// The chain's writable bytes.
        writable: u32,
    },
    /// Split: the used index moved by more entries than chains are in flight.
    UsedIndexJump {
        /// The used index the device wrote.
        used_idx: u16,
        /// The driver's last seen used index.
        last_used: u16,
        /// Published chains not yet completed.
        in_flight: u16,
    },
    /// Packed: a descriptor marked used (its avail and used flags equal the used
    /// wrap counter) while no chain is in flight.
    UsedWithoutInFlight {
        /// Ring position of the descriptor.
        position: u16,
    },
    /// VIRTIO_F_IN_ORDER was negotiated but the device used chains out of order.
    UsedOutOfOrder {
        /// The id the device wrote.
        id: u32,
        /// The oldest chain in flight, the one the device had to use next.
        expected: u32,
    },
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DeviceError::UsedIdOutOfRange { id, queue_size } => {
                write!(f, "device returned used id {id} on a queue of size {queue_size}")
            }
            DeviceError::UsedIdNotInFlight { id } => {
                write!(f, "device returned used id {id}, which is not in flight")
            }
            DeviceError::UsedLenTooLarge { id, len, writable } => {
                write!(f, "device reported {len} bytes written for id {id}, which has only {writable} writable bytes")
            }
            DeviceError::UsedIndexJump { used_idx, last_used, in_flight } => write!(
                f,
                "device moved the used index from {last_used} to {used_idx} with only {in_flight} chains in flight"
            ),
            DeviceError::UsedWithoutInFlight { position } => {
                write!(f, "device marked descriptor {position} used with nothing in flight")
            }
            DeviceError::UsedOutOfOrder { id, expected } => {
                write!(f, "device used id {id} out of order (IN_ORDER negotiated, {expected} was next)")
            }
        }
    }
}

/// Why a queue operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Not enough free descriptors (or, packed, buffer ids) for the chain now;
    /// completing chains frees them.
    QueueFull,
    /// A chain needs at least one buffer.
    EmptyChain,
    /// A buffer of length zero.
    ZeroLengthBuffer,
    /// The chain's buffers add up to more than `u32::MAX` bytes (§2.7.13.1).
    ChainTooLong,
    /// More buffers than the queue size (direct) or the indirect table holds.
    TooManyBuffers {
        /// Buffers in the chain.
        buffers: usize,
        /// The most this queue takes in one chain.
        max: usize,
    },
    /// `add_framed` on a queue without a [`crate::ChainFrame`].
    NoChainFrame,
    /// The device misbehaved earlier; the queue is unusable until reset.
    Broken(DeviceError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::QueueFull => write!(f, "virtqueue full"),
            Error::EmptyChain => write!(f, "descriptor chain has no buffers"),
            Error::ZeroLengthBuffer => write!(f, "buffer of length zero"),
            Error::ChainTooLong => write!(f, "descriptor chain longer than 4 GiB"),
            Error::TooManyBuffers { buffers, max } => {
                write!(f, "chain of {buffers} buffers, at most {max} allowed")
            }
            Error::NoChainFrame => write!(f, "framed chain added to a queue without a chain frame"),
            Error::Broken(e) => write!(f, "virtqueue broken: {e}"),
        }
    }
}

impl From<DeviceError> for Error {
    fn from(e: DeviceError) -> Self {
        Error::Broken(e)
    }
}

/// A chain that could not be added, with its token handed back. The queue is
/// exactly as it was before the call.
#[derive(Debug, PartialEq, Eq)]
pub struct AddError<T> {
    /// Why.
    pub error: Error,
    /// The token given to `add`.
    pub token: T,
}

impl<T> fmt::Display for AddError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}
