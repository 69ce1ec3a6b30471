//! Feeds arbitrary bytes as everything an NBD server sends (greeting, option replies, then
//! transmission replies) to the NBD client over a loopback TCP connection; each connection the
//! client opens gets the same bytes from the start. The client then looks for data with block
//! status and reads what it finds. Any panic, hang or huge allocation is a bug; errors are
//! expected.
#![no_main]

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use libfuzzer_sys::fuzz_target;
use strata_nbd::Client;

/// Most block-status and read calls a run makes.
const CALLS: usize = 16;
/// Largest read a run makes at once.
const READ_LEN: u64 = 256 << 10;

/// The loopback server and the bytes it sends to each new connection.
struct Fake {
    addr: SocketAddr,
    script: Mutex<Arc<Vec<u8>>>,
}

fn fake() -> &'static Fake {
    static FAKE: OnceLock<&'static Fake> = OnceLock::new();
    FAKE.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("loopback listener");
        let fake: &'static Fake = Box::leak(Box::new(Fake {
            addr: listener.local_addr().expect("listener address"),
            script: Mutex::new(Arc::new(Vec::new())),
        }));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let script = fake
                    .script
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                std::thread::spawn(move || {
                    // The script, then end of stream; the client's requests are drained until
                    // it hangs up, so it never blocks on a full socket.
                    let _ = stream.write_all(&script);
                    let _ = stream.shutdown(Shutdown::Write);
                    let _ = std::io::copy(&mut stream, &mut std::io::sink());
                });
            }
        });
        fake
    })
}

fuzz_target!(|data: &[u8]| {
    let fake = fake();
    *fake.script.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(data.to_vec());
    let Ok(client) = Client::connect(&fake.addr.to_string(), "disk") else {
        return;
    };
    let size = client.size();
    let mut buf = vec![0u8; READ_LEN as usize];
    let mut pos = 0;
    for _ in 0..CALLS {
        let Ok(Some(range)) = client.next_data(pos) else {
            break;
        };
        assert!(
            range.start >= pos && range.start < range.end && range.end <= size,
            "{range:?}"
        );
        let len = (range.end - range.start).min(READ_LEN) as usize;
        let _ = client.read_at(&mut buf[..len], range.start);
        pos = range.end;
    }
    // The last bytes of the export, and one past its end.
    let tail = size.min(4096);
    let _ = client.read_at(&mut buf[..tail as usize], size - tail);
    assert!(client.read_at(&mut buf[..1], size).is_err());
});
