//! A moto S3 server for the S3 leg of the suite.
//!
//! `STRATA_TEST_S3_ENDPOINT` (set by `.ci/run`) names a running server; otherwise one is
//! spawned on a free port of 127.0.0.1 when `moto_server` is installed, and stopped by a
//! watchdog when the test process exits. Without moto the S3 leg fails when `CI` is set and is
//! skipped (loudly) otherwise.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Server {
    pub endpoint: String,
    pub bucket: String,
}

impl Server {
    pub fn config(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
            ("aws_region", "us-east-1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

static SERVER: OnceLock<Option<Server>> = OnceLock::new();

/// Whether the S3 leg can run here; panics in CI when it cannot.
pub fn available() -> bool {
    let found = SERVER.get_or_init(start).is_some();
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!(
                "S3 leg: moto_server is not installed and STRATA_TEST_S3_ENDPOINT is not set (CI requires the S3 leg)"
            );
        }
        eprintln!(
            "SKIPPED S3 leg: install moto (pip install 'moto[server]') or set STRATA_TEST_S3_ENDPOINT"
        );
    }
    found
}

pub fn server() -> &'static Server {
    match SERVER.get_or_init(start) {
        Some(server) => server,
        None => panic!("S3 leg requested without a moto server"),
    }
}

fn start() -> Option<Server> {
    let bucket = std::env::var("STRATA_TEST_S3_BUCKET").unwrap_or_else(|_| "strata-test".into());
    let endpoint = match std::env::var("STRATA_TEST_S3_ENDPOINT") {
        Ok(endpoint) => endpoint,
        Err(_) => spawn()?,
    };
    create_bucket(&endpoint, &bucket);
    Some(Server { endpoint, bucket })
}

fn spawn() -> Option<String> {
    let installed = Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !installed.map(|s| s.success()).unwrap_or(false) {
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .ok()?;
    // The watchdog stops moto once this test process is gone.
    let script = format!(
        "moto_server -H 127.0.0.1 -p {port} >/dev/null 2>&1 & m=$!; \
         while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill $m",
        parent = std::process::id()
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(format!("http://127.0.0.1:{port}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("moto_server did not start on port {port}");
}

fn create_bucket(endpoint: &str, bucket: &str) {
    let host = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = TcpStream::connect(host).unwrap_or_else(|e| panic!("connect to {host}: {e}"));
    let request = format!(
        "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("create bucket: {e}"));
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    let ok = reply.starts_with("HTTP/1.1 200") || reply.contains("BucketAlreadyOwnedByYou");
    assert!(ok, "creating bucket {bucket} failed: {reply}");
}
