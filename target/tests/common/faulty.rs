//! An object store that fails on purpose: the Nth request, a given part upload, or a read that
//! comes back short. Wraps `InMemory`, so it is both an `ObjectStore` and a `MultipartStore`.

use std::fmt;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartId, MultipartUpload,
    ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// Which requests fail.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    /// Requests numbered from 1 that fail (each with a transient error).
    pub fail_requests: Range<usize>,
    /// Part index whose uploads fail, and how many times.
    pub fail_part: Option<(usize, usize)>,
    /// How many ranged reads come back one byte short.
    pub short_reads: usize,
    /// How long every GET waits before it is answered: a store across a slow network.
    pub get_delay: std::time::Duration,
}

#[derive(Debug, Default)]
pub struct FaultyStore {
    inner: InMemory,
    plan: Mutex<Plan>,
    requests: AtomicUsize,
    pub aborts: AtomicUsize,
    pub open_uploads: AtomicUsize,
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore")
    }
}

fn injected(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultyStore",
        source: format!("injected failure: {what}").into(),
    }
}

impl FaultyStore {
    pub fn set_plan(&self, plan: Plan) {
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = plan;
    }

    /// Fail requests numbered `from..to` counted from now.
    pub fn fail_next(&self, from: usize, to: usize) {
        let now = self.requests();
        self.set_plan(Plan {
            fail_requests: now + from..now + to,
            ..Plan::default()
        });
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn count(&self, what: &str) -> Result<()> {
        let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        if plan.fail_requests.contains(&n) {
            return Err(injected(what));
        }
        Ok(())
    }

    fn part_fails(&self, index: usize) -> bool {
        let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        match &mut plan.fail_part {
            Some((i, times)) if *i == index && *times > 0 => {
                *times -= 1;
                true
            }
            _ => false,
        }
    }

    fn short_read(&self) -> bool {
        let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        if plan.short_reads > 0 {
            plan.short_reads -= 1;
            true
        } else {
            false
        }
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.count("put")?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.count("put multipart")?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.count("get")?;
        let delay = self
            .plan
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let ranged = options.range.is_some();
        let result = self.inner.get_opts(location, options).await?;
        if !ranged || !self.short_read() {
            return Ok(result);
        }
        one_byte_short(result).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        if let Err(err) = self.count("delete") {
            return futures::stream::once(async move { Err(err) }).boxed();
        }
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        if let Err(err) = self.count("list") {
            return futures::stream::once(async move { Err(err) }).boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.count("list")?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.count("copy")?;
        self.inner.copy_opts(from, to, options).await
    }
}

#[async_trait]
impl MultipartStore for FaultyStore {
    async fn create_multipart(&self, path: &Path) -> Result<MultipartId> {
        self.count("create multipart")?;
        let id = self.inner.create_multipart(path).await?;
        self.open_uploads.fetch_add(1, Ordering::SeqCst);
        Ok(id)
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> Result<PartId> {
        self.count("put part")?;
        if self.part_fails(part_idx) {
            return Err(injected("part upload"));
        }
        self.inner.put_part(path, id, part_idx, data).await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> Result<PutResult> {
        self.count("complete multipart")?;
        let result = self.inner.complete_multipart(path, id, parts).await?;
        self.open_uploads.fetch_sub(1, Ordering::SeqCst);
        Ok(result)
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> Result<()> {
        self.count("abort multipart")?;
        self.inner.abort_multipart(path, id).await?;
        self.aborts.fetch_add(1, Ordering::SeqCst);
        self.open_uploads.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

/// `result` with its body one byte short, as a truncated object or a cut connection gives it.
pub async fn one_byte_short(result: GetResult) -> Result<GetResult> {
    let (meta, range, attributes, extensions) = (
        result.meta.clone(),
        result.range.clone(),
        result.attributes.clone(),
        result.extensions.clone(),
    );
    let bytes = result.bytes().await?;
    let short = bytes.slice(..bytes.len().saturating_sub(1));
    Ok(GetResult {
        payload: GetResultPayload::Stream(futures::stream::once(async move { Ok(short) }).boxed()),
        meta,
        range,
        attributes,
        extensions,
    })
}
