//! Device configuration space: the size check of every read, and the
//! configuration generation.
//!
//! # Generation
//!
//! vhost-vdpa does not expose the parent's `get_generation` to user space:
//! `VHOST_VDPA_GET_CONFIG` copies the bytes and nothing else. What it offers
//! is `VHOST_VDPA_SET_CONFIG_CALL`, an eventfd the kernel signals when the
//! device reports a configuration change. [`ConfigGeneration`] counts those
//! signals: the generation is the number of changes seen so far, so
//! [`virtio_transport_api::read_config`] (generation, read, generation) retries
//! a read that a change notification overlapped. Parents that never signal
//! (the `vdpa_sim` simulator ignores the callback) keep a constant generation,
//! which is what such a device promises anyway.

use virtio_transport_api::{EventFd, Result, Step};

use crate::backend::invalid;

/// Checks that `len` bytes at `offset` lie inside a configuration space of
/// `size` bytes (`VHOST_VDPA_GET_CONFIG_SIZE`), before the ioctl is made.
pub(crate) fn check_range(offset: u32, len: usize, size: u32) -> Result<()> {
    let end = u32::try_from(len).ok().and_then(|l| offset.checked_add(l));
    match end {
        Some(end) if end <= size => Ok(()),
        _ => Err(invalid(
            Step::Config,
            format!(
                "{len} bytes at offset {offset} exceed the device's config space of {size} bytes (VHOST_VDPA_GET_CONFIG_SIZE)"
            ),
        )),
    }
}

/// The configuration generation: the count of config-change signals seen.
#[derive(Debug)]
pub(crate) struct ConfigGeneration {
    event: EventFd,
    generation: u32,
}

impl ConfigGeneration {
    /// A counter fed by `event` (registered with `VHOST_VDPA_SET_CONFIG_CALL`).
    pub(crate) fn new(event: EventFd) -> Self {
        ConfigGeneration { event, generation: 0 }
    }

    /// The generation now: earlier value plus the signals since.
    pub(crate) fn current(&mut self) -> Result<u32> {
        let signals = self.event.drain().map_err(|e| {
            virtio_transport_api::Error::os(crate::NAME, Step::Config, e).with_context("config eventfd")
        })?;
        self.generation = self.generation.wrapping_add(signals.unwrap_or(0) as u32);
        Ok(self.generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_transport_api::Cause;

    #[test]
    fn reads_past_the_config_size_are_refused() {
        check_range(0, 60, 60).unwrap();
        check_range(56, 4, 60).unwrap();
        check_range(60, 0, 60).unwrap();
        let e = check_range(57, 4, 60).unwrap_err();
        assert_eq!(e.step(), Step::Config);
        assert!(matches!(e.cause(), Cause::InvalidArgument(_)));
        assert!(e.to_string().contains("4 bytes at offset 57 exceed the device's config space of 60 bytes"), "{e}");
        assert!(check_range(u32::MAX, 2, 60).is_err(), "no overflow");
        assert!(check_range(0, usize::MAX, 60).is_err());
    }

    #[test]
    fn generation_counts_change_signals() {
        let e = EventFd::new().unwrap();
        let mut g = ConfigGeneration::new(e.try_clone().unwrap());
        assert_eq!(g.current().unwrap(), 0);
        e.signal().unwrap();
        e.signal().unwrap();
        assert_eq!(g.current().unwrap(), 2);
        assert_eq!(g.current().unwrap(), 2);
    }
}
