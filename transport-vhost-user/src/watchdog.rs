//! The connection's watchdog: one thread per transport that bounds every
//! request by its deadline and notices when the back-end hangs up.
//!
//! * A request that runs past its deadline: the thread shuts the socket
//!   down, which makes the blocked receive return; the caller sees
//!   [`Watchdog::disarm`] report it.
//! * A hang-up (the back-end closed the socket or died, or this side shut it
//!   down): the thread raises the transport's [`Hangup`], which wakes every
//!   queue's sleeper. Queues sleep on their eventfd alone, so this is the one
//!   place that watches the socket while nothing is being sent (see
//!   [`virtio_transport_api::hangup`]).
//!
//! The thread sleeps in `poll(2)` on the socket and on an eventfd that
//! [`arm`](Watchdog::arm) and [`stop`](Watchdog::stop) signal, with the
//! deadline as the timeout. A control request pays one eventfd write to arm;
//! the data path pays nothing.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use virtio_transport_api::{EventFd, Hangup};

/// See the module docs.
pub(crate) struct Watchdog {
    state: Mutex<WatchState>,
    /// Signalled when the state changes, to end the thread's sleep.
    wake: EventFd,
}

#[derive(Default)]
struct WatchState {
    deadline: Option<Instant>,
    fired: bool,
    stop: bool,
}

impl Watchdog {
    /// Starts the thread on `sock` (a descriptor of the transport's socket),
    /// raising `hangup` when the socket hangs up.
    pub fn spawn(sock: OwnedFd, hangup: Hangup) -> std::io::Result<Arc<Watchdog>> {
        let wake = EventFd::new().map_err(|e| std::io::Error::other(e.to_string()))?;
        let w = Arc::new(Watchdog { state: Mutex::new(WatchState::default()), wake });
        let w2 = Arc::clone(&w);
        std::thread::Builder::new().name("vhost-user-watchdog".into()).spawn(move || w2.run(&sock, &hangup))?;
        Ok(w)
    }

    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self, sock: &OwnedFd, hangup: &Hangup) {
        // Until it hangs up: after that the socket stays readable for good.
        let mut watching = true;
        loop {
            let timeout_ms = {
                let mut s = self.lock();
                if s.stop {
                    return;
                }
                match s.deadline {
                    Some(d) => match d.checked_duration_since(Instant::now()).filter(|left| !left.is_zero()) {
                        Some(left) => ms_rounded_up(left),
                        None => {
                            // SAFETY: `sock` is our own descriptor of the socket.
                            unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
                            s.fired = true;
                            s.deadline = None;
                            continue;
                        }
                    },
                    None => -1,
                }
            };
            let mut fds = [
                libc::pollfd { fd: self.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                // A negative descriptor is skipped by poll.
                libc::pollfd { fd: if watching { sock.as_raw_fd() } else { -1 }, events: libc::POLLRDHUP, revents: 0 },
            ];
            // SAFETY: `fds` is a live array of 2 pollfds, and 2 is its length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            if n <= 0 {
                // A timeout (the deadline: checked above), or EINTR/ENOMEM:
                // look again.
                continue;
            }
            if fds[0].revents != 0 {
                let _ = self.wake.drain();
            }
            if fds[1].revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                watching = false;
                hangup.raise();
            }
        }
    }

    /// Gives the request being sent `timeout` to be answered.
    pub fn arm(&self, timeout: Duration) {
        self.lock().deadline = Some(Instant::now() + timeout);
        let _ = self.wake.signal();
    }

    /// Disarms; `true` if the deadline had passed and the socket was shut down.
    pub fn disarm(&self) -> bool {
        let mut s = self.lock();
        s.deadline = None;
        std::mem::take(&mut s.fired)
    }

    /// Ends the thread.
    pub fn stop(&self) {
        self.lock().stop = true;
        let _ = self.wake.signal();
    }
}

/// `d` in whole milliseconds, rounded up so a short wait does not spin, as a
/// `poll` timeout.
fn ms_rounded_up(d: Duration) -> libc::c_int {
    d.as_nanos().div_ceil(1_000_000).min(libc::c_int::MAX as u128) as libc::c_int
}
