//! Looking ahead in the used ring: the ids of chains the device has
//! marked used but the driver has not taken yet.
//!
//! # Why
//!
//! A driver that sleeps until the device signals wakes up to a batch of
//! used chains (dozens at a queue depth of 32 or more). Each of them sends
//! it to per-request memory the device has just written, a status byte for
//! virtio-blk, which sits in the device's cache, not the driver's: one
//! cache miss after another, each waited for in turn as the chains are
//! taken. Knowing the ids of the whole batch first, the driver can start
//! those misses together (a prefetch per id) and take the chains after.
//!
//! # The invariant
//!
//! An id seen here has **not** been checked: the device may have written
//! anything, and may still change it before [`pop_used`] or [`drain_used`]
//! reads and checks the entry. So [`UsedIdHint`] does not offer itself as
//! an index; its user bounds it before computing any address from it, and
//! uses that address only for something that cannot go wrong on a wrong id
//! (a prefetch). Looking ahead takes nothing from the queue and changes no
//! state, and it walks at most one ring's worth of entries whatever the
//! device wrote.
//!
//! [`pop_used`]: crate::SplitQueue::pop_used
//! [`drain_used`]: crate::SplitQueue::drain_used

/// The id the device wrote in a used entry not taken yet: unchecked, for a
/// hint only (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedIdHint(pub(crate) u32);

impl UsedIdHint {
    /// The id as the device wrote it: any value, bounds unknown.
    #[inline(always)]
    pub fn unchecked(self) -> u32 {
        self.0
    }
}
