//! Exactly-once, in-order event delivery over a link that drops: the agent's [`Outbox`] and
//! the controller's [`Inbox`], one pair per launch.
//!
//! The agent numbers each event of a launch from 1, writes it to the run directory, then
//! hands it to the outbox. The controller stores an event and only then acknowledges it
//! (cumulatively). After a reconnect the controller says, in its Welcome, the last seq it
//! stored, and the outbox resends from there; the inbox drops anything it already has. The
//! outbox holds at most `window` unacknowledged events, so a slow or absent controller slows
//! the launch down instead of growing memory or disk without bound.
//!
//! Pure state machines: no clock (time is an argument), no I/O.

use std::collections::VecDeque;

use crate::frame::{Event, EventBody};
use crate::ids::LaunchId;

/// The outbox is holding `window` unacknowledged events; wait for an ack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("launch {launch_id} has {window} unacknowledged events, the limit")]
pub struct OutboxFull {
    pub launch_id: LaunchId,
    pub window: usize,
}

/// An acknowledgement that does not fit what was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ack of seq {seq} for launch {launch_id}, but only up to seq {written} was written")]
pub struct AckBeyondWritten {
    pub launch_id: LaunchId,
    pub seq: u64,
    pub written: u64,
}

/// Agent side: the unacknowledged events of one launch.
#[derive(Debug)]
pub struct Outbox {
    launch_id: LaunchId,
    window: usize,
    /// Highest seq acknowledged by the controller.
    acked: u64,
    /// Highest seq handed out by [`Outbox::poll_transmit`] on the current connection.
    sent: u64,
    /// Events `acked + 1 ..= acked + pending.len()`.
    pending: VecDeque<Event>,
}

impl Outbox {
    /// An empty outbox for a new launch.
    pub fn new(launch_id: LaunchId, window: usize) -> Self {
        Self {
            launch_id,
            window: window.max(1),
            acked: 0,
            sent: 0,
            pending: VecDeque::new(),
        }
    }

    /// Rebuilds an outbox after a restart from the events stored after `acked`. Events must be
    /// consecutive from `acked + 1`; anything else is dropped from the first gap on and the
    /// gap is reported, since resending out of order would break the inbox.
    pub fn restore(
        launch_id: LaunchId,
        window: usize,
        acked: u64,
        events: impl IntoIterator<Item = Event>,
    ) -> Result<Self, RestoreGap> {
        let mut outbox = Self::new(launch_id, window);
        outbox.acked = acked;
        outbox.sent = acked;
        for event in events {
            if event.seq <= acked {
                continue;
            }
            let expected = outbox.last_written() + 1;
            if event.seq != expected {
                return Err(RestoreGap {
                    expected,
                    found: event.seq,
                });
            }
            outbox.pending.push_back(event);
        }
        Ok(outbox)
    }

    /// The launch this outbox belongs to.
    pub fn launch_id(&self) -> &LaunchId {
        &self.launch_id
    }

    /// The seq of the last event written into the outbox.
    pub fn last_written(&self) -> u64 {
        self.acked + self.pending.len() as u64
    }

    /// The highest seq acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Whether [`Outbox::push`] would succeed now.
    pub fn has_room(&self) -> bool {
        self.pending.len() < self.window
    }

    /// Numbers `body` as the next event. Call before writing it to disk; the returned event is
    /// what gets written and, later, sent.
    pub fn push(&mut self, body: EventBody, now_unix_ms: u64) -> Result<Event, OutboxFull> {
        if !self.has_room() {
            return Err(OutboxFull {
                launch_id: self.launch_id.clone(),
                window: self.window,
            });
        }
        let event = Event {
            launch_id: self.launch_id.clone(),
            seq: self.last_written() + 1,
            time_unix_ms: now_unix_ms,
            body,
        };
        self.pending.push_back(event.clone());
        Ok(event)
    }

    /// The next event to send on the current connection, if any.
    pub fn poll_transmit(&mut self) -> Option<Event> {
        let index = usize::try_from(self.sent - self.acked).ok()?;
        let event = self.pending.get(index)?.clone();
        self.sent = event.seq;
        Some(event)
    }

    /// The controller stored everything up to `seq`.
    pub fn on_ack(&mut self, seq: u64) -> Result<(), AckBeyondWritten> {
        if seq > self.last_written() {
            return Err(AckBeyondWritten {
                launch_id: self.launch_id.clone(),
                seq,
                written: self.last_written(),
            });
        }
        while self.acked < seq {
            self.pending.pop_front();
            self.acked += 1;
        }
        self.sent = self.sent.max(self.acked);
        Ok(())
    }

    /// A new connection: the controller has everything up to `acked_seq`; resend after it.
    pub fn resume(&mut self, acked_seq: u64) -> Result<(), AckBeyondWritten> {
        self.on_ack(acked_seq)?;
        self.sent = self.acked;
        Ok(())
    }

    /// The connection dropped: nothing unacknowledged counts as sent any more.
    pub fn on_disconnect(&mut self) {
        self.sent = self.acked;
    }

    /// Whether the final event is written and acknowledged.
    pub fn is_delivered(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Stored events of a launch are not consecutive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored events skip from seq {expected} to seq {found}")]
pub struct RestoreGap {
    pub expected: u64,
    pub found: u64,
}

/// Controller side: what has been stored for one launch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inbox {
    last_seq: u64,
}

/// What to do with an arriving event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// Store it, then acknowledge `seq`.
    Store,
    /// Already stored; acknowledge `last_seq` again and drop it.
    Duplicate { last_seq: u64 },
    /// An earlier event is missing (it will be resent after the next reconnect); drop it.
    Gap { expected: u64 },
}

impl Inbox {
    /// An inbox that already holds events up to `last_seq` (from the job store).
    pub fn with_last_seq(last_seq: u64) -> Self {
        Self { last_seq }
    }

    /// The last stored seq.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Decides about an arriving event with this `seq`.
    pub fn offer(&self, seq: u64) -> Arrival {
        if seq <= self.last_seq {
            Arrival::Duplicate {
                last_seq: self.last_seq,
            }
        } else if seq == self.last_seq + 1 {
            Arrival::Store
        } else {
            Arrival::Gap {
                expected: self.last_seq + 1,
            }
        }
    }

    /// Records that the event `seq` (decided [`Arrival::Store`]) is stored.
    pub fn stored(&mut self, seq: u64) {
        debug_assert_eq!(seq, self.last_seq + 1);
        self.last_seq = seq;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn log(i: u64) -> EventBody {
        EventBody::Log {
            step: None,
            line: format!("line {i}"),
        }
    }

    fn id() -> LaunchId {
        LaunchId::new("l").unwrap()
    }

    #[test]
    fn window_bounds_unacked_events() {
        let mut out = Outbox::new(id(), 2);
        out.push(log(1), 0).unwrap();
        out.push(log(2), 0).unwrap();
        assert!(out.push(log(3), 0).is_err());
        out.on_ack(1).unwrap();
        assert_eq!(out.push(log(3), 0).unwrap().seq, 3);
    }

    #[test]
    fn ack_beyond_written_is_refused() {
        let mut out = Outbox::new(id(), 8);
        out.push(log(1), 0).unwrap();
        assert!(out.on_ack(2).is_err());
        assert_eq!(out.acked(), 0);
    }

    #[test]
    fn restore_refuses_gaps() {
        let mut out = Outbox::new(id(), 8);
        let a = out.push(log(1), 0).unwrap();
        let _b = out.push(log(2), 0).unwrap();
        let c = out.push(log(3), 0).unwrap();
        let err = Outbox::restore(id(), 8, 0, [a, c]).unwrap_err();
        assert_eq!(
            err,
            RestoreGap {
                expected: 2,
                found: 3
            }
        );
    }

    /// Drives an outbox and an inbox over a link that disconnects at arbitrary points, losing
    /// whatever was in flight; the inbox must end up with every event exactly once, in order.
    fn run_lossy(n: u64, window: usize, script: &[(bool, u8, u8)]) -> Vec<u64> {
        let mut out = Outbox::new(id(), window);
        let mut inbox = Inbox::default();
        let mut stored = Vec::new();
        let mut produced = 0;
        let mut step = 0usize;
        let mut in_flight: VecDeque<Event> = VecDeque::new();
        while !(produced == n && out.is_delivered()) {
            let (disconnect, burst, deliver) = script[step % script.len()];
            step += 1;
            assert!(step < 100_000, "no progress");
            for _ in 0..burst % 4 + 1 {
                if produced < n && out.has_room() {
                    produced += 1;
                    out.push(log(produced), 0).unwrap();
                }
            }
            while let Some(event) = out.poll_transmit() {
                in_flight.push_back(event);
            }
            // Never two disconnects in a row, so every script makes progress.
            if disconnect && step.is_multiple_of(2) {
                in_flight.clear();
                out.on_disconnect();
                out.resume(inbox.last_seq()).unwrap();
                continue;
            }
            for _ in 0..deliver % 3 + 1 {
                let Some(event) = in_flight.pop_front() else {
                    break;
                };
                match inbox.offer(event.seq) {
                    Arrival::Store => {
                        inbox.stored(event.seq);
                        stored.push(event.seq);
                        out.on_ack(event.seq).unwrap();
                    }
                    Arrival::Duplicate { last_seq } => out.on_ack(last_seq).unwrap(),
                    Arrival::Gap { expected } => {
                        panic!("gap: expected {expected}, got {}", event.seq)
                    }
                }
            }
        }
        stored
    }

    proptest! {
        #[test]
        fn lossy_link_delivers_exactly_once_in_order(
            n in 0u64..200,
            window in 1usize..16,
            script in proptest::collection::vec((prop::bool::weighted(0.1), any::<u8>(), any::<u8>()), 1..64),
        ) {
            let stored = run_lossy(n, window, &script);
            prop_assert_eq!(stored, (1..=n).collect::<Vec<_>>());
        }
    }
}
