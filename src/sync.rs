//! The one way this crate takes a std mutex.
//!
//! Every critical section here leaves its data consistent (a push, a pop, a
//! map update), so a panic in another thread while it held a lock must not
//! take the node down with a poisoned mutex: the lock is recovered.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, recovering it if a panic elsewhere poisoned it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
