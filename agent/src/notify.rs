//! systemd's service notifications (`sd_notify`): `READY=1` once a binary can do its job, and
//! `WATCHDOG=1` at half the watchdog interval while its runtime is alive. Without
//! `NOTIFY_SOCKET` (not run by systemd with `Type=notify`) every call is a no-op.
//!
//! Shared by both binaries, like [`crate::logging`].

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// What the service manager asked for, read once by `main`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Notifier {
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `WATCHDOG_USEC`/`WATCHDOG_PID` (the only environment this module reads; the
    /// socket itself is read by `sd_notify` on each send).
    pub fn from_env() -> Notifier {
        Notifier {
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    /// The watchdog interval systemd expects pings within, if it set one.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Tells systemd the service is ready, with a status line, and starts the watchdog
    /// pings (until `cancel`).
    pub fn ready(&self, status: &str, cancel: &CancellationToken) {
        if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
            tracing::warn!(error = %e, "cannot notify systemd of readiness");
        }
        if let Some(interval) = self.watchdog {
            let period = (interval / 2).max(Duration::from_millis(10));
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
                                tracing::warn!(error = %e, "cannot ping the systemd watchdog");
                            }
                        }
                        () = cancel.cancelled() => break,
                    }
                }
            });
        }
    }

    /// Tells systemd the service is stopping.
    pub fn stopping(&self) {
        let _ = sd_notify::notify(&[NotifyState::Stopping]);
    }
}
