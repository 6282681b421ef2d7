//! Group commit: writes that arrive together share one durable transaction. The
//! first caller to take the lead commits every item queued until then; those queued
//! behind it find theirs settled (committed or failed) when they get the lead.

use std::sync::{Mutex, MutexGuard, PoisonError};

use super::RecordsError;

/// Items waiting for the next group commit, and how past groups ended.
#[derive(Debug)]
pub(super) struct GroupCommit<T> {
    queue: Mutex<Queue<T>>,
    /// Held by the caller committing a group.
    leader: Mutex<()>,
}

#[derive(Debug)]
struct Queue<T> {
    queued: Vec<T>,
    /// Tickets handed out (one per item), and the highest one committed or failed.
    issued: u64,
    settled: u64,
    /// Recent groups that failed: (first ticket, last ticket, why).
    failed: Vec<(u64, u64, String)>,
}

impl<T> Default for GroupCommit<T> {
    fn default() -> Self {
        Self {
            queue: Mutex::new(Queue {
                queued: vec![],
                issued: 0,
                settled: 0,
                failed: vec![],
            }),
            leader: Mutex::default(),
        }
    }
}

impl<T> GroupCommit<T> {
    fn queue(&self) -> MutexGuard<'_, Queue<T>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item` and returns once it is committed by `commit` (this caller's
    /// call with every item queued, or an earlier caller's); `Err` when the group
    /// it was committed in failed.
    pub(super) fn submit(
        &self,
        item: T,
        commit: impl FnOnce(&[T]) -> Result<(), RecordsError>,
    ) -> Result<(), RecordsError> {
        let ticket = {
            let mut queued = self.queue();
            queued.queued.push(item);
            queued.issued += 1;
            queued.issued
        };
        let _leader = self.leader.lock().unwrap_or_else(PoisonError::into_inner);
        let (batch, first, last) = {
            let mut queued = self.queue();
            if queued.settled >= ticket {
                return match queued
                    .failed
                    .iter()
                    .find(|(first, last, _)| (*first..=*last).contains(&ticket))
                {
                    Some((_, _, message)) => Err(RecordsError::Redb {
                        operation: "commit",
                        message: message.clone(),
                    }),
                    None => Ok(()),
                };
            }
            let batch = std::mem::take(&mut queued.queued);
            (batch, queued.settled + 1, queued.issued)
        };
        let committed = commit(&batch);
        let mut queued = self.queue();
        queued.settled = last;
        if let Err(error) = &committed {
            queued.failed.push((first, last, error.to_string()));
            let excess = queued.failed.len().saturating_sub(64);
            queued.failed.drain(..excess);
        }
        committed
    }
}
