//! A seam for tests that need generations in flight: the hold gate.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// While closed, every generation pauses right after it emits its first
/// chunk — keeping its generation slot, its draft session and its target
/// session — until the gate opens or its client leaves.
///
/// End-to-end tests close it to hold generations in flight
/// deterministically (limits, queues, killed workers). HTTP/2 flow control
/// can't: the server's buffers absorb a whole short generation. The gate is
/// open unless a caller of [`crate::serve_with`] closes it; the binaries
/// never do.
#[derive(Debug, Default)]
pub struct HoldGate {
    closed: Mutex<bool>,
    changed: Condvar,
}

impl HoldGate {
    /// Generations that emit their first chunk from now on pause there.
    pub fn close(&self) {
        *self.closed.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }

    /// Whether generations are being held.
    pub fn is_closed(&self) -> bool {
        *self.closed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Paused generations go on.
    pub fn open(&self) {
        *self.closed.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.changed.notify_all();
    }

    /// Blocks while the gate is closed and `alive()` holds (checked every
    /// 50 ms, so a client that leaves frees its generation).
    pub(crate) fn pass(&self, alive: impl Fn() -> bool) {
        let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        while *closed && alive() {
            closed = self
                .changed
                .wait_timeout(closed, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn open_gate_passes_and_closed_gate_waits_until_opened_or_abandoned() {
        let gate = Arc::new(HoldGate::default());
        gate.pass(|| true);
        gate.close();
        gate.pass(|| false);
        let g = gate.clone();
        let waiter = std::thread::spawn(move || g.pass(|| true));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished());
        gate.open();
        waiter.join().unwrap();
    }
}
