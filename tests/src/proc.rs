//! Commands and child processes for tests: `ip` invocations that panic with context, and
//! processes started inside a pod (its network namespace and its cgroup) that are killed by
//! pid when their guard drops.
use std::{
    ffi::OsStr,
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

/// Runs a command to completion; panics with its output when it fails.
pub fn run<I, S>(program: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new(program)
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Lines a child wrote to stdout, collected by a thread as they arrive.
#[derive(Debug, Clone, Default)]
pub struct Lines {
    inner: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Lines {
    fn collect(
        self,
        stream: impl std::io::Read + Send + 'static,
        echo: Option<String>,
    ) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(prefix) = &echo {
                    // Visible with --nocapture; helps when a test fails.
                    println!("[{prefix}] {line}");
                }
                let (lock, cvar) = &*self.inner;
                lock.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                cvar.notify_all();
            }
        })
    }

    /// Every line so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `pred` holds for the lines so far; returns its value. Panics after `timeout`
    /// with `what` and the lines seen.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[String]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.inner;
        let mut lines = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = pred(&lines) {
                return v;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out after {timeout:?} waiting for {what}; lines so far:\n{}",
                lines.join("\n")
            );
            lines = cvar
                .wait_timeout(lines, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A child process that is killed (SIGKILL, by pid) and reaped when dropped.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    stdout: Lines,
    /// The thread collecting stdout; done once the child's stdout reached EOF.
    collector: Option<thread::JoinHandle<()>>,
    /// The child's stdin, for [`Process::spawn_interactive`].
    stdin: Option<std::process::ChildStdin>,
}

impl Process {
    /// Starts `command` with stdout collected and stderr passed through.
    pub fn spawn(name: &str, command: Command) -> Self {
        Self::start(name, command, false)
    }

    /// Like [`Process::spawn`], with a pipe to the child's stdin for [`Process::send_line`].
    pub fn spawn_interactive(name: &str, command: Command) -> Self {
        Self::start(name, command, true)
    }

    /// Writes one line to the child's stdin; panics if it cannot.
    pub fn send_line(&mut self, line: &str) {
        self.try_send_line(line)
            .unwrap_or_else(|e| panic!("write to {}: {e}", self.name));
    }

    /// Writes one line to the child's stdin (an error when the child has gone).
    pub fn try_send_line(&mut self, line: &str) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .unwrap_or_else(|| panic!("{}: not started with spawn_interactive", self.name));
        writeln!(stdin, "{line}").and_then(|()| stdin.flush())
    }

    fn start(name: &str, mut command: Command, interactive: bool) -> Self {
        command.stdout(Stdio::piped()).stdin(if interactive {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        let stdin = child.stdin.take();
        let stdout = Lines::default();
        let pipe = child
            .stdout
            .take()
            .unwrap_or_else(|| panic!("{name}: no stdout pipe"));
        let echo = std::env::var_os("WEFT_TEST_ECHO").map(|_| name.to_owned());
        let collector = Some(stdout.clone().collect(pipe, echo));
        Self {
            name: name.to_owned(),
            child,
            stdout,
            collector,
            stdin,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> &Lines {
        &self.stdout
    }

    /// Sends a signal to this process (by pid).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
        let ret = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(
            ret,
            0,
            "kill({}, {signal}) of {}",
            self.child.id(),
            self.name
        );
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_finished(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit; panics after `timeout` or if it fails.
    pub fn wait_success(&mut self, timeout: Duration) {
        let status = self.wait(timeout);
        assert!(
            status.success(),
            "{} exited with {status}; its output:\n{}",
            self.name,
            self.stdout.snapshot().join("\n")
        );
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("wait for {}: {e}", self.name))
            {
                self.finish_output(deadline);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {timeout:?}; its output:\n{}",
                self.name,
                self.stdout.snapshot().join("\n")
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Process {
    /// Waits (until `deadline`) for the collector to read the exited child's last lines.
    fn finish_output(&mut self, deadline: Instant) {
        if let Some(collector) = self.collector.take() {
            while !collector.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            if collector.is_finished() {
                let _ = collector.join();
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A command that will run inside a network namespace and, if given, a cgroup.
///
/// The namespace is entered with setns(2) and the cgroup joined by writing to its
/// `cgroup.procs`, both in the child between fork and exec, so the program's first
/// instruction already runs as the pod's workload.
pub fn command_in(netns: &Path, cgroup: Option<&Path>, program: &Path) -> Command {
    let ns = File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
    let procs = cgroup.map(|cgroup| {
        let path = cgroup.join("cgroup.procs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
    });
    let mut command = Command::new(program);
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (setns, write) on descriptors opened before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(procs) = &procs {
                // "0" moves the writing process itself.
                (&*procs).write_all(b"0")?;
            }
            Ok(())
        });
    }
    command
}

/// CLOCK_MONOTONIC in ns: one clock for every process of the machine (a load's timestamps
/// and the moment a benchmark acts compare).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
