//! The machine state: the KVM VM and its lifecycle ([`vm`]: build, run, stop, the order
//! resources are created and dropped in), guest RAM ([`memory`]), the vCPUs' registers, CPUID
//! and MSRs ([`cpu`]) and the vCPU threads that run them ([`vcpu`]).

pub mod cpu;
pub mod memory;
pub mod vcpu;
pub mod vm;
