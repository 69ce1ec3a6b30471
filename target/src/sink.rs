//! [`ImageUpload`]: the [`ImageSink`] the QCOW2 writer streams a backup image into.
//!
//! On object stores it is a multipart upload whose part 1, sent last, is the header followed by
//! the body's first bytes (the store's minimum part size of them, 5 MiB on S3, held back in
//! memory): every part but the last must be that long, and the header is only known at the end.
//! Body parts 2, 3, ... are cut from the bytes after those and sent in the background, at most
//! `upload_concurrency` at a time, so memory stays within
//! [`TargetOptions::upload_memory_bound`](crate::TargetOptions::upload_memory_bound). The writer
//! needs no header area larger than its own (one cluster): an image is as small as its content.
//! (Before, the header area itself was padded to the minimum part size, so every image on S3,
//! however small an incremental, carried 5 MiB of zeros.) On filesystem targets the image is written
//! in place into a staging file that is renamed to its final name once complete
//! ([`crate::local_sink`]).
//!
//! Either way the object appears under its final name only when `finish` succeeded; a sink
//! dropped earlier aborts its multipart upload or removes its staging file.

use std::io;
use std::sync::{Arc, Mutex, mpsc};

use bytes::Bytes;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, PutPayload};
use strata_qcow2::ImageSink;

use crate::error::{Error, Result};
use crate::local_sink::LocalSink;
use crate::manifest::{Checksums, Crc32, ImageInfo};
use crate::name::VolumeName;
use crate::target::{Inner, Target};

/// Streams one backup image to the target. Obtained from
/// [`BackupUpload::image_sink`](crate::BackupUpload::image_sink).
#[derive(Debug)]
pub struct ImageUpload {
    kind: Kind,
    /// Body bytes handed over so far (for the `mid-upload` crash point).
    appended: u64,
}

#[derive(Debug)]
enum Kind {
    Multipart(Box<MultipartSink>),
    Local(Box<LocalSink>),
}

impl ImageUpload {
    /// A sink that publishes the image as object `object` of `volume`'s image folder, which
    /// must not exist yet (images are never replaced in place).
    pub(crate) fn new(
        target: &Target,
        volume: &VolumeName,
        object: &str,
        writer: &str,
        result: Arc<Mutex<Option<ImageInfo>>>,
        size_hint: Option<u64>,
    ) -> Result<Self> {
        let inner = &target.inner;
        let object = object.to_string();
        let path = inner.layout.image(volume, &object);
        if let Some(root) = &inner.local_root {
            let file = crate::url::local_path(root, &path);
            let sink =
                LocalSink::create(file, object, writer, inner.options.local_header_len, result)?;
            return Ok(Self {
                kind: Kind::Local(Box::new(sink)),
                appended: 0,
            });
        }
        let multipart = inner.multipart.clone().ok_or(Error::Unsupported {
            feature: "multipart uploads (MultipartStore)",
        })?;
        let sink = MultipartSink::create(
            target.inner.clone(),
            multipart,
            path,
            object,
            result,
            size_hint,
        )?;
        Ok(Self {
            kind: Kind::Multipart(Box::new(sink)),
            appended: 0,
        })
    }
}

impl ImageSink for ImageUpload {
    fn min_header_len(&self) -> u64 {
        match &self.kind {
            // The writer's own one-cluster header: the sink holds back the body's first bytes
            // to make part 1 long enough.
            Kind::Multipart(_) => 0,
            Kind::Local(sink) => sink.reserved_header_len(),
        }
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.kind {
            Kind::Multipart(sink) => sink.append(data).map_err(io::Error::from)?,
            Kind::Local(sink) => sink.append(data).map_err(io::Error::from)?,
        }
        let before = self.appended;
        self.appended += data.len() as u64;
        if before < MID_UPLOAD && self.appended >= MID_UPLOAD {
            crate::failpoint::hit("mid-upload");
        }
        Ok(())
    }

    fn finish(&mut self, header: &[u8]) -> io::Result<()> {
        match &mut self.kind {
            Kind::Multipart(sink) => sink.finish(header).map_err(io::Error::from)?,
            Kind::Local(sink) => sink.finish(header).map_err(io::Error::from)?,
        }
        crate::failpoint::hit("image-complete");
        Ok(())
    }
}

/// Body parts a size hint is spread over, leaving 999 of S3's 10,000 for an image that
/// outgrows its hint (part 0 is the header).
const HINTED_PARTS: usize = 9000;

/// The body part size for an image of about `size_hint` bytes (its volume's virtual size, which
/// its data clusters never exceed): the configured size, or larger where 9,000 parts of it
/// would not hold the hint and 1% more (the image's tables), in whole 64 KiB. Whether a hint set
/// it comes second.
fn hinted_part_size(configured: usize, size_hint: Option<u64>) -> (usize, bool) {
    let Some(hint) = size_hint else {
        return (configured, false);
    };
    let needed = hint
        .saturating_add(hint / 100)
        .div_ceil(HINTED_PARTS as u64);
    let needed = usize::try_from(needed.div_ceil(64 << 10) << 16).unwrap_or(usize::MAX);
    (configured.max(needed), true)
}

/// Where the `mid-upload` crash point fires: once this much of the body is handed over.
const MID_UPLOAD: u64 = 1 << 20;

type PartResult = Result<(usize, PartId)>;

struct MultipartSink {
    inner: Arc<Inner>,
    store: Arc<dyn MultipartStore>,
    path: Path,
    object: String,
    upload: MultipartId,
    /// The body's first bytes (up to the minimum part size), sent with the header as part 1.
    head: Vec<u8>,
    /// The body part being filled.
    part: Vec<u8>,
    /// Index of the next body part (0 is the header, sent last).
    next_index: usize,
    parts: Vec<Option<PartId>>,
    /// Bytes of each part sent, by index, while in flight.
    part_lens: Vec<usize>,
    in_flight: usize,
    in_flight_bytes: usize,
    /// Size of the body parts before any growth (see [`MultipartSink::part_size`]).
    base_part: usize,
    /// Whether `base_part` was chosen from a size hint.
    hinted: bool,
    sender: mpsc::Sender<PartResult>,
    receiver: mpsc::Receiver<PartResult>,
    body_len: u64,
    body_crc: crc32fast::Hasher,
    /// Set once finished, aborted or failed: later calls fail.
    closed: bool,
    result: Arc<Mutex<Option<ImageInfo>>>,
}

impl std::fmt::Debug for MultipartSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultipartSink")
            .field("path", &self.path)
            .field("next_index", &self.next_index)
            .field("body_len", &self.body_len)
            .finish_non_exhaustive()
    }
}

impl MultipartSink {
    fn create(
        inner: Arc<Inner>,
        store: Arc<dyn MultipartStore>,
        path: Path,
        object: String,
        result: Arc<Mutex<Option<ImageInfo>>>,
        size_hint: Option<u64>,
    ) -> Result<Self> {
        let (s, p, retry) = (store.clone(), path.clone(), inner.options.retry);
        let upload = inner.runtime.run("create multipart upload", async move {
            retry
                .run(|| s.create_multipart(&p))
                .await
                .map_err(|err| Error::store("create multipart upload", &p, err))
        })?;
        let (sender, receiver) = mpsc::channel();
        let min_part_size = inner.options.min_part_size;
        let (base_part, hinted) = hinted_part_size(inner.options.part_size, size_hint);
        Ok(Self {
            inner,
            store,
            path,
            object,
            upload,
            head: Vec::with_capacity(min_part_size),
            part: Vec::with_capacity(base_part),
            next_index: 1,
            parts: vec![None],
            part_lens: vec![0],
            in_flight: 0,
            in_flight_bytes: 0,
            base_part,
            hinted,
            sender,
            receiver,
            body_len: 0,
            body_crc: crc32fast::Hasher::new(),
            closed: false,
            result,
        })
    }

    /// Size of body part `index` (S3 allows 10,000 parts). With a size hint the parts are
    /// as large as 9,000 of them need and stay so (growing fast past 9,000 only should the
    /// image outgrow its hint); without one they double every 1,000 parts.
    fn part_size(&self, index: usize) -> usize {
        let doublings = match self.hinted {
            true => index.saturating_sub(HINTED_PARTS).div_ceil(100),
            false => index / 1000,
        };
        let doublings = u32::try_from(doublings).unwrap_or(u32::MAX).min(8);
        self.base_part.saturating_mul(1 << doublings)
    }

    fn misuse(&self, reason: &str) -> Error {
        Error::Upload {
            path: self.path.to_string(),
            reason: reason.to_string(),
        }
    }

    fn append(&mut self, mut data: &[u8]) -> Result<()> {
        if self.closed {
            return Err(self.misuse("append after the upload finished or failed"));
        }
        self.body_crc.update(data);
        self.body_len += data.len() as u64;
        let held = (self.inner.options.min_part_size - self.head.len()).min(data.len());
        let (head, rest) = data.split_at(held);
        self.head.extend_from_slice(head);
        data = rest;
        while !data.is_empty() {
            let room = self.part_size(self.next_index) - self.part.len();
            let (now, rest) = data.split_at(room.min(data.len()));
            self.part.extend_from_slice(now);
            data = rest;
            if self.part.len() == self.part_size(self.next_index) {
                let next = Vec::with_capacity(self.part_size(self.next_index + 1));
                let full = std::mem::replace(&mut self.part, next);
                let index = self.next_index;
                self.next_index += 1;
                self.guard(|sink| sink.send(index, full.into()))?;
            }
        }
        Ok(())
    }

    /// Runs `step`; on failure aborts the upload and closes the sink.
    fn guard(&mut self, step: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        let outcome = step(self);
        if outcome.is_err() {
            self.abort();
        }
        outcome
    }

    /// Sends part `index` in the background once fewer than `upload_concurrency` are in flight
    /// and the bytes in flight, this part's included, stay within `upload_concurrency` parts
    /// of the configured size (one part is always let through): parts that grow do not grow
    /// the memory in flight with them.
    fn send(&mut self, index: usize, bytes: Bytes) -> Result<()> {
        let options = &self.inner.options;
        let budget = options.part_size.saturating_mul(options.upload_concurrency);
        while self.in_flight > 0
            && (self.in_flight >= self.inner.options.upload_concurrency
                || self.in_flight_bytes.saturating_add(bytes.len()) > budget)
        {
            self.wait_one()?;
        }
        if self.parts.len() <= index {
            self.parts.resize(index + 1, None);
            self.part_lens.resize(index + 1, 0);
        }
        self.part_lens[index] = bytes.len();
        self.in_flight_bytes += bytes.len();
        let (store, path, upload, retry) = (
            self.store.clone(),
            self.path.clone(),
            self.upload.clone(),
            self.inner.options.retry,
        );
        let sender = self.sender.clone();
        self.inner.runtime.handle().spawn(async move {
            let payload = PutPayload::from(bytes);
            let result = retry
                .run(|| store.put_part(&path, &upload, index, payload.clone()))
                .await
                .map(|part| (index, part))
                .map_err(|err| Error::store("upload part of", &path, err));
            // The sink may have been dropped (and the upload aborted) meanwhile.
            let _ = sender.send(result);
        });
        self.in_flight += 1;
        Ok(())
    }

    fn wait_one(&mut self) -> Result<()> {
        let message = self.receiver.recv().map_err(|_| Error::Runtime {
            operation: "part upload",
        })?;
        self.in_flight -= 1;
        let (index, part) = message?;
        if let Some(len) = self.part_lens.get_mut(index) {
            self.in_flight_bytes = self.in_flight_bytes.saturating_sub(std::mem::take(len));
        }
        if let Some(slot) = self.parts.get_mut(index) {
            *slot = Some(part);
        }
        Ok(())
    }

    fn finish(&mut self, header: &[u8]) -> Result<()> {
        if self.closed {
            return Err(self.misuse("finish after the upload finished or failed"));
        }
        // Body parts follow only once the held-back head is full, so part 1 (header and head)
        // is then at least the minimum part size; otherwise it is the only part.
        let more_parts = self.next_index > 1 || !self.part.is_empty();
        if more_parts && header.len() + self.head.len() < self.inner.options.min_part_size {
            self.abort();
            return Err(self.misuse(&format!(
                "first part of {} bytes is below the minimum part size {}",
                header.len() + self.head.len(),
                self.inner.options.min_part_size
            )));
        }
        self.guard(|sink| {
            if !sink.part.is_empty() {
                let last = std::mem::take(&mut sink.part);
                let index = sink.next_index;
                sink.next_index += 1;
                sink.send(index, last.into())?;
            }
            let mut first = Vec::with_capacity(header.len() + sink.head.len());
            first.extend_from_slice(header);
            first.extend_from_slice(&std::mem::take(&mut sink.head));
            sink.send(0, first.into())?;
            while sink.in_flight > 0 {
                sink.wait_one()?;
            }
            let parts = sink
                .parts
                .iter()
                .cloned()
                .collect::<Option<Vec<PartId>>>()
                .ok_or_else(|| sink.misuse("a part id is missing"))?;
            let (store, path, upload, retry) = (
                sink.store.clone(),
                sink.path.clone(),
                sink.upload.clone(),
                sink.inner.options.retry,
            );
            sink.inner
                .runtime
                .run("complete multipart upload", async move {
                    retry
                        .run(|| store.complete_multipart(&path, &upload, parts.clone()))
                        .await
                        .map_err(|err| Error::store("complete multipart upload", &path, err))
                })?;
            Ok(())
        })?;
        self.closed = true;
        let info = image_info(&self.object, header, self.body_len, &self.body_crc);
        let mut slot = self
            .result
            .lock()
            .map_err(|_| self.misuse("result lock poisoned"))?;
        *slot = Some(info);
        Ok(())
    }

    fn abort(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        // Let parts in flight land first, so the abort also frees them.
        while self.in_flight > 0 && self.receiver.recv().is_ok() {
            self.in_flight -= 1;
        }
        let (store, path, upload, retry) = (
            self.store.clone(),
            self.path.clone(),
            self.upload.clone(),
            self.inner.options.retry,
        );
        // Best effort: a store that lost the upload has nothing left to free.
        let _ = self
            .inner
            .runtime
            .run("abort multipart upload", async move {
                retry
                    .run(|| store.abort_multipart(&path, &upload))
                    .await
                    .map_err(|err| Error::store("abort multipart upload", &path, err))
            });
    }
}

impl Drop for MultipartSink {
    fn drop(&mut self) {
        self.abort();
    }
}

/// The image's manifest entry: the whole-file CRC is the header's CRC combined with the body's.
pub(crate) fn image_info(
    object: &str,
    header: &[u8],
    body_len: u64,
    body_crc: &crc32fast::Hasher,
) -> ImageInfo {
    let mut crc = crc32fast::Hasher::new();
    crc.update(header);
    crc.combine(body_crc);
    ImageInfo {
        object: object.to_string(),
        size: header.len() as u64 + body_len,
        header_len: header.len() as u64,
        checksums: Checksums {
            crc32: Crc32(crc.finalize()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn a_size_hint_spreads_the_image_over_nine_thousand_parts_of_one_size() {
        // Small volumes keep the configured part size.
        assert_eq!(hinted_part_size(16 * MIB, Some(4 << 30)), (16 * MIB, true));
        assert_eq!(hinted_part_size(16 * MIB, None), (16 * MIB, false));
        // A 1 TiB volume: parts of 117.6875 MiB (1% over 1 TiB in 9,000 parts, whole 64 KiB).
        let (part, hinted) = hinted_part_size(16 * MIB, Some(1 << 40));
        assert!(hinted);
        assert_eq!(part, 117 * MIB + 11 * MIB / 16);
        assert!(part as u64 * HINTED_PARTS as u64 >= (1u64 << 40) + (1u64 << 40) / 100);
        // S3's largest object, 5 TiB, still fits below 10,000 parts.
        let (part, _) = hinted_part_size(16 * MIB, Some(5 << 40));
        assert!(part as u64 * 9000 >= 5 << 40);
        assert!(part <= 5 << 30, "S3 parts are at most 5 GiB");
    }
}
