//! A child process that is killed when its guard drops, so a failing test leaves nothing
//! behind, with its output in a log file the assertions can show.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

pub struct Proc {
    pub name: String,
    child: Child,
    /// Set once `child` was reaped: from then on its pid may name another process.
    status: Option<ExitStatus>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `dir/NAME.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stdout(f.try_clone().unwrap()).stderr(f);
        let child = cmd.spawn().expect("spawn capsnet");
        Proc {
            name: name.into(),
            child,
            status: None,
            log,
        }
    }

    /// The process id (for /proc; never to signal: see [`Proc::signal`]).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, reaping the child if it has exited; None while it runs.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    /// Sends `sig` to the child; does nothing once it has exited. The pid comes only from a
    /// child that is not reaped yet, so it still names that process (a zombie at worst), never
    /// a reused pid, and never 0 (`kill(0, sig)` would signal the test runner's whole process
    /// group).
    pub fn signal(&mut self, sig: i32) {
        if self.exited().is_some() {
            return;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        assert!(pid > 0, "{}: pid {pid}", self.name);
        // SAFETY: kill(2) takes no pointers, and `pid` is our own unreaped child (above).
        unsafe { libc::kill(pid, sig) };
    }

    /// Waits for the process to exit, failing the test after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.exited() {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "{} did not exit within {timeout:?}\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address the process wrote to `ready` (its `--ready-file`). Fails at once, with the
    /// log, if the process exits first (a setting it refused), or after `timeout`.
    pub fn wait_ready(&mut self, ready: &Path, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(addr) = std::fs::read_to_string(ready)
                .ok()
                .filter(|s| !s.is_empty())
            {
                return addr;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before listening:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "{} did not listen within {timeout:?}:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit and fails the test, showing its log, unless it exited 0.
    pub fn expect_success(&mut self, timeout: Duration) {
        let status = self.wait(timeout);
        assert!(
            status.success(),
            "{} exited with {status}\n{}",
            self.name,
            self.log_text()
        );
    }

    /// Waits for the process to exit and fails the test, showing its log, if it exited 0.
    pub fn expect_failure(&mut self, timeout: Duration) {
        let status = self.wait(timeout);
        assert!(
            !status.success(),
            "{} exited 0 but should have failed\n{}",
            self.name,
            self.log_text()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
