//! Port I/O: COM1, the i8042 controller (its reset command ends the VM) and two exit ports.
//!
//! Ports:
//! - `0x3f8..=0x3ff` COM1.
//! - `0x60`, `0x64` i8042: reads answer "no data"; writing `0xfe` (CPU reset) to `0x64` ends the
//!   VM with [`GuestExit::Reset`] (Linux `reboot=k`).
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
const I8042_DATA_PORT: u16 = 0x60;
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_CMD_CPU_RESET: u8 = 0xfe;
pub const POWER_OFF_PORT: u16 = 0x501;
pub const PANIC_PORT: u16 = 0x505;

pub struct PortIo {
    pub serial: Arc<Mutex<ConsoleSerial>>,
    /// Set by the console when the kernel printed its panic banner.
    pub panicked: Arc<AtomicBool>,
}

impl PortIo {
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..=COM1_LAST if data.len() == 1 => {
                data[0] = lock(&self.serial).read((port - COM1_BASE) as u8);
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => data.fill(0),
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
            I8042_COMMAND_PORT if data.first() == Some(&I8042_CMD_CPU_RESET) => {
                Some(if self.panicked.load(Ordering::SeqCst) {
                    GuestExit::Panic
                } else {
                    GuestExit::Reset
                })
            }
            POWER_OFF_PORT => Some(GuestExit::PowerOff),
            PANIC_PORT => Some(GuestExit::Panic),
            _ => None,
        }
    }
}
