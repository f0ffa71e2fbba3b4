//! The back-end is gone: a flag shared by a transport and its completion
//! events, which wakes every sleeper when it is raised.
//!
//! # Why a flag and not the socket in every wait
//!
//! A [`CompletionEvent`](crate::CompletionEvent) sleeps in `poll(2)` on its
//! eventfd alone. With the back-end's socket in the same set, every sleep
//! would register on two wait queues and every wake-up tear two down; with
//! the two in an `epoll(7)` set, every signal the device writes would run
//! epoll's callback in the device's thread before the wake-up. Instead the
//! transport watches its connection once (the vhost-user transport's
//! watchdog thread) and raises this flag when it breaks; raising it signals
//! every eventfd registered here, so each sleeper wakes, and each then sees
//! the flag.
//!
//! # Ordering
//!
//! [`Hangup::raise`] sets the flag before it signals, and registration
//! signals at once if the flag is already up, both under one lock, so an
//! eventfd registered before or after the raise is signalled after the flag
//! is set. A sleeper that clears its eventfd, checks the flag and then
//! sleeps therefore either sees the flag or is woken by the signal.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::event::EventFd;

/// The back-end-is-gone flag of one transport (see the module docs). Clones
/// share it.
#[derive(Clone, Debug, Default)]
pub struct Hangup {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    raised: AtomicBool,
    /// The eventfds to signal when the flag is raised, by registration number.
    events: Mutex<Vec<(u64, EventFd)>>,
    next: AtomicU64,
}

/// A registration of an eventfd with a [`Hangup`]; dropping it unregisters.
#[derive(Debug)]
pub(crate) struct Registration {
    hangup: Hangup,
    id: u64,
}

impl Registration {
    /// The flag this registration belongs to.
    pub(crate) fn hangup(&self) -> &Hangup {
        &self.hangup
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hangup.events().retain(|(id, _)| *id != self.id);
    }
}

impl Hangup {
    /// A flag that is not raised, with nothing registered.
    pub fn new() -> Self {
        Hangup::default()
    }

    /// Whether the back-end is gone.
    #[inline]
    pub fn is_raised(&self) -> bool {
        self.inner.raised.load(Ordering::Acquire)
    }

    /// Marks the back-end gone and signals every registered eventfd, once:
    /// later calls do nothing.
    pub fn raise(&self) {
        let events = self.events();
        if self.inner.raised.swap(true, Ordering::AcqRel) {
            return;
        }
        for (_, e) in events.iter() {
            // A failed signal leaves that sleeper to its timeout; nothing
            // better can be done from here.
            let _ = e.signal();
        }
    }

    /// Registers (a duplicate of) `event` to be signalled when the flag is
    /// raised, and signals it at once if it already is.
    pub(crate) fn register(&self, event: &EventFd) -> std::io::Result<Registration> {
        let dup = event.try_clone()?;
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let mut events = self.events();
        if self.inner.raised.load(Ordering::Acquire) {
            dup.signal()?;
        }
        events.push((id, dup));
        Ok(Registration { hangup: self.clone(), id })
    }

    fn events(&self) -> MutexGuard<'_, Vec<(u64, EventFd)>> {
        self.inner.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    fn registered(&self) -> usize {
        self.events().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_signals_every_registered_eventfd_once() {
        let h = Hangup::new();
        let (a, b) = (EventFd::new().unwrap(), EventFd::new().unwrap());
        let ra = h.register(&a).unwrap();
        let _rb = h.register(&b).unwrap();
        assert!(!h.is_raised());
        assert_eq!(a.drain().unwrap(), None);
        h.raise();
        h.raise();
        assert!(h.is_raised());
        assert_eq!(a.drain().unwrap(), Some(1));
        assert_eq!(b.drain().unwrap(), Some(1));
        assert!(ra.hangup().is_raised());
    }

    #[test]
    fn registering_after_the_raise_signals_at_once() {
        let h = Hangup::new();
        h.raise();
        let e = EventFd::new().unwrap();
        let _r = h.register(&e).unwrap();
        assert_eq!(e.drain().unwrap(), Some(1));
    }

    #[test]
    fn dropping_a_registration_unregisters_it() {
        let h = Hangup::new();
        let e = EventFd::new().unwrap();
        let r = h.register(&e).unwrap();
        let r2 = h.register(&e).unwrap();
        assert_eq!(h.registered(), 2);
        drop(r);
        assert_eq!(h.registered(), 1);
        drop(r2);
        assert_eq!(h.registered(), 0);
        h.raise();
        assert_eq!(e.drain().unwrap(), None);
    }
}
