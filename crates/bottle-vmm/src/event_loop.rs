//! The one device thread: waits on every queue notification eventfd and every device backend fd,
//! and hands each event to its device.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::lock;
use crate::virtio::mmio::MmioTransport;
use crate::vstate::vcpu::ExitSignal;
use crate::GuestExit;

/// Events handled per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 32;
/// Token bits per device: the low byte is the queue index, or `BACKEND_TOKEN`.
const TOKEN_DEVICE_SHIFT: u64 = 8;
const BACKEND_TOKEN: u64 = 0xff;
const STOP_TOKEN: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the device event loop's epoll or stop eventfd")]
    Create(#[source] std::io::Error),
    #[error("cannot watch a device fd")]
    Register(#[source] std::io::Error),
    #[error("cannot start the device thread")]
    Spawn(#[source] std::io::Error),
    #[error("the device event loop failed while waiting")]
    Wait(#[source] std::io::Error),
    #[error("the device thread panicked")]
    Panicked,
}

pub struct EventLoop {
    epoll: Epoll,
    stop: EventFd,
    devices: Vec<Arc<Mutex<MmioTransport>>>,
}

impl EventLoop {
    pub fn new() -> Result<Self, EventLoopError> {
        let epoll = Epoll::new().map_err(EventLoopError::Create)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::Create)?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(EventLoopError::Register)?;
        Ok(Self {
            epoll,
            stop,
            devices: Vec::new(),
        })
    }

    pub fn add_device(
        &mut self,
        transport: Arc<Mutex<MmioTransport>>,
    ) -> Result<(), EventLoopError> {
        let index = self.devices.len() as u64;
        {
            let mut guard = lock(&transport);
            for (queue, evt) in guard.queue_evts().iter().enumerate() {
                let token = (index << TOKEN_DEVICE_SHIFT) | queue as u64;
                self.epoll
                    .ctl(
                        ControlOperation::Add,
                        evt.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(EventLoopError::Register)?;
            }
            if let Some(fd) = guard.device_mut().backend_fd() {
                let token = (index << TOKEN_DEVICE_SHIFT) | BACKEND_TOKEN;
                self.epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(EventLoopError::Register)?;
            }
        }
        self.devices.push(transport);
        Ok(())
    }

    /// Runs until `stop` (the handle) is called.
    /// Runs the loop on its own thread. If the loop fails or panics, the guest can no longer
    /// be served: `exit` is told, which ends the VM as a crash.
    pub fn start(self, exit: Arc<ExitSignal>) -> Result<EventLoopHandle, EventLoopError> {
        let stop = self.stop.try_clone().map_err(EventLoopError::Create)?;
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run()));
                match ran {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => {
                        exit.set(GuestExit::Crash(format!("device event loop failed: {e}")));
                        Err(e)
                    }
                    Err(_) => {
                        exit.set(GuestExit::Crash("device event loop panicked".into()));
                        Err(EventLoopError::Panicked)
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(EventLoopHandle { thread, stop })
    }

    fn run(self) -> Result<(), EventLoopError> {
        let mut events = vec![EpollEvent::default(); EVENTS_PER_WAIT];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(EventLoopError::Wait(e)),
            };
            for event in &events[..count] {
                let token = event.data();
                if token == STOP_TOKEN {
                    return Ok(());
                }
                let Some(transport) = self.devices.get((token >> TOKEN_DEVICE_SHIFT) as usize)
                else {
                    continue;
                };
                let mut transport = lock(transport);
                let sub = token & ((1 << TOKEN_DEVICE_SHIFT) - 1);
                if sub == BACKEND_TOKEN {
                    transport.device_mut().process_backend();
                } else {
                    // Drain the eventfd; a failed read means it was already drained.
                    let _ = transport.queue_evts()[sub as usize].read();
                    if transport.is_activated() {
                        transport.device_mut().process_queue(sub as usize);
                    }
                }
            }
        }
    }
}

pub struct EventLoopHandle {
    thread: JoinHandle<Result<(), EventLoopError>>,
    stop: EventFd,
}

impl EventLoopHandle {
    pub fn stop(self) -> Result<(), EventLoopError> {
        self.stop.write(1).map_err(EventLoopError::Create)?;
        self.thread.join().map_err(|_| EventLoopError::Panicked)?
    }
}
