//! Completion: the status byte, the request's state and buffers back to the
//! caller (`poll`, `wait`), and failing every request in flight when the
//! transport dies or the device breaks the ring.
//!
//! Ids come back from the core queue only after it has checked what the
//! device wrote (see [`super::Requests`]), so the state of the id is the
//! request's. Only the status byte is read from device memory here; any
//! value other than OK becomes a typed error.

use std::time::{Duration, Instant};

use virtio_queue_core::{DriverQueue, Used, UsedDelay, Virtqueue};
use virtio_transport_api::{Cause, Error, Step, Transport, Wait};

use super::areas::RequestAreas;
use super::{BlkQueue, Completion, ReqState, RequestKind, Requests, S_PRESET};
use crate::error::{BlkError, DeviceStatus};
use crate::spec::{S_IOERR, S_OK, S_UNSUPP};

/// The error of a status byte other than OK.
#[cold]
fn status_error(status: u8) -> BlkError {
    BlkError::Device(match status {
        S_IOERR => DeviceStatus::IoErr,
        S_UNSUPP => DeviceStatus::Unsupp,
        S_PRESET => DeviceStatus::NotWritten,
        v => DeviceStatus::Other(v),
    })
}

impl Requests {
    /// Request `id`, which the ring just handed back (the id is free again),
    /// to `f`. On the hot path (status OK, not a GET_ID: one comparison of
    /// the status word) the completion is built straight into its consumer,
    /// with a constant `result` and `id`; the other cases go through
    /// [`complete_slow`], out of line, which goes by the request's kind.
    ///
    /// # Safety
    ///
    /// `id` must be a token the core queue handed back (as for
    /// [`Requests::ring_id`]).
    #[inline(always)]
    unsafe fn complete<F: FnMut(Completion)>(&mut self, areas: &RequestAreas, id: u16, f: &mut F) {
        // The status byte and, above it, the slow-path mark (see `W_SLOW`).
        // SAFETY: `id` is a token of the core queue (the caller's promise).
        let word = unsafe { areas.status_word(id) };
        // SAFETY: `id` is a token of the core queue (the caller's promise).
        let r = unsafe { self.ring_id(id) };
        if word != u64::from(S_OK) {
            return complete_slow(areas, std::mem::take(r), word as u8, id, f);
        }
        let bufs = std::mem::take(&mut r.bufs);
        f(Completion { tag: r.tag, kind: r.kind, result: Ok(()), bufs, id: None, internal: r.internal })
    }
}

/// [`Requests::complete`] for a request that failed or was a GET_ID.
#[cold]
#[inline(never)]
fn complete_slow<F: FnMut(Completion)>(areas: &RequestAreas, r: ReqState, status: u8, id: u16, f: &mut F) {
    let result = if status == S_OK { Ok(()) } else { Err(status_error(status)) };
    let id = if r.kind == RequestKind::GetId && result.is_ok() { Some(areas.read_id(id)) } else { None };
    f(Completion { tag: r.tag, kind: r.kind, result, bufs: r.bufs, id, internal: r.internal })
}

impl<T: Transport> BlkQueue<T> {
    /// Completes every request in flight with (a copy of) `err`, forgetting
    /// the ring: after a broken ring or a dead transport.
    pub(super) fn fail_all(&mut self, err: &BlkError) {
        match err {
            BlkError::Transport(e) if self.dead.is_none() => self.dead = Some((e.transport(), e.to_string())),
            BlkError::Queue(e) if self.broken.is_none() => self.broken = Some(*e),
            _ => {}
        }
        self.failed = self.dead.is_some() || self.broken.is_some();
        if self.failed {
            self.fast.close();
        }
        let mut ids = Vec::new();
        self.vq.reset(|id| ids.push(id));
        for id in ids {
            let r = self.reqs.state.get_mut(id as usize).map(std::mem::take).unwrap_or_default();
            let result = Err(match err {
                BlkError::Transport(e) => {
                    BlkError::Transport(Error::new(e.transport(), e.step(), Cause::Disconnected(e.to_string())))
                }
                BlkError::Queue(e) => BlkError::Queue(*e),
                other => BlkError::Transport(Error::new(
                    "virtio-blk",
                    Step::Queue(self.index),
                    Cause::Protocol(other.to_string()),
                )),
            });
            self.ready.push_back(Completion {
                tag: r.tag,
                kind: r.kind,
                result,
                bufs: r.bufs,
                id: None,
                internal: r.internal,
            });
        }
        self.unpublished = false;
    }

    /// Pops one completion from the ring.
    #[inline(always)]
    fn pop_ring(&mut self) -> Option<Completion> {
        match self.vq.pop_used() {
            Ok(Some(used)) => {
                let mut out = None;
                // SAFETY: a token the core queue handed back.
                unsafe { self.reqs.complete(&self.areas, used.token, &mut |c| out = Some(c)) };
                out
            }
            Ok(None) => None,
            Err(e) => self.ring_broken(e),
        }
    }

    /// The next completion set aside or from the ring, after publishing what
    /// was submitted (no system call other than that kick).
    pub(super) fn next_completion(&mut self) -> Option<Completion> {
        if self.unpublished {
            let _ = self.publish();
        }
        if let Some(c) = self.ready.pop_front() {
            return Some(c);
        }
        self.pop_ring()
    }

    /// The device broke the ring: fail everything in flight, return the first.
    #[cold]
    #[inline(never)]
    fn ring_broken(&mut self, e: virtio_queue_core::Error) -> Option<Completion> {
        self.fail_all(&BlkError::Queue(e));
        self.ready.pop_front()
    }

    /// [`BlkQueue::poll`] with completions set aside or requests to publish.
    #[cold]
    #[inline(never)]
    fn poll_slow(&mut self) -> Option<Completion> {
        self.next_completion()
    }

    /// The next finished request, if any, without waiting or making a system
    /// call (other than a kick for requests not yet published).
    #[inline]
    pub fn poll(&mut self) -> Option<Completion> {
        if self.unpublished | !self.ready.is_empty() {
            return self.poll_slow();
        }
        self.pop_ring()
    }

    /// Hands every finished request available now to `f`, in completion
    /// order, and returns how many; like calling [`BlkQueue::poll`] until it
    /// returns `None` (with the same kick for requests not yet published),
    /// but the ring format is dispatched once per call instead of once per
    /// request and each [`Completion`] goes straight to `f` instead of being
    /// returned through an `Option`: the cheaper way to drain a deep queue.
    #[inline]
    pub fn poll_each<F: FnMut(Completion)>(&mut self, mut f: F) -> usize {
        let mut n = 0;
        if self.unpublished | !self.ready.is_empty() {
            n += self.poll_each_slow(&mut f);
        }
        // One drain per ring format, each with its own inlined copy of `f`:
        // the format is dispatched once per call, and each used chain goes
        // straight from the ring to `f`.
        let (reqs, areas) = (&mut self.reqs, &self.areas);
        let drained = match &mut self.vq {
            Virtqueue::Split(q) => q.drain_used(|used: Used<u16>| {
                // SAFETY: a token the core queue handed back.
                unsafe { reqs.complete(areas, used.token, &mut f) }
            }),
            Virtqueue::Packed(q) => q.drain_used(|used: Used<u16>| {
                // SAFETY: a token the core queue handed back.
                unsafe { reqs.complete(areas, used.token, &mut f) }
            }),
        };
        match drained {
            Ok(k) => n + k,
            // The chains before the bad one went to `f`.
            Err(_) => n + self.poll_each_broken(&mut f),
        }
    }

    /// The completions set aside, after publishing, for [`BlkQueue::poll_each`].
    #[cold]
    #[inline(never)]
    fn poll_each_slow<F: FnMut(Completion)>(&mut self, f: &mut F) -> usize {
        if self.unpublished {
            let _ = self.publish();
        }
        let n = self.ready.len();
        while let Some(c) = self.ready.pop_front() {
            f(c);
        }
        n
    }

    /// The device broke the ring during [`BlkQueue::poll_each`]: every
    /// request in flight completes with the error. The error is the one the
    /// core queue keeps (`pop_used` fails only on a broken ring), read here
    /// rather than carried out of the drain loop, whose hot path then never
    /// holds it.
    #[cold]
    #[inline(never)]
    fn poll_each_broken<F: FnMut(Completion)>(&mut self, f: &mut F) -> usize {
        let e = match self.vq.broken() {
            Some(e) => virtio_queue_core::Error::Broken(e),
            // Not reached (see above); fail the queue all the same.
            None => virtio_queue_core::Error::QueueFull,
        };
        self.fail_all(&BlkError::Queue(e));
        self.poll_each_slow(f)
    }

    /// Makes [`BlkQueue::wait`] batch completions: with EVENT_IDX negotiated
    /// it asks the device to signal only once half of the published requests
    /// in flight have completed (at least one), instead of after the first.
    /// Half, not Linux's three quarters: the other half keeps the device busy
    /// while this thread wakes up (measured with `cargo xtask compare`: at
    /// queue depth 32 on qemu-storage-daemon three quarters let the device run
    /// dry and cost a third of the IOPS). A deep queue then takes one wake-up for many
    /// completions (drain them with [`BlkQueue::poll`] after `wait` returns),
    /// which saves CPU per request at the price of latency for the first
    /// completions of each batch. Without EVENT_IDX it changes nothing. Off by
    /// default.
    pub fn set_batch_completions(&mut self, on: bool) {
        self.batch_completions = on;
    }

    /// Hybrid waiting: with `Some(limit)`, a [`BlkQueue::wait`] with at most
    /// two requests in flight polls the used ring for up to `limit` before it
    /// sleeps, and one that runs out of time makes the next 1, 2, 4 … 64
    /// waits skip the spin until a spin finds its completion again. Off
    /// (`None`) by default: then every wait that finds nothing sleeps.
    ///
    /// A spin pays while the device answers faster than a sleep and a
    /// wake-up cost; at depth, batched sleeps serve many completions each and
    /// spinning would only burn CPU, hence the depth limit. Against
    /// qemu-storage-daemon at depth 1, a 10 µs limit gave ~5× the IOPS of
    /// sleeping at half the CPU per request (figures and the command in
    /// `virtio-blk-dev/README.md`).
    pub fn set_spin_before_sleep(&mut self, limit: Option<Duration>) {
        self.spin = limit.map(super::spin::SpinWait::new);
    }

    /// The limit set with [`BlkQueue::set_spin_before_sleep`].
    pub fn spin_before_sleep(&self) -> Option<Duration> {
        self.spin.as_ref().map(|s| s.limit())
    }

    /// Waits up to `timeout` (`None`: no limit) for the next finished
    /// request. Returns `None` on timeout or when nothing is in flight. A
    /// backend that goes away completes every request in flight with a
    /// [`BlkError::Transport`] error. With
    /// [`set_spin_before_sleep`](BlkQueue::set_spin_before_sleep) it may poll
    /// for a while before it sleeps.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Option<Completion> {
        let deadline = timeout.map(|t| Instant::now() + t);
        // The first sleep takes `timeout` as it is (the deadline was just
        // computed from it): a wait that sleeps once reads the clock once.
        let mut first = true;
        loop {
            if let Some(c) = self.poll() {
                self.vq.disable_used_notifications();
                return Some(c);
            }
            let in_flight = self.vq.in_flight() as usize;
            if in_flight == 0 {
                return None;
            }
            if first && self.spin.is_some() {
                if let Some(c) = self.spin_for_completion(in_flight, timeout) {
                    return Some(c);
                }
                // The sleep gets what the spin left of the timeout.
                first = false;
            }
            let left = match std::mem::take(&mut first) {
                true => timeout,
                false => deadline.map(|d| d.saturating_duration_since(Instant::now())),
            };
            if self.sleep_for_completion(self.batch_completions, left) == Slept::TimedOut {
                let c = self.poll();
                self.vq.disable_used_notifications();
                return c;
            }
        }
    }

    /// The spin of hybrid waiting, if it is on and wanted at `in_flight`,
    /// never longer than the wait's `timeout`.
    fn spin_for_completion(&mut self, in_flight: usize, timeout: Option<Duration>) -> Option<Completion> {
        let mut spin = self.spin?;
        let found = if spin.should_spin(in_flight) { spin.spin(timeout, || self.poll()) } else { None };
        self.spin = Some(spin);
        found
    }

    /// Clears the completion event, asks for a used-buffer notification
    /// (after half of the requests in flight if `delayed`), then re-checks the
    /// ring and sleeps on the event only if nothing raced with the request
    /// (the order [`CompletionEvent`](virtio_transport_api::CompletionEvent)
    /// asks for). Callers come here after they have resubmitted and kicked, so
    /// the read that clears the event is not between a wake-up and the next
    /// request. A broken ring or a failed wait completes everything in flight
    /// (`fail_all`): the caller's next poll sees it. Only a deadline that
    /// passes gives [`Slept::TimedOut`].
    pub(super) fn sleep_for_completion(&mut self, delayed: bool, left: Option<Duration>) -> Slept {
        let cleared = match self.event.clear() {
            Ok(c) => c,
            Err(e) => {
                self.fail_all(&BlkError::Transport(e));
                return Slept::Ready;
            }
        };
        let armed = if delayed {
            self.vq.enable_used_notifications_delayed_by(UsedDelay::Half)
        } else {
            self.vq.enable_used_notifications()
        };
        let slept = match armed {
            Ok(true) => return Slept::Ready,
            Ok(false) => cleared.wait(left),
            Err(e) => {
                self.fail_all(&BlkError::Queue(e));
                return Slept::Ready;
            }
        };
        self.waits += 1;
        match slept {
            Ok(Wait::Signalled) => {
                // The batch that woke us is in the device's cache: start
                // fetching every request's status line before taking any.
                let areas = &self.areas;
                self.vq.peek_used_ids(|hint| areas.prefetch_status(hint));
                Slept::Ready
            }
            Ok(Wait::TimedOut) => Slept::TimedOut,
            Err(e) => {
                self.fail_all(&BlkError::Transport(e));
                Slept::Ready
            }
        }
    }
}

/// What [`BlkQueue::sleep_for_completion`] ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slept {
    /// Something may be ready: poll.
    Ready,
    /// The deadline passed with nothing signalled.
    TimedOut,
}
