//! Notification-suppression arithmetic shared by both formats and both sides.

/// The EVENT_IDX rule (§2.7.10): with `old` the index before a batch and `new`
/// the index after it, the other side asked to be notified once the index
/// passes `event`. True if `event` lies in `[old, new)`.
///
/// All three are free-running 16-bit counters, so the comparison is done in
/// wrapping arithmetic: `new - event - 1 < new - old` holds exactly when
/// `event` is one of the `new - old` values `old, old + 1, ..., new - 1`
/// modulo 2^16. This is correct across the 65535 → 0 boundary, unlike a
/// plain `old <= event < new`.
#[inline(always)]
pub const fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Packed rings name an event position as `offset | wrap << 15` (§2.8.10).
/// Converts one to a position on the same continuum as `position`, whose wrap
/// counter is `wrap`: an event of the other lap lies one ring size behind.
/// Used with [`need_event`] like the split indices.
#[inline(always)]
pub const fn packed_event_position(off_wrap: u16, wrap: bool, queue_size: u16) -> u16 {
    let event = off_wrap & 0x7fff;
    let event_wrap = off_wrap >> 15 == 1;
    if event_wrap == wrap {
        event
    } else {
        event.wrapping_sub(queue_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_in_range() {
        assert!(need_event(5, 6, 5));
        assert!(!need_event(6, 6, 5));
        assert!(!need_event(4, 6, 5));
        assert!(need_event(0, 10, 0));
        assert!(need_event(9, 10, 0));
        assert!(!need_event(10, 10, 0));
    }

    #[test]
    fn need_event_wraps_at_16_bits() {
        // Batch 65534, 65535, 0, 1: old = 65534, new = 2.
        for e in [65534u16, 65535, 0, 1] {
            assert!(need_event(e, 2, 65534), "event {e}");
        }
        for e in [65533u16, 2, 3, 30000] {
            assert!(!need_event(e, 2, 65534), "event {e}");
        }
    }

    #[test]
    fn need_event_matches_naive_on_a_continuum() {
        for old in [0u32, 100, 65500, 65535] {
            for n in 0..40u32 {
                for e in old.saturating_sub(50)..old + 90 {
                    let naive = e >= old && e < old + n;
                    let got = need_event(e as u16, (old + n) as u16, old as u16);
                    assert_eq!(got, naive, "old {old} n {n} e {e}");
                }
            }
        }
    }

    #[test]
    fn packed_event_of_previous_lap_is_behind() {
        assert_eq!(packed_event_position(3 | 0x8000, true, 10), 3);
        assert_eq!(packed_event_position(3, true, 10), 3u16.wrapping_sub(10));
        assert_eq!(packed_event_position(3, false, 10), 3);
    }
}

/// How far a delayed used-buffer notification is put off (EVENT_IDX): the
/// device is asked to notify once this share of what is in flight has been
/// used. A longer delay means fewer wake-ups per request; a shorter one
/// leaves the device more work to go on with while the driver wakes up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsedDelay {
    /// After half: keeps a block device fed at moderate queue depths.
    Half,
    /// After three quarters (Linux's `virtqueue_enable_cb_delayed`).
    ThreeQuarters,
}

impl UsedDelay {
    /// Entries (split: used chains; packed: ring positions) to let pass out
    /// of `in_flight` before the notification.
    #[inline]
    pub fn entries(self, in_flight: u16) -> u16 {
        let n = u32::from(in_flight);
        (match self {
            UsedDelay::Half => n / 2,
            UsedDelay::ThreeQuarters => n * 3 / 4,
        }) as u16
    }
}
