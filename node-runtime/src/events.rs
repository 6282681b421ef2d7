//! The node's event bus: every state change becomes a `WatchEvent` with a sequence
//! number, broadcast to every `Watch` stream.

use std::sync::atomic::{AtomicU64, Ordering};

use proto::v1::{WatchEvent, watch_event::Event};
use tokio::sync::broadcast;

/// Broadcasts events to watchers. Slow watchers lose events (they see a gap in
/// `sequence` and should re-read `Observe`); the node never blocks on a watcher.
#[derive(Debug)]
pub struct EventBus {
    node_name: String,
    sequence: AtomicU64,
    sender: broadcast::Sender<WatchEvent>,
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|duration| duration.as_millis() as u64)
        .unwrap_or(0)
}

impl EventBus {
    /// A bus for the node named `node_name`.
    pub fn new(node_name: &str) -> Self {
        let (sender, _) = broadcast::channel(1024);
        Self {
            node_name: node_name.to_string(),
            sequence: AtomicU64::new(0),
            sender,
        }
    }

    /// Stamps and sends an event (nobody listening is fine).
    pub fn publish(&self, event: Event) {
        let _ = self.sender.send(self.stamp(event));
    }

    /// Stamps an event with the next sequence number without broadcasting it
    /// (heartbeats go only to the stream that asked for them).
    pub fn stamp(&self, event: Event) -> WatchEvent {
        WatchEvent {
            sequence: self.sequence.fetch_add(1, Ordering::Relaxed) + 1,
            at_unix_ms: now_unix_ms(),
            node_name: self.node_name.clone(),
            event: Some(event),
        }
    }

    /// A new receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.sender.subscribe()
    }
}
