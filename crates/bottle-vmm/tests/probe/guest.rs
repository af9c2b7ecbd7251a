//! The probe guest: a freestanding x86_64 program the tests boot under real KVM with our VMM.
//!
//! It checks the boot parameters it was handed (zero page: e820 map, command line), prints to
//! COM1, finds our virtio-mmio vsock device from the `virtio_mmio.device=` argument, negotiates
//! features, sets up its queues and exercises the vsock channel as the test asks
//! (`probe.mode=...` on the command line). It ends through the VMM's exit ports: 0x501 (power
//! off) when every check passed, 0x505 (panic) on the first failure, after printing why.
//!
//! Built by the tests with rustc (no SSE: this KVM cannot run it in the guest, see FINDINGS.md),
//! loaded like a vmlinux ELF and entered in 64-bit mode with `rsi` = zero page.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, AtomicU64, Ordering};

// Entry: move the stack away from the boot structures (the VMM's boot stack sits right above
// the zero page) and call `probe_main(zero_page)`.
global_asm!(
    ".globl _start",
    "_start:",
    "mov rsp, 0x1f0000",
    "mov rdi, rsi",
    "call probe_main",
    "2: hlt",
    "jmp 2b",
);

#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes (the memcpy contract).
    asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack));
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) {
        memcpy(dst, src, n)
    } else {
        let mut i = n;
        while i > 0 {
            i -= 1;
            write_volatile(dst.add(i), read_volatile(src.add(i)));
        }
        dst
    }
}

#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `dst` is valid for `n` bytes (the memset contract).
    asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack));
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = (read_volatile(a.add(i)), read_volatile(b.add(i)));
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

fn outb(port: u16, value: u8) {
    // SAFETY: port I/O at CPL0 in our own guest.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

fn puts(s: &str) {
    for b in s.bytes() {
        outb(0x3f8, b);
    }
}

fn put_bytes(s: &[u8]) {
    for b in s {
        outb(0x3f8, *b);
    }
}

fn put_num(mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put_bytes(&digits[i..]);
}

fn put_hex(n: u32) {
    let mut digits = *b"0x00000000";
    for i in 0..8 {
        let nibble = ((n >> (28 - 4 * i)) & 0xf) as u8;
        digits[2 + i] = if nibble < 10 { b'0' + nibble } else { b'a' + nibble - 10 };
    }
    put_bytes(&digits);
}

fn power_off() -> ! {
    puts("PROBE DONE\n");
    outb(0x501, 0);
    loop {}
}

fn fail(what: &str) -> ! {
    puts("PROBE FAIL ");
    puts(what);
    puts("\n");
    outb(0x505, 1);
    loop {}
}

fn check(ok: bool, what: &str) {
    if !ok {
        fail(what);
    }
}

/// The precompiled `core` carries unwind tables naming this symbol; with panic=abort it is never
/// called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    fail("rust panic")
}

unsafe fn rd<T: Copy>(addr: u64) -> T {
    read_volatile(addr as *const T)
}

unsafe fn wr<T: Copy>(addr: u64, value: T) {
    write_volatile(addr as *mut T, value)
}

// ---- command line ----

struct Cmdline {
    bytes: &'static [u8],
}

impl Cmdline {
    /// The value of `key=` (up to the next space).
    fn get(&self, key: &[u8]) -> Option<&'static [u8]> {
        let b = self.bytes;
        let mut i = 0;
        while i + key.len() < b.len() {
            let at_word = i == 0 || b[i - 1] == b' ';
            if at_word && &b[i..i + key.len()] == key && b[i + key.len()] == b'=' {
                let start = i + key.len() + 1;
                let mut end = start;
                while end < b.len() && b[end] != b' ' {
                    end += 1;
                }
                return Some(&b[start..end]);
            }
            i += 1;
        }
        None
    }

    fn has(&self, word: &[u8]) -> bool {
        self.bytes.windows(word.len()).any(|w| w == word)
    }
}

fn parse_num(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for c in digits {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' if radix == 16 => c - b'a' + 10,
            _ => return None,
        };
        n = n.checked_mul(radix)?.checked_add(u64::from(d))?;
    }
    Some(n)
}

/// `virtio_mmio.device=4K@0xd0000000:5` → (base, irq).
fn parse_virtio_device(value: &[u8]) -> Option<(u64, u64)> {
    let at = value.iter().position(|c| *c == b'@')?;
    let colon = value.iter().position(|c| *c == b':')?;
    let base = parse_num(&value[at + 1..colon])?;
    let irq = parse_num(&value[colon + 1..])?;
    Some((base, irq))
}

// ---- virtio-mmio and virtqueues ----

const QUEUE_SIZE: u16 = 16;
const QUEUE_AREA: u64 = 0x40_0000;
const RX_BUFFERS: u64 = 0x60_0000;
const TX_BUFFER: u64 = 0x80_0000;
const BUFFER_BYTES: u32 = 44 + 65536;
const BUFFER_STRIDE: u64 = 0x1_1000;
const DESC_F_WRITE: u16 = 2;

// ---- time: KVM's paravirtual clock ----
//
// Waits for the device are bounded by time, not by a count of polling loops: a loop count
// lasts seconds under the emulating nested KVM of the development machines (about 4 M
// instructions/s) but milliseconds on hardware-assisted KVM, where it ran out before a busy
// host had answered. The clock is kvmclock, which every KVM offers and which needs no
// calibration: KVM writes, into a page of ours, the TSC value and time at its last update and
// the TSC-to-nanoseconds scale; the guest adds the scaled TSC ticks since.

/// How long any one wait for the device may take: generous, the host test's own watchdog
/// (60 s) stops a guest that hangs anyway. `probe.wait_ms=` on the command line overrides it.
const DEFAULT_WAIT_TIMEOUT_NS: u64 = 10_000_000_000;
static WAIT_TIMEOUT_NS: AtomicU64 = AtomicU64::new(DEFAULT_WAIT_TIMEOUT_NS);
const NS_PER_MS: u64 = 1_000_000;
/// Where KVM keeps this vCPU's `pvclock_vcpu_time_info` (32 bytes, must not cross a page).
const PVCLOCK: u64 = 0x59_0000;
/// KVM's CPUID leaves: signature (EBX, ECX, EDX = "KVMKVMKVM\0\0\0") and features.
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// KVM_FEATURE_CLOCKSOURCE2 (MSR 0x4b564d01) and the older KVM_FEATURE_CLOCKSOURCE (MSR 0x12).
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
/// Bit 0 of the system-time MSR turns the clock on.
const PVCLOCK_ENABLE: u64 = 1;

fn cpuid(leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
    // SAFETY: CPUID exists on every x86_64 CPU and has no side effects.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::__cpuid_count(leaf, subleaf)
    }
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: CPL0 in our own guest; the caller names an MSR the CPUID announced.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack))
    };
}

fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: RDTSC is allowed at CPL0 and only reads the time-stamp counter.
    unsafe { asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack)) };
    (u64::from(high) << 32) | u64::from(low)
}

/// Turns kvmclock on for this vCPU (the boot vCPU: the only one the probe runs on).
fn clock_init() {
    let signature = cpuid(KVM_CPUID_SIGNATURE, 0);
    let kvm = (signature.ebx, signature.ecx, signature.edx) == (0x4b4d_564b, 0x564b_4d56, 0x4d);
    check(kvm, "KVM's CPUID signature (needed for kvmclock)");
    let features = cpuid(KVM_CPUID_FEATURES, 0).eax;
    if features & KVM_FEATURE_CLOCKSOURCE2 != 0 {
        wrmsr(MSR_KVM_SYSTEM_TIME_NEW, PVCLOCK | PVCLOCK_ENABLE);
    } else if features & KVM_FEATURE_CLOCKSOURCE != 0 {
        wrmsr(MSR_KVM_SYSTEM_TIME, PVCLOCK | PVCLOCK_ENABLE);
    } else {
        fail("KVM offers no kvmclock (KVM_FEATURE_CLOCKSOURCE2 or CLOCKSOURCE)");
    }
}

/// Nanoseconds of guest time since KVM's clock started (kvmclock's formula).
fn now_ns() -> u64 {
    loop {
        // SAFETY: PVCLOCK is guest RAM of ours that KVM writes into; reads are volatile.
        let (version, tsc_timestamp, system_time, mul, shift, again) = unsafe {
            let version = rd::<u32>(PVCLOCK);
            fence(Ordering::SeqCst);
            let fields = (rd::<u64>(PVCLOCK + 8), rd::<u64>(PVCLOCK + 16), rd::<u32>(PVCLOCK + 24), rd::<i8>(PVCLOCK + 28));
            fence(Ordering::SeqCst);
            (version, fields.0, fields.1, fields.2, fields.3, rd::<u32>(PVCLOCK))
        };
        // An odd version, or one that changed while we read, means KVM was updating it.
        if version & 1 == 1 || version != again {
            continue;
        }
        let mut delta = rdtsc().wrapping_sub(tsc_timestamp);
        if shift < 0 {
            delta >>= u32::from(shift.unsigned_abs());
        } else {
            delta <<= shift as u32;
        }
        return system_time.wrapping_add(((u128::from(delta) * u128::from(mul)) >> 32) as u64);
    }
}

/// A point in time a wait must not pass.
struct Deadline(u64);

impl Deadline {
    fn after_wait_timeout() -> Deadline {
        Deadline(now_ns() + WAIT_TIMEOUT_NS.load(Ordering::Relaxed))
    }

    fn passed(&self) -> bool {
        now_ns() > self.0
    }
}

struct Vq {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    last_used: u16,
}

impl Vq {
    fn new(index: u64) -> Self {
        let base = QUEUE_AREA + index * 0x1_0000;
        Vq { desc: base, avail: base + 0x1000, used: base + 0x2000, avail_idx: 0, last_used: 0 }
    }

    unsafe fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16) {
        let d = self.desc + u64::from(i) * 16;
        wr(d, addr);
        wr(d + 8, len);
        wr(d + 12, flags);
        wr(d + 14, 0u16);
    }

    unsafe fn publish(&mut self, head: u16) {
        wr(self.avail + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2, head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        wr(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    unsafe fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        rd::<u16>(self.used + 2)
    }

    /// Next used element (descriptor id, written length), if any.
    unsafe fn pop_used(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let e = self.used + 4 + u64::from(self.last_used % QUEUE_SIZE) * 8;
        self.last_used = self.last_used.wrapping_add(1);
        Some((rd::<u32>(e) as u16, rd::<u32>(e + 4)))
    }
}

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const HOST_CID: u64 = 2;
const EGRESS_PORT: u32 = 1024;
const GUEST_BUF_ALLOC: u32 = 1 << 20;

#[derive(Clone, Copy)]
#[allow(dead_code)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

struct Dev {
    base: u64,
    cid: u64,
    rx: Vq,
    tx: Vq,
    /// Bytes of RW payload received (our fwd_cnt: we consume at once).
    fwd_cnt: u32,
    /// Bytes of RW payload sent, and the host's latest credit.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The last packet received (header + its payload, in its RX buffer until released).
    sent: u16,
}

struct Pkt {
    hdr: Hdr,
    id: u16,
    data: &'static [u8],
}

impl Dev {
    unsafe fn reg(&self, off: u64) -> u32 {
        rd::<u32>(self.base + off)
    }

    unsafe fn set_reg(&self, off: u64, value: u32) {
        wr(self.base + off, value)
    }

    unsafe fn setup(base: u64) -> Dev {
        let mut dev = Dev { base, cid: 0, rx: Vq::new(0), tx: Vq::new(1), fwd_cnt: 0, tx_cnt: 0, peer_buf_alloc: 0, peer_fwd_cnt: 0, sent: 0 };
        check(dev.reg(0x000) == 0x7472_6976, "virtio magic");
        check(dev.reg(0x004) == 2, "virtio-mmio version 2");
        check(dev.reg(0x008) == 19, "device id 19 (vsock)");
        dev.set_reg(0x070, 0);
        dev.set_reg(0x070, 1 | 2); // ACKNOWLEDGE | DRIVER
        dev.set_reg(0x014, 1);
        let high = dev.reg(0x010);
        check(high & 1 == 1, "VIRTIO_F_VERSION_1 offered");
        dev.set_reg(0x024, 0);
        dev.set_reg(0x020, 0);
        dev.set_reg(0x024, 1);
        dev.set_reg(0x020, 1);
        dev.set_reg(0x070, 1 | 2 | 8); // + FEATURES_OK
        check(dev.reg(0x070) & 8 == 8, "FEATURES_OK accepted");
        for q in 0..3u64 {
            let vq = Vq::new(q);
            dev.set_reg(0x030, q as u32);
            check(dev.reg(0x034) >= u32::from(QUEUE_SIZE), "queue max size");
            check(dev.reg(0x044) == 0, "queue not ready before setup");
            dev.set_reg(0x038, u32::from(QUEUE_SIZE));
            dev.set_reg(0x080, vq.desc as u32);
            dev.set_reg(0x084, 0);
            dev.set_reg(0x090, vq.avail as u32);
            dev.set_reg(0x094, 0);
            dev.set_reg(0x0a0, vq.used as u32);
            dev.set_reg(0x0a4, 0);
            dev.set_reg(0x044, 1);
        }
        dev.set_reg(0x070, 1 | 2 | 8 | 4); // + DRIVER_OK
        check(dev.reg(0x070) & 4 == 4, "DRIVER_OK accepted");
        dev.cid = u64::from(dev.reg(0x100)) | (u64::from(dev.reg(0x104)) << 32);
        for i in 0..QUEUE_SIZE {
            dev.rx.set_desc(i, RX_BUFFERS + u64::from(i) * BUFFER_STRIDE, BUFFER_BYTES, DESC_F_WRITE);
            dev.rx.publish(i);
        }
        dev.set_reg(0x050, 0);
        dev
    }

    unsafe fn send(&mut self, dst_port: u32, src_port: u32, op: u16, flags: u32, data: &[u8]) {
        let b = TX_BUFFER;
        wr(b, self.cid);
        wr(b + 8, HOST_CID);
        wr(b + 16, src_port);
        wr(b + 20, dst_port);
        wr(b + 24, data.len() as u32);
        wr(b + 28, 1u16);
        wr(b + 30, op);
        wr(b + 32, flags);
        wr(b + 36, GUEST_BUF_ALLOC);
        wr(b + 40, self.fwd_cnt);
        memcpy((b + 44) as *mut u8, data.as_ptr(), data.len());
        self.tx.set_desc(0, b, 44 + data.len() as u32, 0);
        self.send_raw_desc();
        if op == OP_RW {
            self.tx_cnt = self.tx_cnt.wrapping_add(data.len() as u32);
        }
    }

    /// Publishes TX descriptor 0 as it is and waits for the device to consume it.
    unsafe fn send_raw_desc(&mut self) {
        self.tx.publish(0);
        self.set_reg(0x050, 1);
        self.sent = self.sent.wrapping_add(1);
        let deadline = Deadline::after_wait_timeout();
        while self.tx.used_idx() != self.sent {
            check(!deadline.passed(), "TX buffer consumed");
        }
        self.tx.last_used = self.sent;
    }

    unsafe fn recv(&mut self, what: &str) -> Pkt {
        let deadline = Deadline::after_wait_timeout();
        loop {
            if let Some((id, len)) = self.rx.pop_used() {
                check(len >= 44 && id < QUEUE_SIZE, "RX packet length");
                let b = RX_BUFFERS + u64::from(id) * BUFFER_STRIDE;
                let hdr = Hdr {
                    src_cid: rd(b),
                    dst_cid: rd(b + 8),
                    src_port: rd(b + 16),
                    dst_port: rd(b + 20),
                    len: rd(b + 24),
                    op: rd(b + 30),
                    flags: rd(b + 32),
                    buf_alloc: rd(b + 36),
                    fwd_cnt: rd(b + 40),
                };
                check(hdr.src_cid == HOST_CID && hdr.dst_cid == self.cid, "RX packet addresses");
                check(hdr.len + 44 == len, "RX header length matches used length");
                self.peer_buf_alloc = hdr.buf_alloc;
                self.peer_fwd_cnt = hdr.fwd_cnt;
                if hdr.op == OP_RW {
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(hdr.len);
                }
                let data = core::slice::from_raw_parts((b + 44) as *const u8, hdr.len as usize);
                return Pkt { hdr, id, data };
            }
            if deadline.passed() {
                fail(what);
            }
        }
    }

    /// Gives an RX buffer back to the device.
    unsafe fn release(&mut self, pkt: Pkt) {
        self.rx.publish(pkt.id);
        self.set_reg(0x050, 0);
    }

    unsafe fn expect(&mut self, op: u16, what: &str) -> Pkt {
        let pkt = self.recv(what);
        if pkt.hdr.op != op {
            puts("got op ");
            put_num(u64::from(pkt.hdr.op));
            puts(" ");
            fail(what);
        }
        pkt
    }

    /// The probe uses one stream at a time: credit counters restart with each stream.
    fn new_stream(&mut self) {
        self.fwd_cnt = 0;
        self.tx_cnt = 0;
        self.peer_fwd_cnt = 0;
    }

    /// Host credit left for our RW payload.
    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// Reads RW packets until exactly `expected` arrived (a stream may come in several packets).
unsafe fn expect_stream(dev: &mut Dev, expected: &[u8], what: &str) {
    let mut got = 0;
    while got < expected.len() {
        let pkt = dev.expect(OP_RW, what);
        let fits = got + pkt.data.len() <= expected.len() && pkt.data == &expected[got..got + pkt.data.len()];
        got += pkt.data.len();
        dev.release(pkt);
        check(fits, what);
    }
}

/// Opens an egress stream to `target` ("a.b.c.d:port") from guest port `port`; returns the
/// first reply packet after the vsock handshake (an RW with `OK ...`, or an RST).
unsafe fn egress(dev: &mut Dev, port: u32, target: &[u8]) -> Pkt {
    dev.new_stream();
    dev.send(EGRESS_PORT, port, OP_REQUEST, 0, &[]);
    let response = dev.expect(OP_RESPONSE, "vsock RESPONSE to egress REQUEST");
    dev.release(response);
    let mut line = [0u8; 64];
    let prefix = b"CONNECT ";
    line[..prefix.len()].copy_from_slice(prefix);
    line[prefix.len()..prefix.len() + target.len()].copy_from_slice(target);
    line[prefix.len() + target.len()] = b'\n';
    dev.send(EGRESS_PORT, port, OP_RW, 0, &line[..prefix.len() + target.len() + 1]);
    dev.recv("reply to CONNECT line")
}

unsafe fn expect_reset(dev: &mut Dev, port: u32, target: &[u8], label: &str) {
    let reply = egress(dev, port, target);
    let op = reply.hdr.op;
    let from_port = reply.hdr.dst_port;
    dev.release(reply);
    check(op == OP_RST && from_port == port, label);
    puts(label);
    puts(" RST\n");
}

unsafe fn vsock_checks(dev: &mut Dev, cmdline: &Cmdline) {
    // 1. Host-initiated: the test connects to the Unix socket with CONNECT 7000.
    let request = dev.expect(OP_REQUEST, "host REQUEST");
    dev.new_stream();
    let (host_port, guest_port) = (request.hdr.src_port, request.hdr.dst_port);
    dev.release(request);
    check(guest_port == 7000, "host connection to guest port 7000");
    dev.send(host_port, guest_port, OP_RESPONSE, 0, &[]);
    expect_stream(dev, b"hello guest", "host data 'hello guest'");
    dev.send(host_port, guest_port, OP_RW, 0, b"hello host");
    puts("HOST CONNECT OK\n");
    dev.send(host_port, guest_port, OP_SHUTDOWN, 3, &[]);
    let rst = dev.expect(OP_RST, "RST after our SHUTDOWN");
    dev.release(rst);

    // 2. Egress to the allowlisted destination.
    let allowed = cmdline.get(b"probe.allowed").unwrap_or_else(|| fail("probe.allowed missing"));
    let reply = egress(dev, 5000, allowed);
    let ok_line = reply.hdr.op == OP_RW && reply.data.starts_with(b"OK ") && &reply.data[3..3 + allowed.len()] == allowed;
    dev.release(reply);
    check(ok_line, "OK line for the allowlisted destination");
    dev.send(EGRESS_PORT, 5000, OP_RW, 0, b"ping from probe");
    expect_stream(dev, b"echo:ping from probe", "echo from the allowlisted TCP listener");
    dev.send(EGRESS_PORT, 5000, OP_SHUTDOWN, 3, &[]);
    loop {
        let pkt = dev.recv("RST after egress SHUTDOWN");
        let op = pkt.hdr.op;
        dev.release(pkt);
        if op == OP_RST {
            break;
        }
        check(op == OP_SHUTDOWN || op == OP_CREDIT_UPDATE, "only SHUTDOWN/CREDIT before RST");
    }
    puts("ALLOWED OK\n");

    // 2b. Direct mode: vsock port P leads to the allowlisted address's port P, no header.
    let colon = allowed.iter().position(|c| *c == b':').unwrap_or_else(|| fail("probe.allowed has no port"));
    let allowed_port = parse_num(&allowed[colon + 1..]).unwrap_or_else(|| fail("probe.allowed port")) as u32;
    dev.new_stream();
    dev.send(allowed_port, 5006, OP_REQUEST, 0, &[]);
    let response = dev.expect(OP_RESPONSE, "RESPONSE to a direct-mode REQUEST");
    dev.release(response);
    dev.send(allowed_port, 5006, OP_RW, 0, b"ping from probe");
    expect_stream(dev, b"echo:ping from probe", "direct-mode echo");
    dev.send(allowed_port, 5006, OP_SHUTDOWN, 3, &[]);
    loop {
        let pkt = dev.recv("RST after direct-mode SHUTDOWN");
        let op = pkt.hdr.op;
        dev.release(pkt);
        if op == OP_RST {
            break;
        }
    }
    puts("DIRECT OK\n");

    // 3. Attacks: another address, the allowed address on an unpublished port, a malformed
    //    request line, a vsock port other than the egress port.
    let denied_addr = cmdline.get(b"probe.denied_addr").unwrap_or_else(|| fail("probe.denied_addr missing"));
    expect_reset(dev, 5001, denied_addr, "DENIED_ADDR");
    let denied_port = cmdline.get(b"probe.denied_port").unwrap_or_else(|| fail("probe.denied_port missing"));
    expect_reset(dev, 5002, denied_port, "DENIED_PORT");
    expect_reset(dev, 5003, b"localhost:80", "DENIED_NAME");
    dev.send(80, 5004, OP_REQUEST, 0, &[]);
    let rst = dev.recv("reply to a REQUEST for vsock port 80");
    let op = rst.hdr.op;
    dev.release(rst);
    check(op == OP_RST, "REQUEST to vsock port 80 is reset");
    puts("DENIED_VSOCK_PORT RST\n");

    // 4. Garbage: a TX chain shorter than a header, and one whose length field lies. The
    //    device must drop both and keep working.
    dev.tx.set_desc(0, TX_BUFFER, 10, 0);
    dev.send_raw_desc();
    wr(TX_BUFFER + 24, 60_000u32);
    dev.tx.set_desc(0, TX_BUFFER, 44 + 4, 0);
    dev.send_raw_desc();
    dev.tx.set_desc(0, 0xffff_0000_0000, 64, 0);
    dev.send_raw_desc();
    let reply = egress(dev, 5005, denied_addr);
    let op = reply.hdr.op;
    dev.release(reply);
    check(op == OP_RST, "device still answers after garbage");
    puts("GARBAGE DROPPED\n");
}

/// Echo server for benchmarks: accepts host connections and echoes every byte back within the
/// host's credit, keeping what it cannot send yet in a pending buffer; powers off when a packet
/// carries exactly `QUIT`.
unsafe fn echo_loop(dev: &mut Dev) -> ! {
    const PENDING: u64 = 0x90_0000;
    const PENDING_CAPACITY: usize = 8 << 20;
    puts("ECHO READY\n");
    let (mut head, mut tail) = (0usize, 0usize);
    let (mut host_port, mut guest_port) = (0u32, 0u32);
    loop {
        if tail > head && dev.credit() > 0 {
            let n = (tail - head).min(dev.credit() as usize).min(65536);
            let chunk = core::slice::from_raw_parts((PENDING as usize + head) as *const u8, n);
            dev.send(host_port, guest_port, OP_RW, 0, chunk);
            head += n;
            if head == tail {
                head = 0;
                tail = 0;
            }
            continue;
        }
        let pkt = dev.recv_forever();
        let h = pkt.hdr;
        match h.op {
            OP_REQUEST => {
                dev.release(pkt);
                dev.new_stream();
                host_port = h.src_port;
                guest_port = h.dst_port;
                dev.send(host_port, guest_port, OP_RESPONSE, 0, &[]);
            }
            OP_RW => {
                if pkt.data == b"QUIT" {
                    power_off();
                }
                let len = pkt.data.len();
                check(tail + len <= PENDING_CAPACITY, "echo pending buffer overflow");
                memcpy((PENDING as usize + tail) as *mut u8, pkt.data.as_ptr(), len);
                tail += len;
                dev.release(pkt);
            }
            OP_SHUTDOWN => {
                dev.release(pkt);
                dev.send(h.src_port, h.dst_port, OP_RST, 0, &[]);
            }
            _ => dev.release(pkt),
        }
    }
}

impl Dev {
    unsafe fn recv_forever(&mut self) -> Pkt {
        loop {
            if self.rx.used_idx() != self.rx.last_used {
                return self.recv("packet");
            }
        }
    }
}

// ---- CPUID: what the VMM lets the guest see ----

const LEAF1_ECX_MONITOR: u32 = 1 << 3;
const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_PDCM: u32 = 1 << 15;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const EXT_LEAF_MAX: u32 = 0x8000_0000;
const EXT_LEAF_FEATURES: u32 = 0x8000_0001;
const EXT1_ECX_SVM: u32 = 1 << 2;
const EXT_LEAF_SVM: u32 = 0x8000_000a;
const EXT_LEAF_BRAND_FIRST: u32 = 0x8000_0002;
const EXT_LEAF_BRAND_LAST: u32 = 0x8000_0004;

/// Runs CPUID as the guest kernel would: no hardware virtualisation to nest (VMX, SVM and
/// SVM's leaf), no MONITOR/MWAIT or PDCM, the hypervisor bit, and a brand string, which it
/// prints for the test to compare with the host's.
fn cpuid_checks() {
    let leaf1 = cpuid(1, 0);
    let max_ext = cpuid(EXT_LEAF_MAX, 0).eax;
    let ext1_ecx = if max_ext >= EXT_LEAF_FEATURES { cpuid(EXT_LEAF_FEATURES, 0).ecx } else { 0 };
    puts("CPUID leaf1 ecx ");
    put_hex(leaf1.ecx);
    puts(" edx ");
    put_hex(leaf1.edx);
    puts(" max_ext ");
    put_hex(max_ext);
    puts(" ext1 ecx ");
    put_hex(ext1_ecx);
    puts("\n");
    check(leaf1.ecx & LEAF1_ECX_VMX == 0, "no VMX (CPUID 1 ECX bit 5)");
    check(ext1_ecx & EXT1_ECX_SVM == 0, "no SVM (CPUID 0x8000_0001 ECX bit 2)");
    if max_ext >= EXT_LEAF_SVM {
        let svm = cpuid(EXT_LEAF_SVM, 0);
        check(svm.eax | svm.ebx | svm.ecx | svm.edx == 0, "an empty SVM leaf 0x8000_000A");
    }
    check(leaf1.ecx & LEAF1_ECX_MONITOR == 0, "no MONITOR/MWAIT (CPUID 1 ECX bit 3)");
    check(leaf1.ecx & LEAF1_ECX_PDCM == 0, "no PDCM (CPUID 1 ECX bit 15)");
    check(leaf1.ecx & LEAF1_ECX_HYPERVISOR != 0, "the hypervisor bit (CPUID 1 ECX bit 31)");
    check(max_ext >= EXT_LEAF_BRAND_LAST, "the brand string leaves 0x8000_0002..4");
    let mut brand = [0u8; 48];
    for (i, leaf) in (EXT_LEAF_BRAND_FIRST..=EXT_LEAF_BRAND_LAST).enumerate() {
        let r = cpuid(leaf, 0);
        for (j, word) in [r.eax, r.ebx, r.ecx, r.edx].iter().enumerate() {
            brand[i * 16 + j * 4..i * 16 + j * 4 + 4].copy_from_slice(&word.to_le_bytes());
        }
    }
    let end = brand.iter().position(|b| *b == 0).unwrap_or(brand.len());
    let mut start = 0;
    while start < end && brand[start] == b' ' {
        start += 1;
    }
    check(start < end, "a brand string (CPUID 0x8000_0002..4 not blank)");
    puts("CPUID brand ");
    put_bytes(&brand[start..end]);
    puts("\n");
    puts("CPUID OK\n");
}

// ---- i8042: what Linux's driver asks of the keyboard controller first ----

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O at CPL0 in our own guest.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) };
    value
}

/// Sends a controller command and waits, bounded by time, for its answer on port 0x60.
fn i8042_command(command: u8, what: &str) -> u8 {
    outb(0x64, command);
    let deadline = Deadline::after_wait_timeout();
    while inb(0x64) & 1 == 0 {
        check(!deadline.passed(), what);
    }
    inb(0x60)
}

fn i8042_checks() {
    let ctr = i8042_command(0x20, "an answer to i8042 read-CTR (0x20)");
    outb(0x64, 0x60);
    outb(0x60, ctr ^ 0x40);
    let written = i8042_command(0x20, "an answer to i8042 read-CTR after write-CTR (0x60)");
    check(written == ctr ^ 0x40, "the i8042 CTR written is read back");
    check(i8042_command(0xaa, "an answer to the i8042 self test (0xaa)") == 0x55, "i8042 self test passes (0x55)");
    check(inb(0x64) & 1 == 0, "the i8042 output buffer empty after reading");
    puts("I8042 OK ctr ");
    put_hex(u32::from(ctr));
    puts("\n");
}

// ---- virtio-blk ----

const BLK_HEADER: u64 = 0x58_0000;
const BLK_STATUS: u64 = 0x58_1000;
const BLK_DATA: u64 = 0x60_0000;
const DESC_F_NEXT: u16 = 1;

unsafe fn set_desc_next(vq: &Vq, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let d = vq.desc + u64::from(i) * 16;
    wr(d, addr);
    wr(d + 8, len);
    wr(d + 12, flags);
    wr(d + 14, next);
}

/// One request: header, one data buffer, status. Returns the status byte.
unsafe fn blk_request(base: u64, vq: &mut Vq, kind: u32, sector: u64, len: u32) -> u8 {
    wr(BLK_HEADER, kind);
    wr(BLK_HEADER + 4, 0u32);
    wr(BLK_HEADER + 8, sector);
    wr(BLK_STATUS, 0xffu8);
    let data_flags = if kind == 0 { DESC_F_NEXT | DESC_F_WRITE } else { DESC_F_NEXT };
    set_desc_next(vq, 0, BLK_HEADER, 16, DESC_F_NEXT, 1);
    set_desc_next(vq, 1, BLK_DATA, len, data_flags, 2);
    set_desc_next(vq, 2, BLK_STATUS, 1, DESC_F_WRITE, 0);
    vq.publish(0);
    wr(base + 0x050, 0u32);
    let deadline = Deadline::after_wait_timeout();
    while vq.pop_used().is_none() {
        check(!deadline.passed(), "blk request completed");
    }
    rd::<u8>(BLK_STATUS)
}

unsafe fn blk_checks(base: u64, cmdline: &Cmdline) {
    check(rd::<u32>(base) == 0x7472_6976 && rd::<u32>(base + 4) == 2, "virtio-mmio v2");
    check(rd::<u32>(base + 0x008) == 2, "device id 2 (block)");
    wr(base + 0x070, 0u32);
    wr(base + 0x070, 3u32);
    wr(base + 0x014, 0u32);
    let low = rd::<u32>(base + 0x010);
    let want_ro = cmdline.get(b"probe.blk_ro") == Some(b"1");
    check(((low >> 5) & 1 == 1) == want_ro, "VIRTIO_BLK_F_RO matches the disk");
    wr(base + 0x024, 0u32);
    wr(base + 0x020, 1u32 << 9); // FLUSH
    wr(base + 0x024, 1u32);
    wr(base + 0x020, 1u32); // VERSION_1
    wr(base + 0x070, 3u32 | 8);
    check(rd::<u32>(base + 0x070) & 8 == 8, "blk FEATURES_OK");
    let mut vq = Vq::new(0);
    wr(base + 0x030, 0u32);
    wr(base + 0x038, u32::from(QUEUE_SIZE));
    wr(base + 0x080, vq.desc as u32);
    wr(base + 0x084, 0u32);
    wr(base + 0x090, vq.avail as u32);
    wr(base + 0x094, 0u32);
    wr(base + 0x0a0, vq.used as u32);
    wr(base + 0x0a4, 0u32);
    wr(base + 0x044, 1u32);
    wr(base + 0x070, 3u32 | 8 | 4);
    check(rd::<u32>(base + 0x070) & 4 == 4, "blk DRIVER_OK");
    let sectors = u64::from(rd::<u32>(base + 0x100)) | (u64::from(rd::<u32>(base + 0x104)) << 32);
    let want = cmdline.get(b"probe.blk_sectors").and_then(parse_num).unwrap_or(0);
    check(sectors == want && sectors > 0 && sectors <= 128, "blk capacity");

    check(blk_request(base, &mut vq, 0, 0, (sectors * 512) as u32) == 0, "blk read of the whole disk");
    let mut sum: u32 = 0;
    for i in 0..sectors * 512 {
        sum = sum.wrapping_mul(31).wrapping_add(u32::from(rd::<u8>(BLK_DATA + i)));
    }
    puts("BLK READ sectors ");
    put_num(sectors);
    puts(" sum ");
    put_num(u64::from(sum));
    puts("\n");

    let message = b"PROBE WROTE SECTOR 2";
    memset(BLK_DATA as *mut u8, 0, 512);
    memcpy(BLK_DATA as *mut u8, message.as_ptr(), message.len());
    let wrote = blk_request(base, &mut vq, 1, 2, 512);
    if want_ro {
        check(wrote == 1, "write to a read-only disk fails with IOERR");
        puts("BLK RO REFUSED\n");
    } else {
        check(wrote == 0, "blk write");
        check(blk_request(base, &mut vq, 4, 0, 0) == 0, "blk flush");
        puts("BLK WRITE OK\n");
    }
    check(blk_request(base, &mut vq, 0, sectors, 512) == 1, "read past the end fails");
    puts("BLK BOUNDS OK\n");
}

#[no_mangle]
pub unsafe extern "C" fn probe_main(zero_page: u64) -> ! {
    puts("PROBE START\n");
    // Zero page: e820 table and command line (Linux boot protocol offsets).
    let e820_entries = rd::<u8>(zero_page + 0x1e8) as u64;
    let cmdline_ptr = rd::<u32>(zero_page + 0x228) as u64;
    let cmdline_size = rd::<u32>(zero_page + 0x238) as usize;
    let cmdline = Cmdline { bytes: core::slice::from_raw_parts(cmdline_ptr as *const u8, cmdline_size) };
    puts("cmdline: ");
    put_bytes(cmdline.bytes);
    puts("\n");
    check(cmdline.has(b"console=ttyS0"), "console=ttyS0 on the command line");

    let mem_mib = cmdline.get(b"probe.mem_mib").and_then(parse_num).unwrap_or_else(|| fail("probe.mem_mib missing"));
    let mut ram_end = 0u64;
    let mut ram_at_zero = false;
    for i in 0..e820_entries {
        let e = zero_page + 0x2d0 + i * 20;
        let (addr, size, kind) = (rd::<u64>(e), rd::<u64>(e + 8), rd::<u32>(e + 16));
        if kind == 1 {
            ram_end = ram_end.max(addr + size);
            ram_at_zero |= addr == 0;
        }
    }
    check(e820_entries >= 3 && ram_at_zero, "e820 has low RAM");
    check(ram_end == mem_mib << 20, "e820 RAM ends at mem_mib");
    puts("E820 OK ");
    put_num(e820_entries);
    puts(" entries, RAM end ");
    put_num(ram_end);
    puts("\n");

    // Initrd, if the VMM was given one: where it is, how big, and a checksum of its bytes.
    let ramdisk_image = rd::<u32>(zero_page + 0x218) as u64;
    let ramdisk_size = rd::<u32>(zero_page + 0x21c) as u64;
    if ramdisk_size != 0 {
        check(ramdisk_image % 4096 == 0 && ramdisk_image + ramdisk_size <= ram_end, "initrd inside RAM, page-aligned");
        let mut sum: u32 = 0;
        for i in 0..ramdisk_size {
            sum = sum.wrapping_mul(31).wrapping_add(u32::from(rd::<u8>(ramdisk_image + i)));
        }
        puts("INITRD size ");
        put_num(ramdisk_size);
        puts(" sum ");
        put_num(u64::from(sum));
        puts("\n");
    }

    clock_init();
    if let Some(ms) = cmdline.get(b"probe.wait_ms").and_then(parse_num) {
        WAIT_TIMEOUT_NS.store(ms * NS_PER_MS, Ordering::Relaxed);
    }

    match cmdline.get(b"probe.mode").unwrap_or(b"boot") {
        b"boot" => power_off(),
        b"wait" => {
            // A wait for something that never comes ends at its deadline, measured in time.
            let started = now_ns();
            let deadline = Deadline::after_wait_timeout();
            while !deadline.passed() {
                core::hint::spin_loop();
            }
            puts("WAITED ms ");
            put_num((now_ns() - started) / NS_PER_MS);
            puts("\n");
            power_off()
        }
        b"i8042" => {
            i8042_checks();
            power_off()
        }
        b"cpuid" => {
            cpuid_checks();
            power_off()
        }
        b"reset" => {
            outb(0x64, 0xfe);
            loop {}
        }
        b"panic" => fail("panic requested"),
        b"spin" => {
            puts("SPINNING\n");
            loop {
                core::hint::spin_loop();
            }
        }
        b"triple-fault" => {
            // The boot IDT is empty: #UD → #GP → #DF → triple fault.
            asm!("ud2");
            loop {}
        }
        b"blk" => {
            let device = cmdline.get(b"virtio_mmio.device").and_then(parse_virtio_device);
            let (base, _) = device.unwrap_or_else(|| fail("virtio_mmio.device missing"));
            blk_checks(base, &cmdline);
            power_off()
        }
        b"vsock" | b"echo" => {
            let device = cmdline.get(b"virtio_mmio.device").and_then(parse_virtio_device);
            let (base, irq) = device.unwrap_or_else(|| fail("virtio_mmio.device missing"));
            check(irq >= 5, "virtio IRQ above the legacy ones");
            let mut dev = Dev::setup(base);
            let want_cid = cmdline.get(b"probe.cid").and_then(parse_num).unwrap_or(0);
            check(dev.cid == want_cid, "guest CID in config space");
            puts("VSOCK READY cid ");
            put_num(dev.cid);
            puts("\n");
            if cmdline.get(b"probe.mode") == Some(b"echo") {
                echo_loop(&mut dev);
            }
            vsock_checks(&mut dev, &cmdline);
            power_off()
        }
        _ => fail("unknown probe.mode"),
    }
}
