//! Used-buffer notifications: MSI-X vectors routed to eventfds (`VFIO_DEVICE_SET_IRQS`),
//! and the polling fallback for queues that get no vector of their own.
//!
//! With enough vectors, vector 0 is the configuration-change vector and queue `i` gets
//! vector `i + 1` (the layout Linux uses). With fewer, the queues take what there is, from
//! queue 0 on, and the configuration vector is left out; a queue without a vector — or whose
//! `queue_msix_vector` reads back `VIRTIO_MSI_NO_VECTOR` because the device refused it —
//! gets a [`CompletionEvent`](virtio_transport_api::CompletionEvent) that a [`Ticker`] thread signals every poll interval, so a
//! wait on it becomes a periodic check of the ring instead of a sleep that never ends.
//! Vectors are never shared between queues: one eventfd read by two waiters loses wake-ups.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_transport_api::EventFd;

/// How queues are told about used buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interrupts {
    /// MSI-X vectors where the device has them, polling for the rest (the default).
    Msix,
    /// No interrupts at all: every queue's completion event is signalled by a timer.
    Polling,
}

/// How one queue learns about used buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueInterrupt {
    /// Its own MSI-X vector.
    Msix(u16),
    /// The polling timer (no vector, or the device refused one).
    Polling,
}

/// Which MSI-X vector goes where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VectorPlan {
    /// Vectors to enable (0 = MSI-X unused).
    pub vectors: u16,
    /// The configuration-change vector.
    pub config: Option<u16>,
    /// Vectors of the first `vectors` queues (queue `i` is entry `i`); later queues poll.
    pub queues: Vec<u16>,
}

impl VectorPlan {
    /// The plan for a device with an MSI-X table of `table_size` entries and `num_queues`
    /// queues.
    pub fn new(table_size: u32, num_queues: u16) -> Self {
        let want = u32::from(num_queues) + 1;
        if table_size >= want {
            return VectorPlan { vectors: want as u16, config: Some(0), queues: (1..=num_queues).collect() };
        }
        let n = table_size.min(u32::from(num_queues)) as u16;
        VectorPlan { vectors: n, config: None, queues: (0..n).collect() }
    }

    /// No vectors at all.
    pub fn none() -> Self {
        VectorPlan { vectors: 0, config: None, queues: Vec::new() }
    }

    /// The vector of queue `index`, if it has one.
    pub fn queue(&self, index: u16) -> Option<u16> {
        self.queues.get(usize::from(index)).copied()
    }
}

struct TickerShared {
    events: Mutex<Vec<EventFd>>,
    stop: AtomicBool,
}

/// A thread that signals every registered eventfd once per interval: the completion events
/// of polled queues. Stopped and joined on drop.
pub struct Ticker {
    shared: Arc<TickerShared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Ticker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticker").finish_non_exhaustive()
    }
}

impl Ticker {
    /// Starts the thread.
    pub fn spawn(interval: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(TickerShared { events: Mutex::new(Vec::new()), stop: AtomicBool::new(false) });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("uvirtio-pci-poll".into()).spawn(move || {
            while !s.stop.load(Ordering::Acquire) {
                std::thread::park_timeout(interval);
                let events = s.events.lock().unwrap_or_else(|p| p.into_inner());
                for e in events.iter() {
                    let _ = e.signal();
                }
            }
        })?;
        Ok(Ticker { shared, thread: Some(thread) })
    }

    /// Signals `event` from now on.
    pub fn add(&self, event: EventFd) {
        self.shared.events.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }

    /// Forgets every event (the device was reset; their queues are gone).
    pub fn clear(&self) {
        self.shared.events.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_transport_api::{CompletionEvent, Wait};

    #[test]
    fn enough_vectors_give_config_and_one_per_queue() {
        let p = VectorPlan::new(3, 2);
        assert_eq!(p, VectorPlan { vectors: 3, config: Some(0), queues: vec![1, 2] });
        assert_eq!(p.queue(1), Some(2));
        assert_eq!(p.queue(2), None);
        assert_eq!(VectorPlan::new(64, 2).vectors, 3, "only what is needed is enabled");
    }

    #[test]
    fn short_vectors_go_to_queues_first_and_the_rest_poll() {
        assert_eq!(VectorPlan::new(2, 2), VectorPlan { vectors: 2, config: None, queues: vec![0, 1] });
        let p = VectorPlan::new(2, 4);
        assert_eq!(p.queues, vec![0, 1]);
        assert_eq!(p.queue(3), None);
        assert_eq!(VectorPlan::new(0, 4), VectorPlan::none());
        assert_eq!(VectorPlan::new(u32::MAX, u16::MAX).queues.len(), usize::from(u16::MAX));
    }

    #[test]
    fn ticker_wakes_a_polled_wait_and_stops_on_drop() {
        let t = Ticker::spawn(Duration::from_millis(2)).unwrap();
        let e = EventFd::new().unwrap();
        t.add(e.try_clone().unwrap());
        let c = CompletionEvent::new("pci", 0, e);
        assert!(matches!(c.clear().unwrap().wait(Some(Duration::from_secs(5))).unwrap(), Wait::Signalled));
        t.clear();
        // A tick that landed before `t.clear()` is taken by this clear.
        assert_eq!(
            c.clear().unwrap().wait(Some(Duration::from_millis(20))).unwrap(),
            Wait::TimedOut,
            "cleared: no more ticks"
        );
        drop(t);
    }
}
