//! Boots a kernel with the serial console on stdout:
//! `cargo run -p bottle-vmm --example boot -- KERNEL [VCPUS] [MEM_MIB] [EXTRA CMDLINE...]`.
//! `BOTTLE_VMM_INITRD=FILE` adds an initrd. Prints how the guest ended and exits with
//! `GuestExit::exit_code()`.

use bottle_vmm::{SerialOutput, VmmConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(kernel) = args.next() else {
        eprintln!("usage: boot KERNEL [VCPUS] [MEM_MIB] [EXTRA CMDLINE...]");
        std::process::exit(2);
    };
    let vcpus = args.next().and_then(|v| v.parse().ok()).unwrap_or(1);
    let mem_mib = args.next().and_then(|v| v.parse().ok()).unwrap_or(256);
    let config = VmmConfig {
        kernel: kernel.into(),
        cmdline: args.collect::<Vec<_>>().join(" "),
        initrd: std::env::var_os("BOTTLE_VMM_INITRD").map(Into::into),
        vcpus,
        mem_mib,
        serial: SerialOutput::Stdout,
        vsock: None,
        disks: vec![],
    };
    match bottle_vmm::run(&config) {
        Ok(exit) => {
            eprintln!("guest ended: {exit:?}");
            std::process::exit(exit.exit_code());
        }
        Err(e) => {
            eprintln!("{}", bottle_vmm::error_chain(&e));
            std::process::exit(bottle_vmm::EXIT_CODE_VMM_ERROR);
        }
    }
}
