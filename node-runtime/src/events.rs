//! The node's event bus: every state change becomes a `WatchEvent`, broadcast to
//! every `Watch` stream, which numbers the events it sends (`service.rs`).

use proto::v1::{WatchEvent, watch_event::Event};
use tokio::sync::broadcast;

/// Broadcasts events to watchers. Slow watchers lose events (their stream counts
/// what they missed into its `sequence`, and they should re-read `Observe`); the node
/// never blocks on a watcher.
#[derive(Debug)]
pub struct EventBus {
    node_name: String,
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
            sender,
        }
    }

    /// Stamps and sends an event (nobody listening is fine).
    pub fn publish(&self, event: Event) {
        let _ = self.sender.send(self.stamp(event));
    }

    /// Stamps an event with the time and the node's name, without broadcasting it
    /// (heartbeats go only to the stream that asked for them). Its `sequence` is the
    /// stream's to set: one counter for every stream made each stream's heartbeats
    /// gaps in the others'.
    pub fn stamp(&self, event: Event) -> WatchEvent {
        WatchEvent {
            sequence: 0,
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
