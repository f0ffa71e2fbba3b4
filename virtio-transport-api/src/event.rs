//! Eventfds: notifiers (kicks) and completion events (used-buffer notifications).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::error::{Cause, Error, Result, Step};

/// Transport name used in errors of the eventfd helpers themselves.
const NAME: &str = "eventfd";

/// Tells the device that a queue has new available buffers (a "kick").
///
/// Implementations are cheap (one system call or one MMIO write), `Send`, and
/// never allocate.
pub trait Notifier: Send {
    /// Notifies the device.
    fn notify(&self) -> Result<()>;
}

/// A Linux eventfd (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new eventfd with counter 0, `EFD_CLOEXEC | EFD_NONBLOCK`.
    pub fn new() -> Result<Self> {
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(Error::last_os(NAME, Step::Notify).with_context("eventfd"));
        }
        // SAFETY: `fd` is a new descriptor this function owns.
        Ok(EventFd { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Adds 1 to the counter: one 8-byte write.
    pub fn signal(&self) -> std::io::Result<()> {
        let one: u64 = 1;
        loop {
            // SAFETY: writes 8 bytes from a live local `u64`.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            if n == 8 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Reads and resets the counter without blocking: `Some(count)` if it was
    /// not zero, `None` if it was (`EAGAIN`). Whoever else holds the file
    /// description (a backend that set `O_NONBLOCK` on it, for instance) does
    /// not change this behaviour.
    pub fn drain(&self) -> std::io::Result<Option<u64>> {
        let mut v: u64 = 0;
        loop {
            // SAFETY: reads at most 8 bytes into a live local `u64`.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            if n == 8 {
                return Ok(Some(v));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                _ => return Err(e),
            }
        }
    }

    /// A second descriptor for the same eventfd (`dup`, close-on-exec), for
    /// handing to a backend.
    pub fn try_clone(&self) -> std::io::Result<EventFd> {
        Ok(EventFd { fd: self.fd.try_clone()? })
    }

    /// The same eventfd (a duplicated descriptor) as the `vmm-sys-util` type that the
    /// rust-vmm `vhost` crate takes for kick, call and config eventfds.
    #[cfg(feature = "vmm-sys-util")]
    pub fn to_vmm_sys_util(&self) -> std::io::Result<vmm_sys_util::eventfd::EventFd> {
        use std::os::fd::{FromRawFd as _, IntoRawFd as _};
        let dup = self.fd.try_clone()?;
        // SAFETY: `dup` is an open eventfd descriptor owned by nothing else; its ownership
        // moves into the wrapper, which closes it on drop.
        Ok(unsafe { vmm_sys_util::eventfd::EventFd::from_raw_fd(dup.into_raw_fd()) })
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<EventFd> for OwnedFd {
    fn from(e: EventFd) -> OwnedFd {
        e.fd
    }
}

impl Notifier for EventFd {
    #[inline]
    fn notify(&self) -> Result<()> {
        self.signal().map_err(|e| Error::os(NAME, Step::Notify, e))
    }
}

/// What [`CompletionEvent::wait`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The device signalled since the last wait that reported a signal.
    Signalled,
    /// The timeout passed without a signal.
    TimedOut,
}

/// A queue's used-buffer notification: an eventfd the device signals, and
/// optionally a descriptor whose hang-up means the backend is gone (a
/// vhost-user socket), so waiting never outlives the backend.
///
/// # How waiting works
///
/// The first wait builds an `epoll(7)` set that holds the eventfd
/// edge-triggered (`EPOLLET`) and the hang-up descriptor level-triggered.
/// Every signal, a write to the eventfd, makes the eventfd ready again, so
/// each wait sleeps in one `epoll_wait` and returns once a signal arrived
/// since the last wait that reported one, without reading the eventfd: one
/// system call per sleep instead of a `poll` and a read, and the
/// registration is not rebuilt each time. It works whatever flags the
/// backend put on the shared file description (qemu-storage-daemon sets
/// `O_NONBLOCK` on it).
///
/// The eventfd's counter is therefore never reset by waiting (it would take
/// the device ~2^64 signals to fill it). A caller that also watches
/// [`CompletionEvent::eventfd`] in a level-triggered set of its own must
/// drain it there ([`EventFd::drain`]); draining does not disturb waits here.
#[derive(Debug)]
pub struct CompletionEvent {
    event: EventFd,
    hangup: Option<OwnedFd>,
    /// The epoll set of the eventfd and the hang-up descriptor, built by the
    /// first wait.
    epoll: OnceLock<OwnedFd>,
    transport: &'static str,
    queue: u16,
}

/// `epoll_event.u64` of the eventfd.
const EV_SIGNAL: u64 = 0;
/// `epoll_event.u64` of the hang-up descriptor.
const EV_HANGUP: u64 = 1;

impl CompletionEvent {
    /// A completion event of `transport`'s queue `queue`, signalled through
    /// `event`. If `hangup` is given, a `POLLHUP`, `POLLRDHUP` or `POLLERR` on
    /// it makes waits fail with [`Cause::Disconnected`].
    pub fn new(transport: &'static str, queue: u16, event: EventFd, hangup: Option<OwnedFd>) -> Self {
        CompletionEvent { event, hangup, epoll: OnceLock::new(), transport, queue }
    }

    /// The eventfd, to add to the caller's own `epoll`/`poll` set.
    pub fn eventfd(&self) -> &EventFd {
        &self.event
    }

    /// The descriptor whose hang-up means the backend is gone, if any.
    pub fn hangup_fd(&self) -> Option<BorrowedFd<'_>> {
        self.hangup.as_ref().map(|f| f.as_fd())
    }

    /// Consumes a pending signal without waiting: `Ok(true)` if there was one.
    /// Fails with [`Cause::Disconnected`] if the backend is gone and nothing
    /// was pending.
    pub fn try_consume(&self) -> Result<bool> {
        Ok(matches!(self.wait(Some(Duration::ZERO))?, Wait::Signalled))
    }

    /// Waits until the device signals or `timeout` passes (`None`: no limit).
    ///
    /// A pending signal is reported before a hang-up, so used buffers the
    /// device completed before it went away are still seen; the next wait
    /// then fails with [`Cause::Disconnected`].
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Wait> {
        let epoll = match self.epoll.get() {
            Some(fd) => fd.as_raw_fd(),
            None => self.build_epoll()?,
        };
        let deadline = timeout.map(|t| Instant::now() + t);
        // Round up so a short wait does not become a busy loop.
        let ms_of = |left: Duration| left.as_nanos().div_ceil(1_000_000).min(libc::c_int::MAX as u128) as libc::c_int;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
        // The first round sleeps for `timeout` as given (the deadline was just
        // computed from it); later ones, after a signal handler ran, for what
        // is left.
        let mut first = true;
        loop {
            let ms: libc::c_int = match (timeout, deadline) {
                (Some(t), _) if first => ms_of(t),
                (_, Some(d)) => ms_of(d.saturating_duration_since(Instant::now())),
                _ => -1,
            };
            first = false;
            // SAFETY: `events` is a live array of 2 epoll_events, and 2 is its length.
            let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as libc::c_int, ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.error(e));
            }
            let ready = &events[..n as usize];
            if ready.iter().any(|e| e.u64 == EV_SIGNAL) {
                return Ok(Wait::Signalled);
            }
            if ready.iter().any(|e| e.u64 == EV_HANGUP) {
                return Err(Error::new(
                    self.transport,
                    Step::Wait,
                    Cause::Disconnected("the backend closed its connection".into()),
                )
                .with_context(format!("queue {}", self.queue)));
            }
            if n == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Wait::TimedOut);
            }
        }
    }

    /// Builds the epoll set (see the type's docs) and keeps it; returns its
    /// descriptor.
    #[cold]
    fn build_epoll(&self) -> Result<RawFd> {
        // SAFETY: epoll_create1 has no memory arguments; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(self.error(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor this function owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let add = |target: RawFd, events: u32, tag: u64| -> Result<()> {
            let mut ev = libc::epoll_event { events, u64: tag };
            // SAFETY: `ev` is a live epoll_event; both descriptors are open.
            if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, target, &mut ev) } < 0 {
                return Err(self.error(std::io::Error::last_os_error()));
            }
            Ok(())
        };
        add(self.event.as_raw_fd(), (libc::EPOLLIN | libc::EPOLLET) as u32, EV_SIGNAL)?;
        if let Some(h) = &self.hangup {
            add(h.as_raw_fd(), libc::EPOLLRDHUP as u32, EV_HANGUP)?;
        }
        // Another thread may have built one meanwhile: keep whichever won.
        Ok(self.epoll.get_or_init(|| epoll).as_raw_fd())
    }

    fn error(&self, e: std::io::Error) -> Error {
        Error::os(self.transport, Step::Wait, e).with_context(format!("queue {}", self.queue))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_then_wait_sees_the_signal() {
        let e = EventFd::new().unwrap();
        let c = CompletionEvent::new("test", 0, e.try_clone().unwrap(), None);
        assert_eq!(c.wait(Some(Duration::ZERO)).unwrap(), Wait::TimedOut);
        e.notify().unwrap();
        e.notify().unwrap();
        assert_eq!(c.wait(Some(Duration::from_secs(1))).unwrap(), Wait::Signalled);
        // Both signals were reported by that one wait.
        assert!(!c.try_consume().unwrap());
    }

    #[test]
    fn every_signal_wakes_a_wait_whoever_drains_the_counter() {
        let e = EventFd::new().unwrap();
        let c = CompletionEvent::new("test", 0, e.try_clone().unwrap(), None);
        // A signal before the first wait (the epoll set does not exist yet).
        e.notify().unwrap();
        assert_eq!(c.wait(Some(Duration::ZERO)).unwrap(), Wait::Signalled);
        assert_eq!(c.wait(Some(Duration::ZERO)).unwrap(), Wait::TimedOut);
        // The counter is not reset by waits, yet each new signal is seen once.
        for _ in 0..3 {
            e.notify().unwrap();
            assert_eq!(c.wait(Some(Duration::from_secs(1))).unwrap(), Wait::Signalled);
            assert_eq!(c.wait(Some(Duration::ZERO)).unwrap(), Wait::TimedOut);
        }
        assert_eq!(e.drain().unwrap(), Some(4));
        // Draining is not a signal; a signal after it still is.
        assert_eq!(c.wait(Some(Duration::ZERO)).unwrap(), Wait::TimedOut);
        e.notify().unwrap();
        assert!(c.try_consume().unwrap());
        assert!(!c.try_consume().unwrap());
    }

    #[test]
    fn wait_times_out_after_about_the_timeout() {
        let c = CompletionEvent::new("test", 0, EventFd::new().unwrap(), None);
        let t = Instant::now();
        assert_eq!(c.wait(Some(Duration::from_millis(50))).unwrap(), Wait::TimedOut);
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(50) && took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn wait_wakes_on_a_signal_from_another_thread() {
        let e = EventFd::new().unwrap();
        let c = CompletionEvent::new("test", 3, e.try_clone().unwrap(), None);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            e.notify().unwrap();
        });
        assert_eq!(c.wait(None).unwrap(), Wait::Signalled);
        t.join().unwrap();
    }

    #[test]
    fn hangup_fails_the_wait_but_pending_signals_come_first() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = EventFd::new().unwrap();
        let c = CompletionEvent::new("test", 1, e.try_clone().unwrap(), Some(OwnedFd::from(a)));
        e.notify().unwrap();
        drop(b);
        assert_eq!(c.wait(Some(Duration::from_secs(1))).unwrap(), Wait::Signalled);
        let err = c.wait(Some(Duration::from_secs(5))).unwrap_err();
        assert!(err.is_disconnected(), "{err}");
        assert_eq!(err.step(), Step::Wait);
        assert!(c.try_consume().unwrap_err().is_disconnected());
    }

    #[test]
    fn drain_tolerates_a_nonblocking_empty_counter() {
        let e = EventFd::new().unwrap();
        assert_eq!(e.drain().unwrap(), None);
        e.signal().unwrap();
        assert_eq!(e.drain().unwrap(), Some(1));
        assert_eq!(e.drain().unwrap(), None);
    }
}
