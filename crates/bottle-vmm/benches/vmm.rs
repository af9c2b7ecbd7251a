//! `cargo bench -p bottle-vmm`: VMM start to first guest instruction, and vsock round trip and
//! throughput through the probe guest's echo server, each reported next to a baseline measured
//! in the same run (process spawn; TCP loopback echo with the same payloads).
//!
//! Needs /dev/kvm; without it the benchmark says so and exits.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bottle_vmm::{AllowRule, GuestExit, Vmm, VsockConfig};
use common::*;

/// Boots measured for the start-up figure.
const BOOT_RUNS: usize = 10;
/// Round trips measured for the latency figure.
const ROUND_TRIPS: usize = 200;
/// Payload of one round trip.
const ROUND_TRIP_BYTES: usize = 64;
/// Bytes streamed through the echo for the throughput figure.
const THROUGHPUT_BYTES: usize = 1 << 20;
/// Chunk written per call in the throughput run.
const THROUGHPUT_CHUNK_BYTES: usize = 16 * 1024;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn start_to_first_instruction() -> (Duration, Duration) {
    let mut vmm_samples = Vec::new();
    let mut spawn_samples = Vec::new();
    for _ in 0..BOOT_RUNS {
        let dir = tempfile::tempdir().unwrap();
        let config = probe_config(dir.path(), "boot", "", 1, None);
        let log = dir.path().join("serial.log");
        let start = Instant::now();
        let vmm = Vmm::build(&config).unwrap();
        let runner = std::thread::spawn(move || vmm.run());
        // The probe's first instruction writes to the serial port ("PROBE START").
        while std::fs::metadata(&log).map_or(0, |m| m.len()) == 0 {
            std::hint::spin_loop();
        }
        vmm_samples.push(start.elapsed());
        assert_eq!(runner.join().unwrap().unwrap(), GuestExit::PowerOff);

        let start = Instant::now();
        std::process::Command::new("/bin/true").status().unwrap();
        spawn_samples.push(start.elapsed());
    }
    (median(vmm_samples), median(spawn_samples))
}

fn round_trips(stream: &mut (impl Read + Write)) -> Duration {
    let payload = [0x5au8; ROUND_TRIP_BYTES];
    let mut back = [0u8; ROUND_TRIP_BYTES];
    let mut samples = Vec::new();
    for _ in 0..ROUND_TRIPS {
        let start = Instant::now();
        stream.write_all(&payload).unwrap();
        stream.read_exact(&mut back).unwrap();
        samples.push(start.elapsed());
    }
    median(samples)
}

/// Streams THROUGHPUT_BYTES through an echo: a writer thread, the caller reads; bytes/second.
fn throughput<S: Read + Write + Send + 'static>(mut writer: S, mut reader: impl Read) -> f64 {
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        let chunk = vec![0xa5u8; THROUGHPUT_CHUNK_BYTES];
        for _ in 0..THROUGHPUT_BYTES / THROUGHPUT_CHUNK_BYTES {
            writer.write_all(&chunk).unwrap();
        }
        writer
    });
    let mut buf = vec![0u8; THROUGHPUT_CHUNK_BYTES];
    let mut got = 0;
    while got < THROUGHPUT_BYTES {
        let n = reader.read(&mut buf).unwrap();
        assert!(n > 0, "echo closed early after {got} bytes");
        got += n;
    }
    let elapsed = start.elapsed();
    drop(sender.join().unwrap());
    THROUGHPUT_BYTES as f64 / elapsed.as_secs_f64()
}

fn tcp_echo() -> TcpStream {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let _ = stream.set_nodelay(true);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

fn vsock_echo(dir: &std::path::Path) -> (std::thread::JoinHandle<GuestExit>, UnixStream) {
    let vsock = VsockConfig {
        guest_cid: 3,
        uds_path: dir.join("vsock.sock"),
        allowlist: vec![AllowRule {
            addr: std::net::Ipv4Addr::LOCALHOST,
            port: 9,
        }],
        event_log: None,
    };
    let config = probe_config(dir, "echo", "", 1, Some(vsock.clone()));
    let vmm = Vmm::build(&config).unwrap();
    let runner = std::thread::spawn(move || vmm.run().unwrap());
    let mut stream = UnixStream::connect(&vsock.uds_path).unwrap();
    stream.write_all(b"CONNECT 7000\n").unwrap();
    let mut ok = [0u8; 8];
    stream.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"OK 7000\n");
    (runner, stream)
}

fn main() {
    if !kvm_usable("bench") {
        return;
    }
    probe_guest();
    let (vmm_start, spawn) = start_to_first_instruction();
    println!(
        "start to first guest instruction: {:>10.3} ms   (baseline: spawn /bin/true {:.3} ms, ratio {:.1}x)",
        vmm_start.as_secs_f64() * 1e3,
        spawn.as_secs_f64() * 1e3,
        vmm_start.as_secs_f64() / spawn.as_secs_f64()
    );

    let mut tcp = tcp_echo();
    let tcp_rtt = round_trips(&mut tcp);
    let tcp_rate = throughput(tcp.try_clone().unwrap(), tcp);

    let dir = tempfile::tempdir().unwrap();
    let (runner, mut stream) = vsock_echo(dir.path());
    let vsock_rtt = round_trips(&mut stream);
    let vsock_rate = throughput(stream.try_clone().unwrap(), stream.try_clone().unwrap());
    std::thread::sleep(Duration::from_millis(50));
    stream.write_all(b"QUIT").unwrap();
    assert_eq!(runner.join().unwrap(), GuestExit::PowerOff);

    println!(
        "vsock round trip ({ROUND_TRIP_BYTES} B):      {:>10.1} us   (baseline: TCP loopback {:.1} us, ratio {:.1}x)",
        vsock_rtt.as_secs_f64() * 1e6,
        tcp_rtt.as_secs_f64() * 1e6,
        vsock_rtt.as_secs_f64() / tcp_rtt.as_secs_f64()
    );
    println!(
        "vsock echo throughput ({} KiB):  {:>10.2} MiB/s (baseline: TCP loopback {:.2} MiB/s, ratio {:.3})",
        THROUGHPUT_BYTES / 1024,
        vsock_rate / (1 << 20) as f64,
        tcp_rate / (1 << 20) as f64,
        vsock_rate / tcp_rate
    );
}
