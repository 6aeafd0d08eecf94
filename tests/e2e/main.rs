//! End-to-end tests: the real `l4lb` binary, real sockets on loopback, no sleeps. Every
//! test starts its own balancer on `127.0.0.1:0` and waits for its `listening` log line.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod harness;

mod balance;
mod check;
mod ecmp;
mod edge;
mod failover;
mod hardening;
mod health;
mod limits;
mod netns;
mod operations;
mod peers;
mod protocol_checks;
mod scale_out;
mod tcp;
mod udp;
