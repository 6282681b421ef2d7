//! The compiler's second thread: whether the machine has one, asked once per
//! process (the answer reads the affinity mask and the cgroup's CPU quota),
//! and joining a scoped thread with its panic carried on.

use std::sync::OnceLock;
use std::thread::ScopedJoinHandle;

/// Whether a second thread can run beside this one (two or more cores).
pub(crate) fn second() -> bool {
    static SECOND: OnceLock<bool> = OnceLock::new();
    *SECOND.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

/// A scoped thread's result; its panic is resumed on this thread.
pub(crate) fn join<T>(handle: ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}
