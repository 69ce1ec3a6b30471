//! The one ordered, bounded, parallel read/transform/write engine behind convert, hydrate,
//! backup (the read-ahead scan) and the retention fold.
//!
//! A *planner* (its own thread) cuts the job into tasks, in order. *Workers* (N threads, each
//! with its own state, such as a compressor or a buffer for the backing chain's bytes) take the
//! tasks and transform them into outputs, each in a pooled page-aligned [`Buffer`]. The
//! *consumer* (the calling thread) receives the outputs in task order, with the buffer the
//! worker filled, and the buffer goes back to the pool. Work that can be done out of order
//! (hydrate writing runs at their own offsets) is done in the workers; the consumer is then the
//! in-order completion callback (progress from the finished prefix).
//!
//! # Memory
//!
//! Bounded by the [`Pipeline`]'s buffers, whatever the job's size: `buffers` buffers of
//! `buffer_len` bytes (plus a page for alignment, plus what a worker stores in a buffer's
//! [`Buffer::packed`] side vector, at most about the data's size), plus each worker's state. A
//! task holds a buffer from when a worker takes it until the consumer is done with its output,
//! so at most `buffers` tasks are taken and not yet consumed, and at most `buffers` more wait
//! planned in the queue.
//!
//! # Invariants
//!
//! - A worker takes a buffer *before* a task. Tasks are taken in order, so the lowest task not
//!   yet consumed is either done or held by a worker that has its buffer: the consumer can always
//!   make progress, whatever the number of buffers (at least one) and workers.
//! - Errors stop everything promptly: the first error (planner's, a worker's or the consumer's)
//!   is returned as soon as the consumer's thread sees it; the planner stops at its next
//!   [`Tasks::submit`], workers at their next task, and nothing waits on a thread that has gone.
//! - A worker that panics does not hang the consumer: the pipeline stops and the panic is
//!   propagated when the threads are joined.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

/// Page size the buffers are aligned to: the kernel copies out of the page cache markedly
/// faster into page-aligned memory.
pub const PAGE: usize = 4096;

/// A pooled, page-aligned byte buffer, with a side vector for what a worker derives from the
/// bytes (the compressed forms of clusters).
#[derive(Debug, Default)]
pub struct Buffer {
    bytes: Vec<u8>,
    range: Range<usize>,
    packed: Vec<u8>,
}

impl Buffer {
    /// A buffer with room for `capacity` bytes (it grows if asked for more).
    pub fn new(capacity: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(capacity + PAGE),
            range: 0..0,
            packed: Vec::new(),
        }
    }

    /// Makes the buffer `len` bytes long, starting on a page boundary, and returns them. Their
    /// content is whatever the buffer held before (zeros when new): callers fill it.
    pub fn resize(&mut self, len: usize) -> &mut [u8] {
        if self.bytes.len() < len + PAGE {
            self.bytes.resize(len + PAGE, 0);
        }
        let start = self.bytes.as_ptr().align_offset(PAGE).min(PAGE);
        self.range = start..start + len;
        &mut self.bytes[self.range.clone()]
    }

    /// The bytes set by the last [`resize`](Self::resize).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[self.range.clone()]
    }

    /// The bytes set by the last [`resize`](Self::resize), writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.range.clone()]
    }

    /// The side vector (compressed clusters, back to back).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The side vector, to fill (it keeps its capacity from task to task).
    pub fn packed_mut(&mut self) -> &mut Vec<u8> {
        &mut self.packed
    }

    /// The data bytes and the side vector at once.
    pub fn split_mut(&mut self) -> (&mut [u8], &mut Vec<u8>) {
        (&mut self.bytes[self.range.clone()], &mut self.packed)
    }
}

/// The shape of a pipeline: how many workers, how many buffers of which size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pipeline {
    workers: usize,
    buffers: usize,
    buffer_len: usize,
}

impl Pipeline {
    /// `workers` threads (at least one) and `workers + 2` buffers of `buffer_len` bytes: one a
    /// worker, one being consumed, one done and waiting, so no worker waits for the consumer
    /// while it is slower than them only now and then.
    pub fn new(workers: usize, buffer_len: usize) -> Self {
        let workers = workers.max(1);
        Self {
            workers,
            buffers: workers + 2,
            buffer_len,
        }
    }

    /// The same with `buffers` buffers (at least one).
    pub fn with_buffers(self, buffers: usize) -> Self {
        Self {
            buffers: buffers.max(1),
            ..self
        }
    }

    /// Worker threads.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Buffers, hence tasks taken and not yet consumed, at most.
    pub fn buffers(&self) -> usize {
        self.buffers
    }

    /// The bytes of data the buffers hold at most (their side vectors aside).
    pub fn memory(&self) -> usize {
        self.buffers * (self.buffer_len + PAGE)
    }

    /// Runs a job: `plan` submits the tasks in order (on a thread of its own); each of the
    /// workers makes its state with `init` and turns tasks into outputs with `work`, given a
    /// buffer; `consume` receives the outputs in task order, with their buffers, on this
    /// thread. Returns the first error, as soon as it is seen (see the module docs).
    pub fn run<T, W, O, E>(
        &self,
        plan: impl FnOnce(&mut Tasks<T>) -> Result<(), E> + Send,
        init: impl Fn() -> Result<W, E> + Sync,
        work: impl Fn(&mut W, T, &mut Buffer) -> Result<O, E> + Sync,
        mut consume: impl FnMut(O, &Buffer) -> Result<(), E>,
    ) -> Result<(), E>
    where
        T: Send,
        O: Send,
        E: Send,
    {
        let stop = AtomicBool::new(false);
        let (task_tx, task_rx) = mpsc::sync_channel::<(u64, T)>(self.buffers);
        // The workers own the receiver: when the last one leaves, a blocked planner wakes up.
        let task_rx = Arc::new(Mutex::new(task_rx));
        let (done_tx, done_rx) = mpsc::channel::<Message<O, E>>();
        let (pool_tx, pool_rx) = mpsc::channel::<Buffer>();
        let pool_rx = Mutex::new(pool_rx);
        for _ in 0..self.buffers {
            // The receiver is alive: it is ours.
            let _ = pool_tx.send(Buffer::new(self.buffer_len));
        }
        let (stop, init, work, pool_rx) = (&stop, &init, &work, &pool_rx);
        std::thread::scope(|scope| {
            let planner_done = done_tx.clone();
            scope.spawn(move || {
                let mut tasks = Tasks {
                    sender: task_tx,
                    next: 0,
                    stop,
                };
                let message = match plan(&mut tasks) {
                    Ok(()) => Message::Planned(tasks.next),
                    Err(err) => Message::Failed(err),
                };
                let _ = planner_done.send(message);
            });
            for _ in 0..self.workers {
                let (task_rx, done_tx) = (Arc::clone(&task_rx), done_tx.clone());
                scope.spawn(move || {
                    let guard = PanicGuard {
                        done: &done_tx,
                        stop,
                    };
                    let mut state = match init() {
                        Ok(state) => state,
                        Err(err) => {
                            let _ = done_tx.send(Message::Failed(err));
                            return;
                        }
                    };
                    // A buffer first, then the next task (see the module docs).
                    while let Some(mut buf) = lock_recv(pool_rx) {
                        let Some((seq, task)) = lock_recv(&task_rx) else {
                            break;
                        };
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let message = match work(&mut state, task, &mut buf) {
                            Ok(output) => Message::Done(seq, output, buf),
                            Err(err) => Message::Failed(err),
                        };
                        if done_tx.send(message).is_err() {
                            break;
                        }
                    }
                    drop(guard);
                });
            }
            drop((task_rx, done_tx));
            // Returning (on an error too) drops the pool's sender and the outputs' receiver and
            // raises `stop`, which ends the other threads at their next step.
            let _stopper = Stopper(stop);
            let (pool_tx, done_rx) = (pool_tx, done_rx);
            let mut waiting = BTreeMap::new();
            let (mut next, mut planned) = (0, None);
            // Done when every planned task is consumed: workers still waiting for a buffer
            // then see the pool close. Without a plan's end (a panic), when every thread left.
            while planned != Some(next) {
                let Ok(message) = done_rx.recv() else {
                    return Ok(());
                };
                let (seq, output, buf) = match message {
                    Message::Done(seq, output, buf) => (seq, output, buf),
                    Message::Planned(tasks) => {
                        planned = Some(tasks);
                        continue;
                    }
                    Message::Failed(err) => return Err(err),
                    // The scope re-raises the worker's panic once every thread has stopped.
                    Message::Panicked => return Ok(()),
                };
                waiting.insert(seq, (output, buf));
                while let Some((output, buf)) = waiting.remove(&next) {
                    consume(output, &buf)?;
                    let _ = pool_tx.send(buf);
                    next += 1;
                }
            }
            Ok(())
        })
    }
}

/// The planner's end of the task queue.
pub struct Tasks<'a, T> {
    sender: mpsc::SyncSender<(u64, T)>,
    next: u64,
    stop: &'a AtomicBool,
}

impl<T> Tasks<'_, T> {
    /// Queues the next task, waiting while the queue is full; `false` when the pipeline has
    /// stopped (an error, or the consumer gone): the planner should return.
    #[must_use = "a planner stops submitting once the pipeline has stopped"]
    pub fn submit(&mut self, task: T) -> bool {
        if self.stop.load(Ordering::Relaxed) || self.sender.send((self.next, task)).is_err() {
            return false;
        }
        self.next += 1;
        true
    }

    /// Tasks submitted so far.
    pub fn submitted(&self) -> u64 {
        self.next
    }
}

/// What a worker reports.
enum Message<O, E> {
    Done(u64, O, Buffer),
    /// The planner's end: how many tasks it submitted.
    Planned(u64),
    Failed(E),
    Panicked,
}

/// Tells the consumer that its worker panicked, so it stops waiting for the worker's task.
struct PanicGuard<'a, O, E> {
    done: &'a mpsc::Sender<Message<O, E>>,
    stop: &'a AtomicBool,
}

impl<O, E> Drop for PanicGuard<'_, O, E> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.stop.store(true, Ordering::Relaxed);
            let _ = self.done.send(Message::Panicked);
        }
    }
}

/// Raises the stop flag when the consumer's loop ends, however it ends.
struct Stopper<'a>(&'a AtomicBool);

impl Drop for Stopper<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn lock_recv<T>(receiver: &Mutex<mpsc::Receiver<T>>) -> Option<T> {
    receiver.lock().ok()?.recv().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Tasks 0..n, each worker sleeping longer for lower tasks, so they finish out of order.
    fn squares(pipeline: Pipeline, n: u64) -> Result<Vec<u64>, String> {
        let mut seen = Vec::new();
        pipeline.run(
            |tasks| {
                for i in 0..n {
                    if !tasks.submit(i) {
                        break;
                    }
                }
                Ok::<(), String>(())
            },
            || Ok(()),
            |(), i: u64, buf| {
                std::thread::sleep(Duration::from_micros((n - i) % 4 * 300));
                buf.resize(8).copy_from_slice(&(i * i).to_le_bytes());
                Ok(i)
            },
            |i, buf| {
                let square =
                    u64::from_le_bytes(buf.bytes().try_into().map_err(|_| "len".to_owned())?);
                assert_eq!(square, i * i, "the output travels with its buffer");
                seen.push(i);
                Ok(())
            },
        )?;
        Ok(seen)
    }

    #[test]
    fn outputs_arrive_in_task_order_when_workers_finish_out_of_order() {
        let seen = squares(Pipeline::new(4, 64), 200).unwrap();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn one_buffer_and_one_worker_still_finish() {
        let seen = squares(Pipeline::new(1, 64).with_buffers(1), 20).unwrap();
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
        let seen = squares(Pipeline::new(4, 64).with_buffers(1), 20).unwrap();
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn never_more_tasks_in_flight_than_buffers() {
        let pipeline = Pipeline::new(4, 4096).with_buffers(3);
        let (started, consumed, peak) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let addresses = Mutex::new(std::collections::BTreeSet::new());
        pipeline
            .run(
                |tasks| {
                    for i in 0..100u64 {
                        if !tasks.submit(i) {
                            break;
                        }
                    }
                    Ok::<(), String>(())
                },
                || Ok(()),
                |(), i, buf| {
                    let now = started.fetch_add(1, Ordering::SeqCst) + 1
                        - consumed.load(Ordering::SeqCst);
                    peak.fetch_max(now, Ordering::SeqCst);
                    let bytes = buf.resize(4096);
                    assert_eq!(bytes.as_ptr() as usize % PAGE, 0, "page-aligned");
                    addresses.lock().unwrap().insert(bytes.as_ptr() as usize);
                    std::thread::sleep(Duration::from_micros(i % 3 * 200));
                    Ok(())
                },
                |(), _| {
                    std::thread::sleep(Duration::from_micros(300));
                    consumed.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                },
            )
            .unwrap();
        assert!(peak.load(Ordering::SeqCst) <= 3, "{peak:?} in flight");
        assert_eq!(addresses.lock().unwrap().len(), 3, "three buffers, reused");
    }

    #[test]
    fn a_worker_error_is_returned_and_stops_the_planner() {
        let planned = AtomicUsize::new(0);
        let result = Pipeline::new(3, 64).run(
            |tasks| {
                for i in 0..1_000_000u64 {
                    planned.fetch_add(1, Ordering::SeqCst);
                    if !tasks.submit(i) {
                        break;
                    }
                }
                Ok::<(), String>(())
            },
            || Ok(()),
            |(), i, _| {
                if i == 10 {
                    Err(format!("task {i} failed"))
                } else {
                    Ok(i)
                }
            },
            |_, _| Ok(()),
        );
        assert_eq!(result, Err("task 10 failed".to_owned()));
        assert!(
            planned.load(Ordering::SeqCst) < 1000,
            "the planner stopped early"
        );
    }

    #[test]
    fn a_worker_init_error_is_returned() {
        let result = Pipeline::new(2, 64).run(
            |tasks| {
                while tasks.submit(()) {}
                Ok(())
            },
            || Err::<(), _>("no compressor".to_owned()),
            |(), (), _| Ok(()),
            |(), _| Ok(()),
        );
        assert_eq!(result, Err("no compressor".to_owned()));
    }

    #[test]
    fn a_planner_error_is_returned() {
        let result = Pipeline::new(2, 64).run(
            |tasks| {
                for i in 0..5u64 {
                    let _ = tasks.submit(i);
                }
                Err("cannot map the volume".to_owned())
            },
            || Ok(()),
            |(), i, _| Ok(i),
            |_, _| Ok(()),
        );
        assert_eq!(result, Err("cannot map the volume".to_owned()));
    }

    #[test]
    fn a_consumer_error_stops_everything_without_hanging() {
        // The planner would plan forever; workers are fast; the consumer fails at once.
        let worked = AtomicUsize::new(0);
        let result = Pipeline::new(4, 64).run(
            |tasks| {
                while tasks.submit(()) {}
                Ok(())
            },
            || Ok(()),
            |(), (), _| {
                worked.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
            |(), _| Err("disk full".to_owned()),
        );
        assert_eq!(result, Err("disk full".to_owned()));
        // At most one task a buffer, plus the ones the workers held when they saw the stop.
        assert!(
            worked.load(Ordering::SeqCst) <= 6 + 4,
            "{worked:?} tasks done"
        );
    }

    #[test]
    fn a_slow_consumer_failing_late_does_not_hang() {
        let mut consumed = 0;
        let result = Pipeline::new(2, 64).with_buffers(2).run(
            |tasks| {
                while tasks.submit(()) {}
                Ok(())
            },
            || Ok(()),
            |(), (), _| Ok(()),
            |(), _| {
                consumed += 1;
                std::thread::sleep(Duration::from_millis(1));
                if consumed == 50 {
                    Err(consumed)
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(result, Err(50));
    }

    #[test]
    fn a_worker_panic_is_propagated_not_hung() {
        let result = std::panic::catch_unwind(|| {
            Pipeline::new(3, 64).run(
                |tasks| {
                    while tasks.submit(0u8) {}
                    Ok::<(), ()>(())
                },
                || Ok(()),
                |(), _, _| -> Result<(), ()> { panic!("worker bug") },
                |(), _| Ok(()),
            )
        });
        assert!(result.is_err(), "the worker's panic reaches the caller");
    }
}
