//! Network namespaces the tests create for themselves: a private loopback where a test may
//! use fixed addresses and ports and change sysctls (the local port range) without
//! touching the machine. Removed on drop, even when the test fails.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    /// A new namespace with its loopback up, or `None` (with the reason printed) where
    /// namespaces cannot be made (not root, no `ip`).
    pub fn create() -> Option<Netns> {
        let name = format!(
            "l4lb-t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        if !ip(&["netns", "add", &name]) {
            eprintln!("SKIPPED: cannot create a network namespace (needs root and iproute2)");
            return None;
        }
        let ns = Netns { name };
        assert!(ns.exec(&["ip", "link", "set", "lo", "up"]));
        Some(ns)
    }

    /// Runs a command inside the namespace; whether it succeeded.
    pub fn exec(&self, args: &[&str]) -> bool {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// The prefix that runs a program inside the namespace.
    pub fn prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Runs `f` on a new thread that has entered the namespace, with a current-thread
    /// tokio runtime: every socket it opens lives in the namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
    ) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(path).expect("open the namespace");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .expect("namespace thread panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes started with `ip netns exec` are killed by their owners' drops first.
        let _ = ip(&["netns", "del", &self.name]);
    }
}
