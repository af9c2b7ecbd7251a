//! Port I/O: COM1, the i8042 controller (its reset command ends the VM) and two exit ports.
//!
//! Ports:
//! - `0x3f8..=0x3ff` COM1.
//! - `0x60`, `0x64` i8042: a minimal controller ([`I8042`]) that answers Linux's probe at once;
//!   writing `0xfe` (CPU reset) to `0x64` ends the VM with [`GuestExit::Reset`] (Linux
//!   `reboot=k`).
//! - `0x501` power-off port: any write ends the VM with [`GuestExit::PowerOff`].
//! - `0x505` panic port (QEMU's pvpanic ISA port): any write ends it with [`GuestExit::Panic`].
//!
//! Other ports read as all ones and ignore writes, as an empty ISA bus does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::devices::lock;
use crate::devices::serial::ConsoleSerial;
use crate::GuestExit;

const COM1_BASE: u16 = 0x3f8;
const COM1_LAST: u16 = 0x3ff;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const POWER_OFF_PORT: u16 = 0x501;
pub const PANIC_PORT: u16 = 0x505;

// i8042 commands (written to port 0x64).
/// Read the controller configuration byte ("CTR", Linux's name) through port 0x60.
pub const I8042_CMD_READ_CTR: u8 = 0x20;
/// Write the CTR: its value is the next byte written to port 0x60.
pub const I8042_CMD_WRITE_CTR: u8 = 0x60;
/// Test the auxiliary (mouse) interface: one result byte.
pub const I8042_CMD_AUX_TEST: u8 = 0xa9;
/// Controller self test: answers [`I8042_SELF_TEST_PASSED`].
pub const I8042_CMD_SELF_TEST: u8 = 0xaa;
/// Test the keyboard interface: one result byte, 0 when it is fine.
pub const I8042_CMD_KBD_TEST: u8 = 0xab;
/// Read the output port through port 0x60.
pub const I8042_CMD_READ_OUTPUT_PORT: u8 = 0xd0;
/// Write the output port: its value is the next byte written to port 0x60.
pub const I8042_CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
/// Loop the next byte written to port 0x60 back as if the auxiliary device had sent it.
pub const I8042_CMD_AUX_LOOP: u8 = 0xd3;
/// Send the next byte written to port 0x60 to the auxiliary device.
pub const I8042_CMD_AUX_SEND: u8 = 0xd4;
/// Pulse the CPU reset line: how Linux's `reboot=k` (and `bottle-init`) ends the VM.
pub const I8042_CMD_CPU_RESET: u8 = 0xfe;

/// What a controller answers to [`I8042_CMD_SELF_TEST`] when it passed.
pub const I8042_SELF_TEST_PASSED: u8 = 0x55;
/// What it answers to [`I8042_CMD_KBD_TEST`] when the interface is fine.
const I8042_INTERFACE_OK: u8 = 0x00;
/// What it answers to [`I8042_CMD_AUX_TEST`]: "clock line stuck low", the answer of a
/// controller with no auxiliary device wired. Linux's `i8042_check_aux` then treats the AUX
/// port as absent at once (with 0x00, 0xfa or 0xff it would go on to probe a mouse, and wait
/// for an IRQ 12 that never comes).
pub const I8042_AUX_TEST_CLOCK_STUCK_LOW: u8 = 0x01;

// Status register bits (read from port 0x64).
/// Output buffer full: a byte waits on port 0x60.
pub const I8042_STATUS_OUTPUT_FULL: u8 = 0x01;
/// System flag: the controller passed its power-on self test (as a BIOS leaves it).
pub const I8042_STATUS_SYSTEM: u8 = 0x04;
/// The last write went to the command port (0x64) rather than the data port.
pub const I8042_STATUS_COMMAND: u8 = 0x08;
/// Keyboard not inhibited (the key lock is open): Linux warns "Keylock active" otherwise.
pub const I8042_STATUS_NOT_INHIBITED: u8 = 0x10;
/// The waiting byte came from the auxiliary device: never set, there is none.
pub const I8042_STATUS_AUX_DATA: u8 = 0x20;

// CTR bits.
const CTR_KBD_INTERRUPT: u8 = 0x01;
const CTR_SYSTEM: u8 = 0x04;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;
/// The CTR as a BIOS leaves it: keyboard interrupt on, POST passed, no AUX port in use,
/// scancode translation on.
const CTR_AT_BOOT: u8 = CTR_KBD_INTERRUPT | CTR_SYSTEM | CTR_AUX_DISABLED | CTR_TRANSLATE;
/// Output port at boot: bit 0 high (CPU not held in reset), bit 1 high (A20 enabled).
const OUTPUT_PORT_AT_BOOT: u8 = 0x03;

/// What a write to the controller asks of the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum I8042Request {
    None,
    /// The guest pulsed the CPU reset line.
    Reset,
}

/// A minimal i8042 keyboard controller, modelled on Firecracker's: enough for Linux's
/// `i8042` driver to find a controller, read and write its CTR and output port, pass its
/// self test, see that no auxiliary (mouse) port exists, and reset the machine — each
/// command answered at once, so the driver never waits for a timeout (without answers,
/// Linux spends half a second per command before "i8042: Can't read CTR").
///
/// There is no keyboard behind it: the VMM raises no IRQ 1, and bytes sent to the keyboard
/// are dropped (Linux's atkbd then finds no keyboard, in the background). Writing the output
/// port with the reset bit low does not reset the machine; only [`I8042_CMD_CPU_RESET`] does.
#[derive(Debug)]
pub struct I8042 {
    control: u8,
    output_port: u8,
    /// The byte waiting on port 0x60 (the output buffer).
    output: Option<u8>,
    /// The command whose data byte the next write to port 0x60 is.
    awaiting_data: Option<u8>,
    last_write_was_command: bool,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    pub fn new() -> Self {
        Self {
            control: CTR_AT_BOOT,
            output_port: OUTPUT_PORT_AT_BOOT,
            output: None,
            awaiting_data: None,
            last_write_was_command: false,
        }
    }

    /// The status register (port 0x64).
    pub fn status(&self) -> u8 {
        let mut status = I8042_STATUS_SYSTEM | I8042_STATUS_NOT_INHIBITED;
        if self.output.is_some() {
            status |= I8042_STATUS_OUTPUT_FULL;
        }
        if self.last_write_was_command {
            status |= I8042_STATUS_COMMAND;
        }
        status
    }

    /// A byte read from `port` (0x60 or 0x64). Reading the data port empties the output
    /// buffer; an empty one reads as 0.
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            I8042_COMMAND_PORT => self.status(),
            _ => self.output.take().unwrap_or(0),
        }
    }

    /// A byte written to `port` (0x60 or 0x64).
    pub fn write(&mut self, port: u16, value: u8) -> I8042Request {
        self.last_write_was_command = port == I8042_COMMAND_PORT;
        if port == I8042_COMMAND_PORT {
            return self.command(value);
        }
        match self.awaiting_data.take() {
            Some(I8042_CMD_WRITE_CTR) => self.control = value,
            Some(I8042_CMD_WRITE_OUTPUT_PORT) => self.output_port = value,
            // Looped back, but not flagged as AUX data: there is no AUX port.
            Some(I8042_CMD_AUX_LOOP) => self.output = Some(value),
            // For the auxiliary device, or (no command pending) for the keyboard: neither
            // exists, so nothing answers.
            _ => {}
        }
        I8042Request::None
    }

    fn command(&mut self, command: u8) -> I8042Request {
        self.awaiting_data = None;
        let answer = match command {
            I8042_CMD_READ_CTR => Some(self.control),
            I8042_CMD_READ_OUTPUT_PORT => Some(self.output_port),
            I8042_CMD_SELF_TEST => Some(I8042_SELF_TEST_PASSED),
            I8042_CMD_KBD_TEST => Some(I8042_INTERFACE_OK),
            I8042_CMD_AUX_TEST => Some(I8042_AUX_TEST_CLOCK_STUCK_LOW),
            I8042_CMD_WRITE_CTR
            | I8042_CMD_WRITE_OUTPUT_PORT
            | I8042_CMD_AUX_LOOP
            | I8042_CMD_AUX_SEND => {
                self.awaiting_data = Some(command);
                None
            }
            I8042_CMD_CPU_RESET => return I8042Request::Reset,
            // Other commands (enable/disable a port, pulse other lines...) have no answer and
            // change nothing a guest of ours reads back.
            _ => return I8042Request::None,
        };
        if answer.is_some() {
            self.output = answer;
        }
        I8042Request::None
    }
}

pub struct PortIo {
    pub serial: Arc<Mutex<ConsoleSerial>>,
    pub i8042: Mutex<I8042>,
    /// Set by the console when the kernel printed its panic banner.
    pub panicked: Arc<AtomicBool>,
}

impl PortIo {
    pub fn new(serial: Arc<Mutex<ConsoleSerial>>, panicked: Arc<AtomicBool>) -> Self {
        Self {
            serial,
            i8042: Mutex::new(I8042::new()),
            panicked,
        }
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..=COM1_LAST if data.len() == 1 => {
                data[0] = lock(&self.serial).read((port - COM1_BASE) as u8);
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => {
                // The controller's registers are bytes: a wider read sees zeroes above.
                data.fill(0);
                if let Some(byte) = data.first_mut() {
                    *byte = lock(&self.i8042).read(port);
                }
            }
            _ => data.fill(0xff),
        }
    }

    /// Returns how the guest ended when the write ends it.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<GuestExit> {
        match port {
            COM1_BASE..=COM1_LAST if data.len() == 1 => {
                // A console that cannot be written (full disk) must not stop the guest.
                let _ = lock(&self.serial).write((port - COM1_BASE) as u8, data[0]);
                None
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => {
                let request = data.first().map_or(I8042Request::None, |byte| {
                    lock(&self.i8042).write(port, *byte)
                });
                (request == I8042Request::Reset).then(|| {
                    if self.panicked.load(Ordering::SeqCst) {
                        GuestExit::Panic
                    } else {
                        GuestExit::Reset
                    }
                })
            }
            POWER_OFF_PORT => Some(GuestExit::PowerOff),
            PANIC_PORT => Some(GuestExit::Panic),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `command` to the controller, then `data` bytes to port 0x60.
    fn send(i8042: &mut I8042, command: u8, data: &[u8]) -> I8042Request {
        let request = i8042.write(I8042_COMMAND_PORT, command);
        for byte in data {
            i8042.write(I8042_DATA_PORT, *byte);
        }
        request
    }

    /// What Linux's i8042_command does to read an answer: output buffer full, then the byte.
    fn answer(i8042: &mut I8042) -> Option<u8> {
        let full = i8042.read(I8042_COMMAND_PORT) & I8042_STATUS_OUTPUT_FULL != 0;
        full.then(|| i8042.read(I8042_DATA_PORT))
    }

    #[test]
    fn test_fresh_controller_has_nothing_to_read_and_is_not_inhibited() {
        let mut i8042 = I8042::new();
        let status = i8042.read(I8042_COMMAND_PORT);
        assert_eq!(
            status & (I8042_STATUS_OUTPUT_FULL | I8042_STATUS_NOT_INHIBITED),
            I8042_STATUS_NOT_INHIBITED
        );
    }

    #[test]
    fn test_read_ctr_answers_the_boot_ctr_at_once() {
        let mut i8042 = I8042::new();
        send(&mut i8042, I8042_CMD_READ_CTR, &[]);
        assert_eq!(answer(&mut i8042), Some(CTR_AT_BOOT));
    }

    #[test]
    fn test_written_ctr_is_read_back() {
        let mut i8042 = I8042::new();
        send(&mut i8042, I8042_CMD_WRITE_CTR, &[0x52]);
        send(&mut i8042, I8042_CMD_READ_CTR, &[]);
        assert_eq!(answer(&mut i8042), Some(0x52));
    }

    #[test]
    fn test_written_output_port_is_read_back() {
        let mut i8042 = I8042::new();
        send(&mut i8042, I8042_CMD_WRITE_OUTPUT_PORT, &[0xdf]);
        send(&mut i8042, I8042_CMD_READ_OUTPUT_PORT, &[]);
        assert_eq!(answer(&mut i8042), Some(0xdf));
    }

    #[test]
    fn test_self_test_passes_with_0x55() {
        let mut i8042 = I8042::new();
        send(&mut i8042, I8042_CMD_SELF_TEST, &[]);
        assert_eq!(answer(&mut i8042), Some(I8042_SELF_TEST_PASSED));
    }

    #[test]
    fn test_reading_the_answer_empties_the_output_buffer() {
        let mut i8042 = I8042::new();
        send(&mut i8042, I8042_CMD_SELF_TEST, &[]);
        answer(&mut i8042);
        assert_eq!(answer(&mut i8042), None);
    }

    #[test]
    fn test_aux_loop_comes_back_without_the_aux_flag_and_aux_test_reports_no_device() {
        // Linux's i8042_check_aux: a loop answer without AUX data fails at once, and then the
        // AUX test's "clock stuck" makes it give the port up.
        let mut i8042 = I8042::new();
        send(&mut i8042, I8042_CMD_AUX_LOOP, &[0x5a]);
        let loop_status = i8042.read(I8042_COMMAND_PORT);
        let looped = i8042.read(I8042_DATA_PORT);
        send(&mut i8042, I8042_CMD_AUX_TEST, &[]);
        assert_eq!(
            (
                loop_status & (I8042_STATUS_OUTPUT_FULL | I8042_STATUS_AUX_DATA),
                looped,
                answer(&mut i8042)
            ),
            (
                I8042_STATUS_OUTPUT_FULL,
                0x5a,
                Some(I8042_AUX_TEST_CLOCK_STUCK_LOW)
            )
        );
    }

    #[test]
    fn test_bytes_for_the_keyboard_get_no_answer() {
        let mut i8042 = I8042::new();
        i8042.write(I8042_DATA_PORT, 0xf2); // atkbd's GET ID
        assert_eq!(answer(&mut i8042), None);
    }

    #[test]
    fn test_cpu_reset_command_asks_for_a_reset() {
        let mut i8042 = I8042::new();
        assert_eq!(
            send(&mut i8042, I8042_CMD_CPU_RESET, &[]),
            I8042Request::Reset
        );
    }

    #[test]
    fn test_0xfe_as_ctr_data_is_not_a_reset() {
        let mut i8042 = I8042::new();
        i8042.write(I8042_COMMAND_PORT, I8042_CMD_WRITE_CTR);
        assert_eq!(i8042.write(I8042_DATA_PORT, 0xfe), I8042Request::None);
    }

    fn port_io() -> PortIo {
        let panicked = Arc::new(AtomicBool::new(false));
        let writer = crate::devices::serial::ConsoleWriter::new(
            &crate::SerialOutput::Sink,
            panicked.clone(),
        )
        .unwrap();
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = vm_superio::Serial::new(crate::devices::serial::EventFdTrigger(evt), writer);
        PortIo::new(Arc::new(Mutex::new(serial)), panicked)
    }

    #[test]
    fn test_port_write_of_0xfe_to_0x64_ends_the_guest_as_reset() {
        let pio = port_io();
        assert_eq!(
            pio.write(I8042_COMMAND_PORT, &[I8042_CMD_CPU_RESET]),
            Some(GuestExit::Reset)
        );
    }

    #[test]
    fn test_port_reset_after_the_panic_banner_ends_the_guest_as_panic() {
        let pio = port_io();
        pio.panicked.store(true, Ordering::SeqCst);
        assert_eq!(
            pio.write(I8042_COMMAND_PORT, &[I8042_CMD_CPU_RESET]),
            Some(GuestExit::Panic)
        );
    }

    #[test]
    fn test_port_read_ctr_through_the_port_bus() {
        let pio = port_io();
        pio.write(I8042_COMMAND_PORT, &[I8042_CMD_READ_CTR]);
        let mut status = [0u8];
        let mut data = [0u8];
        pio.read(I8042_COMMAND_PORT, &mut status);
        pio.read(I8042_DATA_PORT, &mut data);
        assert_eq!(
            (status[0] & I8042_STATUS_OUTPUT_FULL, data[0]),
            (I8042_STATUS_OUTPUT_FULL, CTR_AT_BOOT)
        );
    }
}
