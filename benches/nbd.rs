//! `qemu-img convert -O raw nbd://...` of a 12-deep chain, served by strata's NBD server
//! beside `qemu-nbd` serving the same chain, in the same run, the copies interleaved; the
//! medians of the pairs and of their ratio are printed after the group.

use std::cell::RefCell;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use strata::nbd::Server;
use strata::qcow2::Image;

use crate::fixture::{DEPTH, build_chain, report_pairs, tool};

const VIRTUAL: u64 = 1 << 30;
/// 256 KiB runs each layer writes: 24 MiB a layer, about 280 MiB of data in the chain.
const RUNS: u64 = 96;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The chain served by strata and by qemu-nbd, copied out with `qemu-img convert`.
pub fn convert_12_deep(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    build_chain(dir.path(), VIRTUAL, RUNS);
    let top = dir.path().join(format!("{}.qcow2", DEPTH - 1));
    let image = Image::open(&top).expect("open chain");
    let data: u64 = image
        .map(0, VIRTUAL)
        .expect("map")
        .iter()
        .filter(|e| !e.kind.is_zero())
        .map(|e| e.length)
        .sum();

    let server = Server::new("chain", image).expect("server");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let strata_url = format!("nbd://{}/chain", listener.local_addr().expect("addr"));
    std::thread::spawn(move || server.serve(&listener));

    let port = free_port();
    let _qemu_nbd = Killed(
        Command::new("qemu-nbd")
            .args([
                "-r",
                "-f",
                "qcow2",
                "-x",
                "chain",
                "-b",
                "127.0.0.1",
                "--persistent",
            ])
            .args(["-p", &port.to_string()])
            .arg(&top)
            .spawn()
            .expect("qemu-nbd"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let qemu_url = format!("nbd://127.0.0.1:{port}/chain");

    let mut group = c.benchmark_group("nbd_convert_12_deep");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(data));
    let out = dir.path().join("out.raw");
    let copy = |url: &str| {
        // A new output file each copy, so no copy waits for the previous one's writeback.
        let _ = std::fs::remove_file(&out);
        let args: Vec<String> = ["convert", "-f", "raw", "-O", "raw", url, "out.raw"]
            .map(String::from)
            .into();
        let start = Instant::now();
        tool(dir.path(), "qemu-img", &args);
        start.elapsed()
    };
    // Every copy from one server is paired with a copy from the other right before or after
    // it, so both see the same machine load; each benchmark times its own server's copies.
    let pairs: RefCell<Vec<(Duration, Duration)>> = RefCell::default();
    for (name, strata_first) in [("strata serve", true), ("qemu-nbd", false)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut own = Duration::ZERO;
                for _ in 0..iters {
                    let (strata, qemu) = if strata_first {
                        let strata = copy(&strata_url);
                        (strata, copy(&qemu_url))
                    } else {
                        let qemu = copy(&qemu_url);
                        (copy(&strata_url), qemu)
                    };
                    pairs.borrow_mut().push((strata, qemu));
                    own += if strata_first { strata } else { qemu };
                }
                own
            });
        });
    }
    group.finish();
    report_pairs(
        "nbd_convert_12_deep",
        ("strata serve", "qemu-nbd"),
        &pairs.into_inner(),
    );
}
