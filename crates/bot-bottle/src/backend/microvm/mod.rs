//! The microVM backend's host side: the launch file and the guest's configuration (`launch`),
//! the VMM child and the control connection to the guest (`run`), and the writable layer kept
//! between runs (`layer`).

pub mod launch;
pub mod layer;
pub mod run;
