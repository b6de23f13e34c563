//! podman, set up for these tests: `containers.conf` beside this file
//! (runc, cgroupfs, host networking, no extra rlimits), every call bounded
//! in time, the images built once per test process and cached between
//! runs, and a guard for each container, compose project or played pod
//! that removes it when dropped, pass or fail.
//!
//! Images: the base (`localhost/debian-base:bookworm`, made by
//! `base-image` from Debian's mirror, since no image registry is reachable
//! here) stays in podman's store between runs; Herald's image is
//! `deploy/Containerfile`'s `prebuilt` target around the binary cargo built
//! for these tests (a few seconds); the tools image (Redis and nginx from
//! Debian's packages, standing in for the public images compose names) is
//! tagged with a hash of its Containerfile, so it is rebuilt only when that
//! file changes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The locally made Debian image every test image starts from.
pub(crate) const BASE_IMAGE: &str = "localhost/debian-base:bookworm";

/// Herald's image, from the test binary.
pub(crate) const HERALD_IMAGE: &str = "localhost/herald:test";

/// Longest any one podman (or podman-compose, kubernetes-validate) call may
/// take; building an image from scratch is the slowest.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The repository root.
pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// This directory: tests/containers.
pub(crate) fn here() -> PathBuf {
    repo().join("tests/containers")
}

/// `program args...` with the tests' podman config, killed after
/// `CALL_TIMEOUT`; stdout and stderr captured.
pub(crate) fn command(program: impl AsRef<Path>, args: &[&str]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg("--kill-after=10")
        .arg(format!("{}", CALL_TIMEOUT.as_secs()))
        .arg(program.as_ref())
        .args(args)
        .env("CONTAINERS_CONF", here().join("containers.conf"))
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to the end.
pub(crate) fn output(mut cmd: Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("run {cmd:?} (tests/run installs podman): {e}"))
}

/// Runs `cmd`, asserts it succeeded, returns its stdout.
pub(crate) fn checked(cmd: Command) -> String {
    let what = format!("{cmd:?}");
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `podman args...`, asserted to succeed; its stdout.
pub(crate) fn podman(args: &[&str]) -> String {
    checked(command("podman", args))
}

/// `podman args...`, failure allowed (clean-up, probes).
pub(crate) fn podman_quiet(args: &[&str]) -> Output {
    output(command("podman", args))
}

// ---------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------

/// The base image, made (or imported from the cache) at most once per run.
pub(crate) fn base_image() -> &'static str {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        checked(command(here().join("base-image"), &[BASE_IMAGE]));
    });
    BASE_IMAGE
}

/// Herald's image: `deploy/Containerfile --target prebuilt` on the base
/// image, around the binary cargo built for this test run (stripped: the
/// debug info is a hundred MB nobody reads in a container).
pub(crate) fn herald_image() -> &'static str {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let base = base_image();
        let context = tempfile::tempdir().expect("build context");
        let binary = context.path().join("herald");
        let mut strip = Command::new("strip");
        strip
            .arg("--strip-debug")
            .arg("-o")
            .arg(&binary)
            .arg(env!("CARGO_BIN_EXE_herald"));
        checked(strip);
        let context = context.path().to_str().expect("utf-8 temp path");
        let containerfile = repo().join("deploy/Containerfile");
        podman(&[
            "build",
            "--quiet",
            "--file",
            containerfile.to_str().expect("utf-8 path"),
            "--target",
            "prebuilt",
            "--build-arg",
            &format!("RUNTIME_IMAGE={base}"),
            "--build-context",
            &format!("herald-bin={context}"),
            "--tag",
            HERALD_IMAGE,
            context,
        ]);
    });
    HERALD_IMAGE
}

// ---------------------------------------------------------------------------
// Guards
// ---------------------------------------------------------------------------

/// A unique name for something a test starts.
pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A container this test started; dropping it removes it (`rm -f`), and on
/// a failing test prints its log first.
pub(crate) struct Container {
    pub(crate) name: String,
}

impl Container {
    /// `podman run --detach --name <unique> args...`.
    pub(crate) fn run(args: &[&str]) -> Container {
        let container = Container {
            name: unique("herald-test"),
        };
        let mut all = vec!["run", "--detach", "--name", &container.name];
        all.extend_from_slice(args);
        podman(&all);
        container
    }

    /// What the container wrote to stdout and stderr so far.
    pub(crate) fn logs(&self) -> String {
        let out = podman_quiet(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `podman inspect --format <format>`, trimmed.
    pub(crate) fn inspect(&self, format: &str) -> String {
        podman(&["inspect", "--format", format, &self.name])
            .trim()
            .to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- container {} log ---\n{}", self.name, self.logs());
        }
        let _ = podman_quiet(&["rm", "--force", "--time", "0", &self.name]);
    }
}
