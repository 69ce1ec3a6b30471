//! Tuning knobs of a target, with the defaults the memory bounds in the crate docs assume.

use std::sync::Arc;
use std::time::Duration;

use crate::runtime::RetryPolicy;

const MIB: usize = 1 << 20;

/// Tuning of uploads, reads and retries.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetOptions {
    /// Size of the body parts of a multipart upload. An image upload knows its volume's size
    /// and uses larger parts where 9,000 of these would not hold it (S3 allows 10,000); an
    /// upload without that hint doubles its parts after every 1,000. Default 16 MiB.
    pub part_size: usize,
    /// Parts of one upload in flight at once. Default 4.
    pub upload_concurrency: usize,
    /// The store's minimum size of every part but the last; an upload holds back this much of
    /// the body's start, sent last with the header as part 1. Default 5 MiB (S3's rule).
    pub min_part_size: usize,
    /// Header area reserved at the start of images written to a filesystem target. Default
    /// 2 MiB, a whole number of clusters for every cluster size.
    pub local_header_len: usize,
    /// Granule of range reads and of the read cache. Default 1 MiB.
    pub read_block_size: usize,
    /// Blocks the read cache keeps of one open image at most. Default 32.
    pub read_cache_blocks: usize,
    /// Bytes the read cache keeps over every open image of the target together, the least
    /// recently used block of any image leaving first. Default 64 MiB: a chain opens one
    /// reader per image and fetches each image's header and tables ahead (about 3 MiB an
    /// image of a 64 KiB-cluster volume), so without this bound the cache grew with the
    /// chain's depth (a 64-deep restore held some 260 MiB of it).
    pub read_cache_budget: usize,
    /// Largest read-ahead window on sequential reads. Default 16 MiB.
    pub max_readahead: usize,
    /// Largest single range GET; bigger windows are fetched as several requests in parallel.
    /// Default 4 MiB.
    pub max_request: usize,
    /// Largest range GET of a restore's planned fetch ([`crate::FetchPlanner`]): adjacent
    /// data of one image, and gaps up to [`fetch_gap`](Self::fetch_gap), is fetched in parts
    /// of up to this size. Default 8 MiB, boto3's and the AWS CLI's part size: large enough
    /// that a request's fixed cost (a round trip, the server's per-request work; on moto the
    /// assembly of the whole object) is small against its transfer, small enough that
    /// [`fetch_concurrency`](Self::fetch_concurrency) parts keep every connection busy on a
    /// small image.
    pub fetch_part_size: usize,
    /// Parts of a restore's fetch in flight or waiting to be written at once. Default 8: one
    /// GET stream rarely fills a link (S3 serves each connection at tens to a hundred MB/s),
    /// a few in parallel do; 8 x 8 MiB keeps [`fetch_memory_bound`](Self::fetch_memory_bound)
    /// at 64 MiB.
    pub fetch_concurrency: usize,
    /// Gaps between needed ranges of one image up to this size are fetched (and discarded)
    /// rather than cutting the part: one more request costs more than this many bytes.
    /// Default 1 MiB.
    pub fetch_gap: usize,
    /// Retries of transient errors.
    pub retry: RetryPolicy,
    /// Threads of the target's I/O runtime. Default 2.
    pub io_threads: usize,
    /// Store settings applied over the environment, as object_store configuration keys and
    /// values (for example `("aws_endpoint", "http://127.0.0.1:5000")`,
    /// `("aws_allow_http", "true")`). Empty by default.
    pub store_config: Vec<(String, String)>,
    /// How long a writer's lease on an object store lasts without a renewal (it renews every
    /// third of it): a writer killed mid-backup holds up the volume's next backup for about
    /// this long. Folder targets use an OS lock instead and never wait. Default 30 s; at least
    /// 300 ms and at most 10 minutes (what other writers honour).
    pub lease: Duration,
    /// Where the target reports what it waits for (a lapsing lease), for a command line to
    /// print. Silent by default.
    pub notices: Notices,
    /// Whether opening a place that holds no repository makes one there (on a filesystem
    /// target, the folder too). Default `true`, what a backup wants. A caller that only reads
    /// or removes (list, verify, restore, serve, prune, gc) sets `false`: a mistyped path or
    /// prefix is then [`Error::NotFound`](crate::Error::NotFound) of the repository, and
    /// nothing is created there (restic's `repository does not exist`).
    pub create: bool,
}

/// What receives each notice line.
type NoticeSink = dyn Fn(&str) + Send + Sync;

/// A receiver of the target's notices (one line each), such as `eprintln!`.
#[derive(Clone, Default)]
pub struct Notices(Option<Arc<NoticeSink>>);

impl Notices {
    /// Notices go to `sink`.
    pub fn new(sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(sink)))
    }

    pub(crate) fn tell(&self, line: &str) {
        if let Some(sink) = &self.0 {
            sink(line);
        }
    }
}

impl std::fmt::Debug for Notices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Notices(..)"
        } else {
            "Notices(none)"
        })
    }
}

/// Options compare equal whatever their notice receivers.
impl PartialEq for Notices {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Notices {}

impl Default for TargetOptions {
    fn default() -> Self {
        Self {
            part_size: 16 * MIB,
            upload_concurrency: 4,
            min_part_size: 5 * MIB,
            local_header_len: 2 * MIB,
            read_block_size: MIB,
            read_cache_blocks: 32,
            read_cache_budget: 64 * MIB,
            max_readahead: 16 * MIB,
            max_request: 4 * MIB,
            fetch_part_size: 8 * MIB,
            fetch_concurrency: 8,
            fetch_gap: MIB,
            retry: RetryPolicy::default(),
            io_threads: 2,
            store_config: Vec::new(),
            lease: Duration::from_secs(30),
            notices: Notices::default(),
            create: true,
        }
    }
}

impl TargetOptions {
    /// Upper bound of the memory one image upload holds: the body's held-back start, the part
    /// being filled and the parts in flight, for parts of `part_size` (images of volumes up to
    /// about 140 GiB at the defaults). Past that, parts grow to spread the volume over 9,000
    /// of them, and the bytes in flight stay within `upload_concurrency` parts of `part_size`
    /// or one part: `min_part_size` + 2 parts, about 240 MiB for a 1 TiB volume.
    pub fn upload_memory_bound(&self) -> usize {
        self.part_size
            .saturating_mul(self.upload_concurrency.saturating_add(1))
            .saturating_add(self.min_part_size)
    }

    /// Upper bound of the memory one open image's reader holds besides the caller's buffers:
    /// its share of the cache plus a full read-ahead window in flight. Over all the target's
    /// readers, the cache holds at most [`read_cache_budget`](Self::read_cache_budget).
    pub fn read_memory_bound(&self) -> usize {
        self.read_block_size
            .saturating_mul(self.read_cache_blocks)
            .min(
                self.read_cache_budget
                    .max(self.read_block_size.saturating_mul(2)),
            )
            .saturating_add(self.max_readahead)
    }

    /// Upper bound of the fetched data a planned restore holds: its parts in flight or
    /// waiting to be written (a part is larger than the part size only when one cluster is).
    pub fn fetch_memory_bound(&self) -> usize {
        self.fetch_part_size.saturating_mul(self.fetch_concurrency)
    }

    pub(crate) fn sanitized(mut self) -> Self {
        self.fetch_part_size = self.fetch_part_size.max(64 << 10);
        self.fetch_concurrency = self.fetch_concurrency.max(1);
        self.part_size = self.part_size.max(self.min_part_size).max(1);
        self.upload_concurrency = self.upload_concurrency.max(1);
        self.read_block_size = self.read_block_size.max(4096);
        self.read_cache_blocks = self.read_cache_blocks.max(2);
        self.read_cache_budget = self
            .read_cache_budget
            .max(self.read_block_size.saturating_mul(2));
        self.max_readahead = self.max_readahead.max(self.read_block_size);
        self.max_request = self.max_request.max(self.read_block_size);
        self.io_threads = self.io_threads.max(1);
        // At most the longest lease another writer honours (it judges a record by its
        // holder's lease, capped there so a hostile record cannot stall it): a longer one
        // would renew less often than others watch, and a live writer be taken over.
        self.lease = self
            .lease
            .clamp(Duration::from_millis(300), crate::liveness::MAX_LEASE);
        self
    }
}
