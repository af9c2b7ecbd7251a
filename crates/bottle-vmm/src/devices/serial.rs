//! COM1 console (vm-superio's 16550A), interrupting through an irqfd, writing to a log file, the
//! terminal or nowhere, and watching for the kernel's panic banner.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialOutput;

/// The banner Linux prints when it panics; seen on the console, the next reset is a panic.
const KERNEL_PANIC_BANNER: &[u8] = b"Kernel panic - not syncing";
/// Most console bytes written to a log file: a guest printing without end must not fill the
/// host's disk. What comes after is dropped (the panic banner is still watched for).
pub const MAX_CONSOLE_LOG_BYTES: u64 = 16 * 1024 * 1024;
/// Written once when the bound is reached.
const TRUNCATED_NOTE: &[u8] = b"\n[bot-bottle: console output past this point was dropped]\n";

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error(
        "cannot create the serial console log {path}: check the directory exists and is writable"
    )]
    CreateLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Serial interrupt line: an eventfd registered as irqfd for IRQ 4.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Console output that also remembers whether the guest kernel panicked.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    tail: Vec<u8>,
    panicked: Arc<AtomicBool>,
    /// Bytes still allowed out (`u64::MAX`: unbounded, for the terminal).
    budget: u64,
    truncated: bool,
}

impl ConsoleWriter {
    pub fn new(output: &SerialOutput, panicked: Arc<AtomicBool>) -> Result<Self, SerialError> {
        Self::bounded(output, panicked, MAX_CONSOLE_LOG_BYTES)
    }

    /// [`ConsoleWriter::new`] with another bound for a log file.
    pub fn bounded(
        output: &SerialOutput,
        panicked: Arc<AtomicBool>,
        max_file_bytes: u64,
    ) -> Result<Self, SerialError> {
        let (out, budget): (Box<dyn Write + Send>, u64) = match output {
            SerialOutput::Stdout => (Box::new(std::io::stdout()), u64::MAX),
            SerialOutput::Sink => (Box::new(std::io::sink()), u64::MAX),
            SerialOutput::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| SerialError::CreateLog {
                        path: path.display().to_string(),
                        source,
                    })?;
                // The bound is the file's: a resumed bottle appends to its last boot's log.
                let held = file.metadata().map_or(0, |m| m.len());
                (Box::new(file), max_file_bytes.saturating_sub(held))
            }
        };
        Ok(Self {
            out,
            tail: Vec::new(),
            panicked,
            budget,
            truncated: false,
        })
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tail.extend_from_slice(buf);
        if self
            .tail
            .windows(KERNEL_PANIC_BANNER.len())
            .any(|w| w == KERNEL_PANIC_BANNER)
        {
            self.panicked.store(true, Ordering::SeqCst);
        }
        let keep = KERNEL_PANIC_BANNER.len();
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
        let allowed = buf
            .len()
            .min(usize::try_from(self.budget).unwrap_or(usize::MAX));
        self.out.write_all(&buf[..allowed])?;
        self.budget -= allowed as u64;
        if allowed < buf.len() && !self.truncated {
            self.truncated = true;
            self.out.write_all(TRUNCATED_NOTE)?;
            self.out.flush()?;
        }
        if buf[..allowed].contains(&b'\n') {
            self.out.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

pub type ConsoleSerial = Serial<EventFdTrigger, NoEvents, ConsoleWriter>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_guest_printing_without_end_stops_at_the_bound_and_its_panic_is_still_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let panicked = Arc::new(AtomicBool::new(false));
        let mut writer =
            ConsoleWriter::bounded(&SerialOutput::File(path.clone()), panicked.clone(), 4096)
                .unwrap();
        for _ in 0..1000 {
            writer.write_all(b"spam spam spam spam\n").unwrap();
        }
        writer
            .write_all(b"Kernel panic - not syncing: x\n")
            .unwrap();
        writer.flush().unwrap();

        let log = std::fs::read(&path).unwrap();
        assert_eq!(log.len(), 4096 + TRUNCATED_NOTE.len());
        assert!(log.ends_with(TRUNCATED_NOTE));
        assert!(panicked.load(Ordering::SeqCst));

        // The next boot appends to the same file: the bound still holds for the file.
        let mut again =
            ConsoleWriter::bounded(&SerialOutput::File(path.clone()), panicked, 4096).unwrap();
        again.write_all(b"more\n").unwrap();
        again.flush().unwrap();
        let log = std::fs::read(&path).unwrap();
        assert_eq!(log.len(), 4096 + 2 * TRUNCATED_NOTE.len());
    }

    #[test]
    fn test_panic_banner_split_across_writes_is_detected() {
        let panicked = Arc::new(AtomicBool::new(false));
        let mut writer = ConsoleWriter::new(&SerialOutput::Sink, panicked.clone()).unwrap();
        for byte in b"[ 1.0] Kernel panic - not syncing: VFS" {
            writer.write_all(&[*byte]).unwrap();
        }
        assert!(panicked.load(Ordering::SeqCst));
    }
}
