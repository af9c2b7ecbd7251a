//! The microVM backend's host side: the launch file and the guest's configuration (`launch`),
//! the VMM child process (`vmm`), the control connection to the guest (`control`), and the
//! writable layer kept between runs (`layer`).

pub mod control;
pub mod launch;
pub mod layer;
pub mod session;
pub mod vmm;
