//! The compute thread pool: persistent workers that spin briefly between
//! jobs, so the hundreds of small parallel sections of one decode step cost
//! an atomic store each instead of a futex wake-up.
//!
//! A general work-stealing pool (rayon) parks its threads between jobs and
//! wakes them through the kernel; a SmolLM2 decode step runs ~200 matmuls of
//! a few microseconds each, and profiling showed a third of decode time in
//! `sched_yield`/futex calls. Here a job is published by bumping a generation
//! counter that idle workers watch; they take task indices from a shared
//! atomic counter (so uneven tasks balance themselves), and park on a condvar
//! only after spinning for `SPIN` without work.
//!
//! The pool serves one job at a time. A caller that finds it busy (another
//! thread's job, or a nested call from inside a task) runs its tasks inline,
//! so concurrent callers — test threads, server sessions — stay correct.
//!
//! The caller works too, and waits only for tasks that a worker has actually
//! claimed: a worker that is slow to wake (an oversubscribed machine) finds
//! no task left and never delays the job.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking. Decode issues a new job
/// every few microseconds, so a worker that waited this long is between
/// tokens or between requests.
const SPIN: Duration = Duration::from_micros(200);

/// The current job, as workers see it.
#[derive(Clone, Copy)]
struct Job {
    generation: u32,
    /// The caller's closure with its lifetime erased; see [`Pool::run`].
    task: *const (dyn Fn(usize) + Sync),
    count: usize,
}

// SAFETY: `Job::task` points to a `Sync` closure, so sending the pointer to
// another thread is sound; when it may be dereferenced is the protocol
// described in `Pool::run`.
unsafe impl Send for Job {}

struct Shared {
    /// `generation << 32 | next task index`. A task is claimed by a
    /// compare-exchange that also checks the generation, so a claim can only
    /// succeed for the job that is current.
    state: AtomicU64,
    job: Mutex<Option<Job>>,
    /// Tasks of the current job that have finished.
    done: AtomicUsize,
    sleepers: AtomicUsize,
    wake_lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
}

impl Shared {
    /// Claims the next task of job `generation`, if that job is still
    /// current and has tasks left.
    fn claim(&self, generation: u32, count: usize) -> Option<usize> {
        let mut word = self.state.load(Ordering::Acquire);
        loop {
            let index = (word & 0xffff_ffff) as usize;
            if (word >> 32) as u32 != generation || index >= count {
                return None;
            }
            match self.state.compare_exchange_weak(
                word,
                word + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(index),
                Err(now) => word = now,
            }
        }
    }

    /// Runs claimed tasks of `job` until none is left.
    ///
    /// # Safety
    /// `job.task` was valid when `job` was current; see [`Pool::run`].
    unsafe fn work(&self, job: Job) {
        while let Some(i) = self.claim(job.generation, job.count) {
            // SAFETY: the claim succeeded, so the job is current, and its
            // caller does not return (ending the closure's life) before this
            // task is counted in `done`.
            unsafe { (*job.task)(i) };
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// A fixed set of worker threads; the calling thread is the extra one, so a
/// pool of `n` threads starts `n - 1` workers.
pub struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    /// Held for the whole of a parallel job; `try_lock` failing means busy.
    submit: Mutex<()>,
}

thread_local! {
    /// Set while this thread runs pool tasks: a nested `run` goes inline.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

impl Pool {
    /// Starts a pool of `threads` threads in total (the caller included).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: Mutex::new(None),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            wake_lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        for i in 1..threads {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("nibble-worker-{i}"))
                .spawn(move || worker(&shared))
                .expect("cannot start a worker thread");
        }
        Pool {
            threads,
            shared,
            submit: Mutex::new(()),
        }
    }

    /// Threads that run a job, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `task(i)` for every `i < count`, spread over the pool, and
    /// returns when all have finished. Task order is unspecified.
    pub fn run(&self, count: usize, task: &(dyn Fn(usize) + Sync)) {
        if count == 0 {
            return;
        }
        let nested = IN_TASK.with(|f| f.get());
        let guard = if self.threads > 1 && count > 1 && !nested {
            self.submit.try_lock().ok()
        } else {
            None
        };
        let Some(_guard) = guard else {
            (0..count).for_each(task);
            return;
        };
        assert!(count < 1 << 32, "pool: too many tasks");
        let s = &*self.shared;
        let generation = ((s.state.load(Ordering::Relaxed) >> 32) as u32).wrapping_add(1);
        // SAFETY: only the lifetime is erased. The pointer is dereferenced
        // only for tasks claimed while this job is current (`Shared::claim`
        // checks the generation), and this function returns only after every
        // claimed task has finished (`done == count`); after that no claim of
        // this generation can succeed, because the next job changes it.
        let task_ptr: *const (dyn Fn(usize) + Sync) = unsafe {
            std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(task)
        };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(Job {
            generation,
            task: task_ptr,
            count,
        });
        s.done.store(0, Ordering::Relaxed);
        s.state.store((generation as u64) << 32, Ordering::Release);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        IN_TASK.with(|f| f.set(true));
        let job = Job {
            generation,
            task: task_ptr,
            count,
        };
        // SAFETY: `task` is alive for this whole call.
        unsafe { s.work(job) };
        IN_TASK.with(|f| f.set(false));
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) != count {
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                // the worker running the last task was descheduled
                std::thread::yield_now();
            }
        }
    }

    /// Runs `f(first_row, rows)` over `data` cut into runs of whole rows of
    /// `row_len` elements, spread over the pool (a few runs per thread, so
    /// uneven progress balances). A single row runs inline.
    pub fn for_rows_mut<T: Send>(
        &self,
        data: &mut [T],
        row_len: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        assert!(
            row_len > 0 && data.len().is_multiple_of(row_len),
            "for_rows_mut: partial row"
        );
        let rows = data.len() / row_len;
        let per_task = rows.div_ceil(self.threads * 4).max(1);
        let base = RowsPtr(data.as_mut_ptr());
        self.run(rows.div_ceil(per_task), &|task| {
            let first = task * per_task;
            let n = per_task.min(rows - first);
            // SAFETY: task `task` alone covers rows `first..first + n`, which
            // lie inside `data`; `data` is borrowed mutably for this whole
            // call, and `run` returns only after every task has finished.
            let run = unsafe {
                std::slice::from_raw_parts_mut(base.get().add(first * row_len), n * row_len)
            };
            f(first, run)
        });
    }
}

/// The base of a slice whose disjoint row runs go to different tasks.
struct RowsPtr<T>(*mut T);
// SAFETY: shared only by `for_rows_mut`, whose tasks take disjoint runs of
// `T: Send` elements.
unsafe impl<T: Send> Sync for RowsPtr<T> {}

impl<T> RowsPtr<T> {
    // A method, so closures capture the whole (`Sync`) wrapper rather than
    // its raw-pointer field.
    fn get(&self) -> *mut T {
        self.0
    }
}

/// A buffer that parallel tasks write in disjoint ranges (rows of a matmul's
/// output, heads of an attention output): its base pointer, shareable with
/// the pool's threads. Whoever makes one keeps the buffer mutably borrowed
/// for the whole parallel section and gives each element to one task.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(*mut f32);
// SAFETY: only used through `write` and `slice`, whose callers guarantee
// in-bounds, disjoint accesses while the buffer is borrowed for the section.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Stands for no buffer (never written through).
    pub(crate) const NONE: SharedOut = SharedOut(std::ptr::null_mut());

    pub(crate) fn new(buf: &mut [f32]) -> SharedOut {
        SharedOut(buf.as_mut_ptr())
    }

    /// Writes `buf[i] = v`.
    ///
    /// # Safety
    /// `i` is in bounds of the buffer, and no other thread writes or reads
    /// `buf[i]` during the parallel section.
    #[inline]
    pub(crate) unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.0.add(i) = v }
    }

    /// `buf[start..start + len]`.
    ///
    /// # Safety
    /// `start + len` is in bounds of the buffer, and no other live reference
    /// overlaps the range.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, Ordering::SeqCst);
        // a new generation with no job wakes the workers, which then exit
        s.state.fetch_add(1 << 32, Ordering::AcqRel);
        let _l = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
}

fn worker(s: &Shared) {
    IN_TASK.with(|f| f.set(true));
    let mut seen = 0u32;
    loop {
        seen = wait_for_job(s, seen);
        if s.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            seen = job.generation;
            // SAFETY: `job` was read from the slot, so it was current at
            // some point; `work` only runs tasks it claims while it still is.
            unsafe { s.work(job) };
        }
    }
}

/// Spins, then parks, until the generation differs from `seen`; returns it.
fn wait_for_job(s: &Shared, seen: u32) -> u32 {
    let generation = || (s.state.load(Ordering::Acquire) >> 32) as u32;
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let g = generation();
        if g != seen {
            return g;
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
            break;
        }
        std::hint::spin_loop();
    }
    s.sleepers.fetch_add(1, Ordering::SeqCst);
    let mut l = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let g = generation();
        if g != seen {
            drop(l);
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            return g;
        }
        l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
    }
}

static GLOBAL: OnceLock<Pool> = OnceLock::new();
static REQUESTED_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets the size of the global pool. Only effective before its first use;
/// returns false if the pool already runs with another size.
pub fn set_threads(n: usize) -> bool {
    REQUESTED_THREADS.store(n.max(1), Ordering::SeqCst);
    GLOBAL.get().is_none_or(|p| p.threads == n.max(1))
}

/// The process-wide pool: [`set_threads`]' size, else one thread per core.
pub fn global() -> &'static Pool {
    GLOBAL.get_or_init(|| {
        let n = match REQUESTED_THREADS.load(Ordering::SeqCst) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Pool::new(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_exactly_once() {
        let pool = Pool::new(3);
        for count in [1, 2, 3, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
            pool.run(count, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn nested_and_concurrent_calls_run_inline() {
        let pool = Arc::new(Pool::new(2));
        let total = AtomicUsize::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let sum = AtomicUsize::new(0);
                    for _ in 0..200 {
                        pool.run(5, &|i| {
                            sum.fetch_add(i, Ordering::Relaxed);
                        });
                    }
                    sum.load(Ordering::Relaxed)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 200 * 10);
        }
    }

    #[test]
    fn for_rows_mut_covers_each_row_once() {
        let pool = Pool::new(3);
        for rows in [1, 2, 5, 13, 100] {
            let mut data = vec![0usize; rows * 3];
            pool.for_rows_mut(&mut data, 3, &|first, run| {
                for (i, row) in run.chunks_mut(3).enumerate() {
                    row.iter_mut().for_each(|v| *v += first + i + 1);
                }
            });
            let want: Vec<usize> = (0..rows).flat_map(|r| [r + 1; 3]).collect();
            assert_eq!(data, want);
        }
    }

    #[test]
    fn workers_wake_after_parking() {
        let pool = Pool::new(2);
        let n = AtomicUsize::new(0);
        pool.run(2, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN * 5);
        pool.run(2, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 4);
    }
}
