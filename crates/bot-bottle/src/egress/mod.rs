//! Egress proxy: allowlist policy, HTTP CONNECT / forward proxy, decision events.
