//! One driver-side interface over both formats, statically dispatched.

use crate::error::{AddError, DeviceError, Error};
use crate::frame::ChainFrame;
use crate::layout::{LayoutError, RingFeatures, RingLayout};
use crate::packed::PackedQueue;
use crate::slots::{Slot, SlotStorage};
use crate::split::{QueueConfig, SplitQueue};
use crate::{Buffer, QueueAddresses, Used, UsedDelay, UsedIdHint};

/// The driver-side operations of a virtqueue, whatever its format. Device
/// crates write their code against this trait (generic, no `dyn`) or against
/// [`Virtqueue`].
pub trait DriverQueue<T> {
    /// Adds a chain of `readable` then `writable` buffers, not yet visible to
    /// the device. On error nothing changed and the token comes back.
    fn add(&mut self, readable: &[Buffer], writable: &[Buffer], token: T) -> Result<(), AddError<T>>;
    /// Makes the chains added since the last call visible with one release
    /// store; `true` if the device must be notified.
    fn publish(&mut self) -> Result<bool, Error>;
    /// Takes the next used chain, if any, after checking what the device wrote.
    fn pop_used(&mut self) -> Result<Option<Used<T>>, Error>;
    /// Asks the device not to send used-buffer notifications.
    fn disable_used_notifications(&mut self);
    /// Asks for a used-buffer notification; `true` if used chains are already
    /// waiting (poll instead of waiting).
    fn enable_used_notifications(&mut self) -> Result<bool, Error>;
    /// Asks for a notification after most chains in flight completed; `true`
    /// if they already have.
    fn enable_used_notifications_delayed(&mut self) -> Result<bool, Error>;
    /// Asks for a notification after `delay`'s share of the chains in flight
    /// completed; `true` if they already have.
    fn enable_used_notifications_delayed_by(&mut self, delay: UsedDelay) -> Result<bool, Error>;
    /// Entries in the queue.
    fn queue_size(&self) -> u16;
    /// Free descriptors (split) or ring positions (packed).
    fn free_descriptors(&self) -> u16;
    /// Chains added and not yet completed.
    fn in_flight(&self) -> u16;
    /// Most buffers one chain may have.
    fn max_chain_buffers(&self) -> usize;
    /// The device error that broke the queue, if any.
    fn broken(&self) -> Option<DeviceError>;
    /// The ring layout.
    fn layout(&self) -> RingLayout;
    /// Device addresses of the three ring parts.
    fn addresses(&self) -> QueueAddresses;
    /// Forgets every chain, handing each token to `each`, as after a device reset.
    fn reset<F: FnMut(T)>(&mut self, each: F);
}

macro_rules! forward_driver_queue {
    ($ty:ident) => {
        impl<T, S: SlotStorage<T>> DriverQueue<T> for $ty<'_, T, S> {
            #[inline(always)]
            fn add(&mut self, readable: &[Buffer], writable: &[Buffer], token: T) -> Result<(), AddError<T>> {
                $ty::add(self, readable, writable, token)
            }
            #[inline(always)]
            fn publish(&mut self) -> Result<bool, Error> {
                $ty::publish(self)
            }
            #[inline(always)]
            fn pop_used(&mut self) -> Result<Option<Used<T>>, Error> {
                $ty::pop_used(self)
            }
            #[inline(always)]
            fn disable_used_notifications(&mut self) {
                $ty::disable_used_notifications(self)
            }
            #[inline(always)]
            fn enable_used_notifications(&mut self) -> Result<bool, Error> {
                $ty::enable_used_notifications(self)
            }
            #[inline(always)]
            fn enable_used_notifications_delayed(&mut self) -> Result<bool, Error> {
                $ty::enable_used_notifications_delayed(self)
            }
            #[inline(always)]
            fn enable_used_notifications_delayed_by(&mut self, delay: UsedDelay) -> Result<bool, Error> {
                $ty::enable_used_notifications_delayed_by(self, delay)
            }
            fn queue_size(&self) -> u16 {
                $ty::queue_size(self)
            }
            fn free_descriptors(&self) -> u16 {
                $ty::free_descriptors(self)
            }
            fn in_flight(&self) -> u16 {
                $ty::in_flight(self)
            }
            fn max_chain_buffers(&self) -> usize {
                $ty::max_chain_buffers(self)
            }
            fn broken(&self) -> Option<DeviceError> {
                $ty::broken(self)
            }
            fn layout(&self) -> RingLayout {
                $ty::layout(self)
            }
            fn addresses(&self) -> QueueAddresses {
                $ty::addresses(self)
            }
            fn reset<F: FnMut(T)>(&mut self, each: F) {
                $ty::reset(self, each)
            }
        }
    };
}

forward_driver_queue!(SplitQueue);
forward_driver_queue!(PackedQueue);

/// A queue of either format, chosen at run time from the negotiated
/// features, with each call dispatched by a `match` (no `dyn`).
pub enum Virtqueue<'a, T, S: SlotStorage<T> = &'a mut [Slot<T>]> {
    /// A split queue.
    Split(SplitQueue<'a, T, S>),
    /// A packed queue.
    Packed(PackedQueue<'a, T, S>),
}

impl<'a, T, S: SlotStorage<T>> Virtqueue<'a, T, S> {
    /// A packed queue if `config.features` has RING_PACKED, else a split one.
    pub fn new(config: QueueConfig<'a>, slots: S) -> Result<Self, LayoutError> {
        if config.features.contains(RingFeatures::RING_PACKED) {
            PackedQueue::new(config, slots).map(Virtqueue::Packed)
        } else {
            SplitQueue::new(config, slots).map(Virtqueue::Split)
        }
    }

    /// The id the next chain added will have ([`SplitQueue::next_id`],
    /// [`PackedQueue::next_id`]).
    #[inline(always)]
    pub fn next_id(&self) -> Option<u16> {
        match self {
            Virtqueue::Split(q) => q.next_id(),
            Virtqueue::Packed(q) => q.next_id(),
        }
    }

    /// Sets where framed chains keep their header and status
    /// ([`SplitQueue::set_chain_frame`], [`PackedQueue::set_chain_frame`]).
    pub fn set_chain_frame(&mut self, frame: ChainFrame) -> Result<(), LayoutError> {
        match self {
            Virtqueue::Split(q) => q.set_chain_frame(frame),
            Virtqueue::Packed(q) => q.set_chain_frame(frame),
        }
    }

    /// Hands `f` the unchecked id of each used chain not taken yet
    /// ([`SplitQueue::peek_used_ids`], [`PackedQueue::peek_used_ids`]).
    #[inline]
    pub fn peek_used_ids(&self, f: impl FnMut(UsedIdHint)) {
        match self {
            Virtqueue::Split(q) => q.peek_used_ids(f),
            Virtqueue::Packed(q) => q.peek_used_ids(f),
        }
    }

    /// Takes every chain the device has used so far, handing each to `f`
    /// ([`SplitQueue::drain_used`], [`PackedQueue::drain_used`]).
    #[inline(always)]
    pub fn drain_used(&mut self, f: impl FnMut(Used<T>)) -> Result<usize, Error> {
        match self {
            Virtqueue::Split(q) => q.drain_used(f),
            Virtqueue::Packed(q) => q.drain_used(f),
        }
    }

    /// Adds the framed chain of the id [`next_id`](Self::next_id) names
    /// ([`SplitQueue::add_framed`], [`PackedQueue::add_framed`]).
    #[inline(always)]
    pub fn add_framed(&mut self, data: Buffer, data_writable: bool, token: T) -> Result<(), AddError<T>> {
        match self {
            Virtqueue::Split(q) => q.add_framed(data, data_writable, token),
            Virtqueue::Packed(q) => q.add_framed(data, data_writable, token),
        }
    }

    /// Whether framed chains go into indirect tables
    /// ([`SplitQueue::framed_chains_indirect`], [`PackedQueue::framed_chains_indirect`]).
    #[inline(always)]
    pub fn framed_chains_indirect(&self) -> bool {
        match self {
            Virtqueue::Split(q) => q.framed_chains_indirect(),
            Virtqueue::Packed(q) => q.framed_chains_indirect(),
        }
    }

    /// Chooses where framed chains go ([`SplitQueue::set_framed_chains_indirect`],
    /// [`PackedQueue::set_framed_chains_indirect`]).
    pub fn set_framed_chains_indirect(&mut self, on: bool) -> Result<(), LayoutError> {
        match self {
            Virtqueue::Split(q) => q.set_framed_chains_indirect(on),
            Virtqueue::Packed(q) => q.set_framed_chains_indirect(on),
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $q:ident => $e:expr) => {
        match $self {
            Virtqueue::Split($q) => $e,
            Virtqueue::Packed($q) => $e,
        }
    };
}

impl<T, S: SlotStorage<T>> DriverQueue<T> for Virtqueue<'_, T, S> {
    #[inline(always)]
    fn add(&mut self, readable: &[Buffer], writable: &[Buffer], token: T) -> Result<(), AddError<T>> {
        dispatch!(self, q => q.add(readable, writable, token))
    }
    #[inline(always)]
    fn publish(&mut self) -> Result<bool, Error> {
        dispatch!(self, q => q.publish())
    }
    #[inline(always)]
    fn pop_used(&mut self) -> Result<Option<Used<T>>, Error> {
        dispatch!(self, q => q.pop_used())
    }
    #[inline(always)]
    fn disable_used_notifications(&mut self) {
        dispatch!(self, q => q.disable_used_notifications())
    }
    #[inline(always)]
    fn enable_used_notifications(&mut self) -> Result<bool, Error> {
        dispatch!(self, q => q.enable_used_notifications())
    }
    #[inline(always)]
    fn enable_used_notifications_delayed(&mut self) -> Result<bool, Error> {
        dispatch!(self, q => q.enable_used_notifications_delayed())
    }
    #[inline(always)]
    fn enable_used_notifications_delayed_by(&mut self, delay: UsedDelay) -> Result<bool, Error> {
        dispatch!(self, q => q.enable_used_notifications_delayed_by(delay))
    }
    fn queue_size(&self) -> u16 {
        dispatch!(self, q => q.queue_size())
    }
    fn free_descriptors(&self) -> u16 {
        dispatch!(self, q => q.free_descriptors())
    }
    fn in_flight(&self) -> u16 {
        dispatch!(self, q => q.in_flight())
    }
    fn max_chain_buffers(&self) -> usize {
        dispatch!(self, q => q.max_chain_buffers())
    }
    fn broken(&self) -> Option<DeviceError> {
        dispatch!(self, q => q.broken())
    }
    fn layout(&self) -> RingLayout {
        dispatch!(self, q => q.layout())
    }
    fn addresses(&self) -> QueueAddresses {
        dispatch!(self, q => q.addresses())
    }
    fn reset<F: FnMut(T)>(&mut self, each: F) {
        dispatch!(self, q => q.reset(each))
    }
}
