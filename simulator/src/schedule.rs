//! Greedy list scheduling of a round's work on the simulator's pool.
//!
//! A round's clients differ in size (a Dirichlet partition gives one client
//! ten times another's samples), and rayon's recursive halving of a short
//! list can leave one worker with the two largest. Here every worker takes
//! the next unstarted item of one ordered list: items sorted largest first
//! make this longest-processing-time scheduling, and small items at the end
//! (slices of the central evaluation) fill the workers' idle tails. What an
//! item computes does not depend on which worker ran it, so results stay
//! the same whatever the thread count.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::ThreadPool;

/// Runs `f` on every item on all of `pool`'s workers, in list order of
/// starting; returns the results in item order.
pub fn run_queue<T, R, F>(pool: &ThreadPool, items: Vec<T>, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
{
    let n = items.len();
    if n <= 1 || pool.current_num_threads() <= 1 {
        return pool.install(|| items.into_iter().map(&f).collect());
    }
    let queue: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let done: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    pool.broadcast(|_| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = queue.get(i) else {
            break;
        };
        // Each index is taken exactly once (fetch_add), so each lock is
        // uncontended; a poisoned lock means another item panicked, which
        // rayon re-raises after the broadcast.
        let item = slot.lock().ok().and_then(|mut s| s.take());
        if let Some(item) = item {
            let r = f(item);
            if let Ok(mut d) = done[i].lock() {
                *d = Some(r);
            }
        }
    });
    done.into_iter()
        .map(|d| {
            d.into_inner()
                .ok()
                .flatten()
                .expect("every queued item ran to completion")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_item_order_whatever_the_pool() {
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let items: Vec<u64> = (0..50).rev().collect();
            let out = run_queue(&pool, items.clone(), |x| x * x);
            assert_eq!(out, items.iter().map(|x| x * x).collect::<Vec<_>>());
        }
    }

    #[test]
    fn other_workers_go_on_while_one_item_runs_long() {
        // Item 0 waits until every other item has finished: that can only
        // happen if the second worker takes them all from the list while
        // the first is busy (the timeout turns a wrong schedule into a
        // failure instead of a hang).
        use std::sync::{Condvar, Mutex};
        use std::time::Duration;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        let finished = (Mutex::new(0usize), Condvar::new());
        let out = run_queue(&pool, (0..11).collect(), |i: usize| {
            let (count, cv) = &finished;
            if i == 0 {
                let guard = count.lock().expect("lock");
                let (guard, timeout) = cv
                    .wait_timeout_while(guard, Duration::from_secs(60), |c| *c < 10)
                    .expect("lock");
                return !timeout.timed_out() && *guard == 10;
            }
            *count.lock().expect("lock") += 1;
            cv.notify_all();
            true
        });
        assert!(out.iter().all(|ok| *ok), "{out:?}");
    }
}
