//! The bridge between the synchronous API and object_store's async one, and retries.
//!
//! Every [`Target`](crate::Target) owns a small multi-threaded tokio runtime. A synchronous call
//! spawns its future onto that runtime and waits for the result on a plain channel, so it never
//! nests runtimes and never panics, whatever thread it is called from. The rule for callers:
//! the synchronous API blocks the calling thread, so async code calls it from
//! `tokio::task::spawn_blocking` (calling it on an executor thread works, but stalls that
//! executor for the duration).

use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;

use crate::error::{Error, Result};

/// The runtime a target runs its I/O on.
#[derive(Debug)]
pub(crate) struct IoRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl IoRuntime {
    pub(crate) fn new(worker_threads: usize) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .thread_name("strata-target-io")
            .enable_all()
            .build()
            .map_err(|err| Error::io("start", "the target's I/O runtime", err))?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle,
        })
    }

    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `future` on the runtime and blocks the calling thread until it is done.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        operation: &'static str,
        future: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let receiver = self.spawn(future);
        receiver.recv().map_err(|_| Error::Runtime { operation })?
    }

    /// Starts `future` on the runtime; its result arrives on the returned channel.
    pub(crate) fn spawn<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
    ) -> mpsc::Receiver<T> {
        let (sender, receiver) = mpsc::sync_channel(1);
        self.handle.spawn(async move {
            // The receiver may be gone when the caller gave up; nothing to report then.
            let _ = sender.send(future.await);
        });
        receiver
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        // `shutdown_background` never blocks, so dropping a target inside async code is safe.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// How transient store errors are retried (on top of the HTTP client's own retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, including the first (1 disables retries).
    pub attempts: u32,
    /// Delay before the first retry; each further retry waits four times longer.
    pub first_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 4,
            first_backoff: Duration::from_millis(50),
        }
    }
}

/// Whether an object_store error may go away when the request is repeated.
pub(crate) fn is_transient(err: &object_store::Error) -> bool {
    matches!(
        err,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

impl RetryPolicy {
    /// Runs `attempt` until it succeeds, fails for good, or the attempts are used up.
    pub(crate) async fn run<T, F, Fut>(&self, mut attempt: F) -> object_store::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let mut backoff = self.first_backoff;
        let mut tries = 1;
        loop {
            match attempt().await {
                Err(err) if is_transient(&err) && tries < self.attempts.max(1) => {
                    tries += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(4);
                }
                result => return result,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn generic() -> object_store::Error {
        object_store::Error::Generic {
            store: "test",
            source: "flaky".into(),
        }
    }

    #[test]
    fn transient_errors_are_retried_until_the_attempts_run_out() -> Result<()> {
        let rt = IoRuntime::new(1)?;
        let policy = RetryPolicy {
            attempts: 3,
            first_backoff: Duration::from_millis(1),
        };
        let calls = std::sync::Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let result = rt.run("test", async move {
            Ok(policy
                .run(|| {
                    let n = counted.fetch_add(1, Ordering::SeqCst);
                    async move { if n < 2 { Err(generic()) } else { Ok(n) } }
                })
                .await)
        })?;
        assert_eq!(result.ok(), Some(2));
        calls.store(0, Ordering::SeqCst);
        let counted = calls.clone();
        let result = rt.run("test", async move {
            Ok(policy
                .run(|| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async { Err::<(), _>(generic()) }
                })
                .await)
        })?;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        Ok(())
    }

    #[test]
    fn permanent_errors_are_not_retried() -> Result<()> {
        let rt = IoRuntime::new(1)?;
        let calls = std::sync::Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let result = rt.run("test", async move {
            Ok(RetryPolicy::default()
                .run(|| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async {
                        Err::<(), _>(object_store::Error::AlreadyExists {
                            path: "x".into(),
                            source: "exists".into(),
                        })
                    }
                })
                .await)
        })?;
        assert!(matches!(
            result,
            Err(object_store::Error::AlreadyExists { .. })
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        Ok(())
    }
}
