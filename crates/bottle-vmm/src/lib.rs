pub mod kvm_check;
