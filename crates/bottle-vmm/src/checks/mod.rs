//! Host preflight checks, run before a machine is built (by `bot-bottle doctor` and before a
//! microVM start): can this user use KVM at all ([`kvm`]), and can this KVM run a Linux guest
//! ([`linux`]).

pub mod kvm;
pub mod linux;
