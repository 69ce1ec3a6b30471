//! strata-target: streaming upload through the image sink and download through the positional
//! reader, side by side with plain object_store multipart put / streaming get of the same bytes
//! (the ceiling), on a local folder and, when `STRATA_TEST_S3_ENDPOINT` names a server (moto),
//! on S3.
//!
//! Set `STRATA_BENCH_SIDE_BY_SIDE_MIB` (e.g. 1024) to also print a one-shot side-by-side table
//! for an image of that size before the criterion runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use strata::qcow2::{ImageSink, ReadAt};
use strata::target::{BackupSpec, Target, TargetOptions, VolumeName};

const CHUNK: usize = 4 << 20;

struct Leg {
    name: &'static str,
    url: String,
    options: TargetOptions,
    store: Arc<dyn ObjectStore>,
    _dir: Option<tempfile::TempDir>,
}

fn legs() -> Vec<Leg> {
    let mut legs = Vec::new();
    if let Ok(dir) = tempfile::tempdir() {
        let url = dir.path().display().to_string();
        if let Ok(store) = object_store::local::LocalFileSystem::new_with_prefix(dir.path()) {
            legs.push(Leg {
                name: "local",
                url,
                options: TargetOptions::default(),
                store: Arc::new(store),
                _dir: Some(dir),
            });
        }
    }
    if let Ok(endpoint) = std::env::var("STRATA_TEST_S3_ENDPOINT") {
        let bucket =
            std::env::var("STRATA_TEST_S3_BUCKET").unwrap_or_else(|_| "strata-test".into());
        let config: Vec<(String, String)> = [
            ("aws_endpoint", endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
            ("aws_region", "us-east-1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut builder = object_store::aws::AmazonS3Builder::new().with_bucket_name(&bucket);
        for (k, v) in &config {
            if let Ok(key) = k.parse() {
                builder = builder.with_config(key, v);
            }
        }
        let mut options = TargetOptions::default();
        options.store_config = config;
        if let Ok(store) = builder.build() {
            legs.push(Leg {
                name: "s3",
                url: format!("s3://{bucket}/bench"),
                options,
                store: Arc::new(store),
                _dir: None,
            });
        }
    }
    legs
}

fn chunk() -> Vec<u8> {
    (0..CHUNK)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// Streams `size` bytes through a fresh backup's sink and commits; returns the backup id.
fn strata_upload(target: &Target, size: usize, data: &[u8]) -> strata::target::BackupId {
    let volume = VolumeName::new("bench").unwrap_or_else(|e| panic!("{e}"));
    let spec = BackupSpec {
        id: None,
        parent: None,
        virtual_size: size as u64,
        cluster_size: 65536,
    };
    let mut upload = target
        .begin_backup(&volume, spec)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut sink = upload.image_sink().unwrap_or_else(|e| panic!("{e}"));
    let header = vec![1u8; sink.min_header_len().max(65536) as usize];
    let mut left = size - header.len();
    while left > 0 {
        let n = left.min(data.len());
        sink.append(&data[..n]).unwrap_or_else(|e| panic!("{e}"));
        left -= n;
    }
    sink.finish(&header).unwrap_or_else(|e| panic!("{e}"));
    drop(sink);
    upload.commit().unwrap_or_else(|e| panic!("{e}")).id
}

fn strata_download(target: &Target, id: &strata::target::BackupId) -> u64 {
    let volume = VolumeName::new("bench").unwrap_or_else(|e| panic!("{e}"));
    let image = target
        .open_image(&volume, id)
        .unwrap_or_else(|e| panic!("{e}"));
    let len = image.len().unwrap_or(0);
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(CHUNK as u64) as usize;
        image
            .read_exact_at(&mut buf[..n], offset)
            .unwrap_or_else(|e| panic!("{e}"));
        offset += n as u64;
    }
    len
}

fn plain_upload(
    rt: &tokio::runtime::Runtime,
    store: &Arc<dyn ObjectStore>,
    path: &Path,
    size: usize,
    data: &[u8],
) {
    rt.block_on(async {
        let upload = store
            .put_multipart(path)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut writer = WriteMultipart::new_with_chunk_size(upload, 16 << 20);
        let mut left = size;
        while left > 0 {
            writer
                .wait_for_capacity(4)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let n = left.min(data.len());
            writer.write(&data[..n]);
            left -= n;
        }
        writer.finish().await.unwrap_or_else(|e| panic!("{e}"));
    });
}

fn plain_download(rt: &tokio::runtime::Runtime, store: &Arc<dyn ObjectStore>, path: &Path) -> u64 {
    rt.block_on(async {
        let mut stream = store
            .get(path)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_stream();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            total += chunk.unwrap_or_else(|e| panic!("{e}")).len() as u64;
        }
        total
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn side_by_side(mib: usize) {
    let size = mib << 20;
    let data = chunk();
    let rt = runtime();
    println!("side by side, {mib} MiB image (MB/s; ratio = strata / plain object_store)");
    for leg in legs() {
        let target =
            Target::open_with(&leg.url, leg.options.clone()).unwrap_or_else(|e| panic!("{e}"));
        let prefix = if leg.name == "s3" {
            "bench/plain"
        } else {
            "plain"
        };
        let path = Path::from(format!("{prefix}/{}", rand_suffix()));
        let rate = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
        let t = Instant::now();
        plain_upload(&rt, &leg.store, &path, size, &data);
        let plain_up = rate(t.elapsed());
        let t = Instant::now();
        let id = strata_upload(&target, size, &data);
        let ours_up = rate(t.elapsed());
        let t = Instant::now();
        plain_download(&rt, &leg.store, &path);
        let plain_down = rate(t.elapsed());
        let t = Instant::now();
        let volume = VolumeName::new("bench").unwrap_or_else(|e| panic!("{e}"));
        target
            .download_image(&volume, &id, &mut std::io::sink())
            .unwrap_or_else(|e| panic!("{e}"));
        let ours_down = rate(t.elapsed());
        let t = Instant::now();
        strata_download(&target, &id);
        let ours_read_at = rate(t.elapsed());
        println!(
            "{:6} upload   strata {ours_up:8.1}  plain {plain_up:8.1}  ratio {:.2}",
            leg.name,
            ours_up / plain_up
        );
        println!(
            "{:6} download strata {ours_down:8.1}  plain {plain_down:8.1}  ratio {:.2}",
            leg.name,
            ours_down / plain_down
        );
        println!(
            "{:6} read_at  strata {ours_read_at:8.1}  plain {plain_down:8.1}  ratio {:.2}",
            leg.name,
            ours_read_at / plain_down
        );
    }
}

fn rand_suffix() -> String {
    format!(
        "{:x}",
        Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id())
    )
}

/// The criterion benches of strata-target.
pub fn benches(c: &mut Criterion) {
    if let Some(mib) = std::env::var("STRATA_BENCH_SIDE_BY_SIDE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        side_by_side(mib);
    }
    let size = 64 << 20;
    let data = chunk();
    let rt = runtime();
    let mut group = c.benchmark_group("target");
    group
        .sample_size(10)
        .throughput(Throughput::Bytes(size as u64));
    for leg in legs() {
        let target =
            Target::open_with(&leg.url, leg.options.clone()).unwrap_or_else(|e| panic!("{e}"));
        let path = Path::from(format!("plain/{}", rand_suffix()));
        group.bench_function(BenchmarkId::new("upload/strata", leg.name), |b| {
            b.iter(|| strata_upload(&target, size, &data))
        });
        group.bench_function(BenchmarkId::new("upload/plain", leg.name), |b| {
            b.iter(|| plain_upload(&rt, &leg.store, &path, size, &data))
        });
        let id = strata_upload(&target, size, &data);
        group.bench_function(BenchmarkId::new("download/strata", leg.name), |b| {
            b.iter(|| strata_download(&target, &id))
        });
        group.bench_function(BenchmarkId::new("download/plain", leg.name), |b| {
            b.iter(|| plain_download(&rt, &leg.store, &path))
        });
    }
    group.finish();
}
