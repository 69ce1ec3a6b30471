//! The streaming calls, resumed where they broke.
//!
//! `GetMetadataAllocated` lists the ranges of a snapshot that hold data (for a full backup);
//! `GetMetadataDelta` lists the ranges that changed between a base snapshot, named by its CSI
//! handle, and a target snapshot (for an incremental). Both stream messages of tuples. When a
//! stream fails with a transient status, the call is made again with `starting_offset` set to
//! the end of the last tuple received, as the API prescribes for continuing an interrupted call
//! (KEP-3314, `starting_offset` in `schema.proto`), after an exponential backoff. A call that
//! keeps failing without progress gives up after [`FetchOptions::attempts`] tries; a reply
//! breaking the API's rules is never retried ([`Error::BadMetadata`]).

use std::time::Duration;

use strata_chain::ByteRange;
use tonic::{Code, Status, Streaming};

use super::channel::MetadataClient;
use super::collector::{Collected, Collector};
use super::proto::{
    BlockMetadata, BlockMetadataType, GetMetadataAllocatedRequest, GetMetadataAllocatedResponse,
    GetMetadataDeltaRequest, GetMetadataDeltaResponse,
};
use super::token::SecurityToken;
use crate::error::{Error, Result};

/// Which ranges to ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// `GetMetadataAllocated`: the ranges of snapshot `snapshot` that hold data.
    Allocated {
        /// Name of the VolumeSnapshot.
        snapshot: String,
    },
    /// `GetMetadataDelta`: the ranges that changed from the base snapshot to `target`.
    Delta {
        /// CSI handle of the base snapshot (its content's `status.snapshotHandle`).
        base_snapshot_id: String,
        /// Name of the target VolumeSnapshot.
        target: String,
    },
}

impl Query {
    fn call(&self) -> &'static str {
        match self {
            Query::Allocated { .. } => "GetMetadataAllocated",
            Query::Delta { .. } => "GetMetadataDelta",
        }
    }

    fn snapshot(&self, namespace: &str) -> String {
        match self {
            Query::Allocated { snapshot } => format!("{namespace}/{snapshot}"),
            Query::Delta {
                base_snapshot_id,
                target,
            } => format!("{namespace}/{target} (base {base_snapshot_id})"),
        }
    }
}

/// How the calls are made.
#[derive(Clone, Copy, Debug)]
pub struct FetchOptions {
    /// `starting_offset` of the first call.
    pub starting_offset: u64,
    /// `max_results`: tuples per message; 0 lets the service choose.
    pub max_results: i32,
    /// Tries of a call without progress before giving up (at least one).
    pub attempts: u32,
    /// Wait before the first retry; doubles with each retry without progress.
    pub initial_backoff: Duration,
    /// Longest wait between retries.
    pub max_backoff: Duration,
    /// Most ranges kept in memory; beyond, ranges are rounded to a coarser granularity
    /// ([`ChangedBlocks::granularity`]).
    pub max_ranges: usize,
}

impl Default for FetchOptions {
    /// From offset 0, the service's message size, five tries without progress, backoff from
    /// 250 ms to 8 s, and at most 1 Mi ranges (16 MiB).
    fn default() -> Self {
        FetchOptions {
            starting_offset: 0,
            max_results: 0,
            attempts: 5,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
            max_ranges: 1 << 20,
        }
    }
}

/// The ranges a service listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangedBlocks {
    /// Sorted, disjoint, non-adjacent byte ranges: what changed (or holds data).
    pub ranges: Vec<ByteRange>,
    /// The volume's size in bytes; `None` when the service sent no message.
    pub volume_capacity: Option<u64>,
    /// How the service described the ranges; `None` when it sent no message.
    pub block_metadata_type: Option<BlockMetadataType>,
    /// 1 when the ranges are exact; otherwise the power of two (4 KiB or more) every range was
    /// rounded out to, to stay within [`FetchOptions::max_ranges`].
    pub granularity: u64,
    /// Calls made: 1 when no stream broke.
    pub calls: u32,
}

impl ChangedBlocks {
    /// Total bytes the ranges cover.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.length).sum()
    }
}

/// The two response types carry the same fields.
trait Reply {
    fn fields(&self) -> (i32, i64, &[BlockMetadata]);
}

impl Reply for GetMetadataAllocatedResponse {
    fn fields(&self) -> (i32, i64, &[BlockMetadata]) {
        (
            self.block_metadata_type,
            self.volume_capacity_bytes,
            &self.block_metadata,
        )
    }
}

impl Reply for GetMetadataDeltaResponse {
    fn fields(&self) -> (i32, i64, &[BlockMetadata]) {
        (
            self.block_metadata_type,
            self.volume_capacity_bytes,
            &self.block_metadata,
        )
    }
}

/// Why one stream stopped early.
enum Stop {
    Status(Status),
    Violation(super::Violation),
}

async fn drain<R: Reply>(stream: &mut Streaming<R>, collector: &mut Collector) -> Result<(), Stop> {
    while let Some(reply) = stream.message().await.map_err(Stop::Status)? {
        let (kind, capacity, tuples) = reply.fields();
        collector
            .accept(kind, capacity, tuples)
            .map_err(Stop::Violation)?;
    }
    Ok(())
}

/// One call from the collector's cursor to the end of the stream or the first failure.
async fn call_once(
    client: &mut MetadataClient,
    token: &SecurityToken,
    namespace: &str,
    query: &Query,
    max_results: i32,
    collector: &mut Collector,
) -> Result<(), Stop> {
    let starting_offset = i64::try_from(collector.cursor()).unwrap_or(i64::MAX);
    collector.restart();
    match query {
        Query::Allocated { snapshot } => {
            let request = GetMetadataAllocatedRequest {
                security_token: token.expose().to_owned(),
                namespace: namespace.to_owned(),
                snapshot_name: snapshot.clone(),
                starting_offset,
                max_results,
            };
            let mut stream = client
                .get_metadata_allocated(request)
                .await
                .map_err(Stop::Status)?
                .into_inner();
            drain(&mut stream, collector).await
        }
        Query::Delta {
            base_snapshot_id,
            target,
        } => {
            let request = GetMetadataDeltaRequest {
                security_token: token.expose().to_owned(),
                namespace: namespace.to_owned(),
                base_snapshot_id: base_snapshot_id.clone(),
                target_snapshot_name: target.clone(),
                starting_offset,
                max_results,
            };
            let mut stream = client
                .get_metadata_delta(request)
                .await
                .map_err(Stop::Status)?
                .into_inner();
            drain(&mut stream, collector).await
        }
    }
}

/// Whether a failed call may succeed when made again: the transport broke or the service was
/// briefly unable. Refusals (bad argument, not found, unauthenticated, denied, ...) are final.
pub fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Aborted
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
    )
}

/// Streams the ranges `query` asks for in `namespace`, resuming broken streams.
pub async fn fetch(
    client: &mut MetadataClient,
    token: &SecurityToken,
    namespace: &str,
    query: &Query,
    options: &FetchOptions,
) -> Result<ChangedBlocks> {
    let mut collector = Collector::new(
        options.starting_offset,
        options.max_ranges,
        options.max_results,
    );
    let mut calls = 0u32;
    let mut failures = 0u32;
    let mut backoff = options.initial_backoff;
    loop {
        calls = calls.saturating_add(1);
        let before = collector.cursor();
        match call_once(
            client,
            token,
            namespace,
            query,
            options.max_results,
            &mut collector,
        )
        .await
        {
            Ok(()) => {
                let Collected {
                    ranges,
                    kind,
                    capacity,
                    granularity,
                } = collector.finish();
                return Ok(ChangedBlocks {
                    ranges,
                    volume_capacity: capacity,
                    block_metadata_type: kind,
                    granularity,
                    calls,
                });
            }
            Err(Stop::Violation(violation)) => {
                return Err(Error::BadMetadata {
                    call: query.call(),
                    snapshot: query.snapshot(namespace),
                    violation,
                });
            }
            Err(Stop::Status(status)) => {
                if collector.cursor() > before {
                    failures = 0;
                    backoff = options.initial_backoff;
                }
                failures += 1;
                if !is_transient(status.code()) || failures >= options.attempts {
                    return Err(Error::MetadataCall {
                        call: query.call(),
                        snapshot: query.snapshot(namespace),
                        code: status.code(),
                        calls,
                        source: Box::new(status),
                    });
                }
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2).min(options.max_backoff);
            }
        }
    }
}
