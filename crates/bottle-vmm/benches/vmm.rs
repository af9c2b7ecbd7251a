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

fn start_to_first_instruction() -> (Duration, Duration, Duration) {
    let mut build_samples = Vec::new();
    let mut vmm_samples = Vec::new();
    let mut spawn_samples = Vec::new();
    for _ in 0..BOOT_RUNS {
        let dir = tempfile::tempdir().unwrap();
        let config = probe_config(dir.path(), "boot", "", 1, None);
        let log = dir.path().join("serial.log");
        let start = Instant::now();
        let vmm = Vmm::build(&config).unwrap();
        build_samples.push(start.elapsed());
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
    (
        median(vmm_samples),
        median(build_samples),
        median(spawn_samples),
    )
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
    let (vmm_start, build, spawn) = start_to_first_instruction();
    println!(
        "start to first guest instruction: {:>10.3} ms, of which Vmm::build {:.3} ms   (baseline: spawn /bin/true {:.3} ms, ratio {:.1}x)",
        vmm_start.as_secs_f64() * 1e3,
        build.as_secs_f64() * 1e3,
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
        "vsock echo throughput ({} KiB):  {:>10.2} MiB/s (baseline: TCP loopback {:.2} MiB/s, ratio {:.5})",
        THROUGHPUT_BYTES / 1024,
        vsock_rate / (1 << 20) as f64,
        tcp_rate / (1 << 20) as f64,
        vsock_rate / tcp_rate
    );
    let (device_rtt, device_rate) = device_path_figures();
    println!(
        "VMM vsock path only, no guest ({ROUND_TRIP_BYTES} B round trip): {:>8.1} us (ratio to TCP loopback {:.1}x)",
        device_rtt.as_secs_f64() * 1e6,
        device_rtt.as_secs_f64() / tcp_rtt.as_secs_f64()
    );
    println!(
        "VMM vsock path only, no guest (echo {} KiB): {:>8.2} MiB/s (ratio to TCP loopback {:.3})",
        THROUGHPUT_BYTES / 1024,
        device_rate / (1 << 20) as f64,
        device_rate / tcp_rate
    );
}

/// The VMM's own vsock data path (virtio queues + device + muxer + host TCP), driven by a
/// simulated driver over plain memory: what the VMM costs without an emulated guest.
mod device_path {
    use super::*;
    use bottle_vmm::virtio::mmio::MmioTransport;
    use bottle_vmm::virtio::testing::*;
    use bottle_vmm::virtio::vsock::packet::{Header, HEADER_BYTES, OP_REQUEST, OP_RW, TYPE_STREAM};
    use bottle_vmm::virtio::vsock::Vsock;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const GUEST_CID: u32 = 3;
    const QSIZE: u16 = 64;
    const RX_BUFFERS: u64 = 0x100_0000;
    const RX_BUFFER_BYTES: u32 = 64 * 1024 + HEADER_BYTES as u32;
    const TX_BUFFER: u64 = 0x300_0000;
    const GUEST_PORT: u32 = 5000;

    pub struct Rig {
        mem: GuestMemoryMmap,
        transport: MmioTransport,
        rx: TestQueue,
        tx: TestQueue,
        rx_seen: u16,
        _dir: tempfile::TempDir,
    }

    fn header(op: u16, len: usize) -> Header {
        Header {
            src_cid: u64::from(GUEST_CID),
            dst_cid: 2,
            src_port: GUEST_PORT,
            dst_port: bottle_vmm::EGRESS_VSOCK_PORT,
            len: len as u32,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 30,
            fwd_cnt: 0,
        }
    }

    impl Rig {
        /// A device with an egress stream open to a TCP echo server.
        pub fn new() -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
            let dir = tempfile::tempdir().unwrap();
            let config = VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: dir.path().join("v.sock"),
                allowlist: vec![AllowRule {
                    addr: std::net::Ipv4Addr::LOCALHOST,
                    port,
                }],
                event_log: None,
            };
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
            let device = Vsock::new(&config).unwrap();
            let transport = MmioTransport::new(Box::new(device), mem.clone()).unwrap();
            let queues: Vec<TestQueue> = (0..3)
                .map(|q| TestQueue::new(0x10_0000 + q * 0x1_0000, QSIZE))
                .collect();
            let mut rig = Rig {
                mem,
                transport,
                rx: TestQueue::new(0, 1),
                tx: TestQueue::new(0, 1),
                rx_seen: 0,
                _dir: dir,
            };
            bring_up(&mut rig.transport, &queues, 1);
            let mut queues = queues.into_iter();
            rig.rx = queues.next().unwrap();
            rig.tx = queues.next().unwrap();
            for i in 0..QSIZE {
                rig.rx.set_desc(
                    &rig.mem,
                    i,
                    RX_BUFFERS + u64::from(i) * 0x2_0000,
                    RX_BUFFER_BYTES,
                    DESC_F_WRITE,
                    0,
                );
                rig.rx.publish(&rig.mem, i);
            }
            rig.send(OP_REQUEST, &[]);
            rig.send(OP_RW, format!("CONNECT 127.0.0.1:{port}\n").as_bytes());
            let ok = rig.receive_bytes(format!("OK 127.0.0.1:{port}\n").len());
            assert!(ok > 0);
            rig
        }

        pub fn send(&mut self, op: u16, data: &[u8]) {
            let mut bytes = header(op, data.len()).to_bytes().to_vec();
            bytes.extend_from_slice(data);
            self.mem
                .write_slice(&bytes, GuestAddress(TX_BUFFER))
                .unwrap();
            self.tx
                .set_desc(&self.mem, 0, TX_BUFFER, bytes.len() as u32, 0, 0);
            self.tx.publish(&self.mem, 0);
            self.transport.device_mut().process_queue(1);
        }

        /// Pumps the device until `want` payload bytes arrived on RX; recycles the buffers.
        pub fn receive_bytes(&mut self, want: usize) -> usize {
            let mut got = 0;
            while got < want {
                self.transport.device_mut().process_backend();
                while self.rx.used_idx(&self.mem) != self.rx_seen {
                    let (id, len) = self.rx.used_elem(&self.mem, self.rx_seen);
                    self.rx_seen = self.rx_seen.wrapping_add(1);
                    got += (len as usize).saturating_sub(HEADER_BYTES);
                    self.rx.publish(&self.mem, id as u16);
                }
                self.transport.device_mut().process_queue(0);
            }
            got
        }
    }
}

fn device_path_figures() -> (Duration, f64) {
    let mut rig = device_path::Rig::new();
    let payload = [0x5au8; ROUND_TRIP_BYTES];
    let mut samples = Vec::new();
    for _ in 0..ROUND_TRIPS {
        let start = Instant::now();
        rig.send(bottle_vmm::virtio::vsock::packet::OP_RW, &payload);
        rig.receive_bytes(ROUND_TRIP_BYTES);
        samples.push(start.elapsed());
    }
    let chunk = vec![0xa5u8; THROUGHPUT_CHUNK_BYTES];
    let start = Instant::now();
    for _ in 0..THROUGHPUT_BYTES / THROUGHPUT_CHUNK_BYTES {
        rig.send(bottle_vmm::virtio::vsock::packet::OP_RW, &chunk);
        rig.receive_bytes(THROUGHPUT_CHUNK_BYTES);
    }
    (
        median(samples),
        THROUGHPUT_BYTES as f64 / start.elapsed().as_secs_f64(),
    )
}
