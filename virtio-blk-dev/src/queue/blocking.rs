//! The blocking layer: `read_at`, `write_at`, `flush` and `get_id` submit
//! one internal request at a time (through the queue's bounce buffer for
//! data) and wait for it, keeping completions of the caller's own requests
//! that arrive meanwhile for [`BlkQueue::poll`].

use std::time::Instant;

use virtio_queue_core::{Buffer, DriverQueue};
use virtio_transport_api::{Cause, Error, Step, Transport};

use super::complete::Slept;
use super::submit::Data;
use super::{BlkQueue, RequestKind};
use crate::config::BlkFeatures;
use crate::error::{BlkError, Result};
use crate::spec::{ID_LEN, T_FLUSH, T_GET_ID};

impl<T: Transport> BlkQueue<T> {
    /// Waits for the internal (bounce-buffer) request, keeping others for `poll`.
    pub(super) fn wait_internal(&mut self) -> Result<()> {
        let deadline = self.io_timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(pos) = self.ready.iter().position(|c| c.internal) {
                if let Some(c) = self.ready.remove(pos) {
                    return c.result;
                }
            }
            if let Some(c) = self.next_completion() {
                if c.internal {
                    self.vq.disable_used_notifications();
                    return c.result;
                }
                self.ready.push_back(c);
                continue;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if self.sleep_for_completion(false, left) == Slept::TimedOut {
                // The ring was re-checked after the notification was
                // requested; nothing came before the deadline.
                let why = format!("no completion within {:?}", self.io_timeout.unwrap_or_default());
                let e = Error::new(self.name, Step::Wait, Cause::Disconnected(why))
                    .with_context(format!("queue {}", self.index));
                self.fail_all(&BlkError::Transport(e));
            }
        }
    }

    /// Reads `buf.len()` bytes at byte `offset` through the queue's bounce
    /// buffer and waits for them. Completions of other requests that arrive
    /// meanwhile are kept for [`BlkQueue::poll`].
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let chunk = self.bounce.len();
        let mut done = 0usize;
        while done < buf.len() {
            let n = chunk.min(buf.len() - done);
            let data = Buffer::new(self.bounce_iova, n as u32);
            self.enqueue_data(false, offset + done as u64, data, 0, true)?;
            self.publish()?;
            self.wait_internal()?;
            if let Some(out) = buf.get_mut(done..done + n) {
                self.bounce.read_bytes(0, out);
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at byte `offset` through the queue's bounce buffer and
    /// waits for the device to finish.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let chunk = self.bounce.len();
        let mut done = 0usize;
        while done < buf.len() {
            let n = chunk.min(buf.len() - done);
            if let Some(src) = buf.get(done..done + n) {
                self.bounce.write_bytes(0, src);
            }
            let data = Buffer::new(self.bounce_iova, n as u32);
            self.enqueue_data(true, offset + done as u64, data, 0, true)?;
            self.publish()?;
            self.wait_internal()?;
            done += n;
        }
        Ok(())
    }

    /// Flushes and waits.
    pub fn flush(&mut self) -> Result<()> {
        self.check_feature(BlkFeatures::FLUSH)?;
        self.enqueue(RequestKind::Flush, T_FLUSH, 0, Data::None, None, 0, true)?;
        self.publish()?;
        self.wait_internal()
    }

    /// Reads the device ID and waits.
    pub fn get_id(&mut self) -> Result<[u8; ID_LEN]> {
        let id = self.enqueue(RequestKind::GetId, T_GET_ID, 0, Data::None, None, 0, true)?;
        self.publish()?;
        self.wait_internal()?;
        Ok(self.areas.read_id(id))
    }
}
