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

/// Where the tests keep what outlives a run: the base image's tarball and
/// the Python tools' venv (tests/run creates it).
pub(crate) fn cache_dir() -> PathBuf {
    match std::env::var_os("HERALD_TEST_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/herald-tests"),
    }
}

/// A program from the tests' venv (podman-compose, kubernetes-validate).
pub(crate) fn venv_tool(name: &str) -> PathBuf {
    let tool = cache_dir().join("venv/bin").join(name);
    assert!(
        tool.exists(),
        "{} is missing: tests/run installs it (a venv in {})",
        tool.display(),
        cache_dir().display()
    );
    tool
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
        let previous = podman_quiet(&["image", "inspect", "--format", "{{.Id}}", HERALD_IMAGE]);
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
        // Each run's binary differs: drop the image the tag moved away from,
        // or every run would leave one behind.
        let previous = String::from_utf8_lossy(&previous.stdout).trim().to_string();
        let current = podman(&["image", "inspect", "--format", "{{.Id}}", HERALD_IMAGE]);
        if !previous.is_empty() && previous != current.trim() {
            let _ = podman_quiet(&["rmi", &previous]);
        }
    });
    HERALD_IMAGE
}

/// Redis and nginx from Debian's packages on the base image
/// (`Containerfile.tools`), built only when no image of this
/// Containerfile's hash exists yet.
pub(crate) fn tools_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let base = base_image();
        let file = here().join("Containerfile.tools");
        let text = std::fs::read(&file).expect("read Containerfile.tools");
        let image = format!("localhost/herald-test-tools:{:016x}", fnv1a(&text));
        if !podman_quiet(&["image", "exists", &image]).status.success() {
            podman(&[
                "build",
                "--quiet",
                "--network",
                "host",
                "--file",
                file.to_str().expect("utf-8 path"),
                "--build-arg",
                &format!("BASE_IMAGE={base}"),
                "--tag",
                &image,
                here().to_str().expect("utf-8 path"),
            ]);
        }
        image
    })
}

/// FNV-1a, 64 bits: a stable content hash for an image tag.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
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

/// Every container carrying `label` (`key=value`), running or not.
pub(crate) fn containers_labelled(label: &str) -> Vec<String> {
    let out = podman_quiet(&[
        "ps",
        "--all",
        "--filter",
        &format!("label={label}"),
        "--format",
        "{{.Names}}",
    ]);
    assert!(
        out.status.success() || std::thread::panicking(),
        "podman ps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A compose file of `deploy/` (`compose.yaml`, `compose.cluster.yaml`)
/// brought up by podman-compose under a unique project name, with the
/// environment the test gives it. Dropping it takes the project down and
/// removes anything still carrying its label.
pub(crate) struct Compose {
    pub(crate) project: String,
    /// The compose file, relative to the repository root.
    file: &'static str,
    env: Vec<(String, String)>,
}

impl Compose {
    /// `deploy/compose.yaml` as a project named `<unique>` with `env`
    /// (ports, images, secret).
    pub(crate) fn new(env: &[(&str, String)]) -> Compose {
        Compose::with_file("deploy/compose.yaml", env)
    }

    /// `file` as a project named `<unique>` with `env`.
    pub(crate) fn with_file(file: &'static str, env: &[(&str, String)]) -> Compose {
        Compose {
            project: unique("herald-compose"),
            file,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    /// `podman-compose -f <file> -p <project> args...`.
    pub(crate) fn run(&self, args: &[&str]) -> String {
        let file = repo().join(self.file);
        let mut all = vec![
            "-f",
            file.to_str().expect("utf-8 path"),
            "-p",
            &self.project,
        ];
        all.extend_from_slice(args);
        let mut cmd = command(venv_tool("podman-compose"), &all);
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("HERALD") {
                cmd.env_remove(&*key);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        checked(cmd)
    }

    /// The label podman-compose puts on every container of the project.
    pub(crate) fn label(&self) -> String {
        format!("io.podman.compose.project={}", self.project)
    }

    /// The container of `service` (podman-compose's `<project>_<service>_1`).
    pub(crate) fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.project)
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let leftovers = containers_labelled(&self.label());
        if leftovers.is_empty() {
            return;
        }
        if std::thread::panicking() {
            for name in &leftovers {
                let out = podman_quiet(&["logs", "--tail", "40", name]);
                eprintln!(
                    "--- {name} log ---\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let mut args = vec!["rm", "--force", "--time", "0"];
        args.extend(leftovers.iter().map(String::as_str));
        let _ = podman_quiet(&args);
        let _ = podman_quiet(&["pod", "rm", "--force", &format!("pod_{}", self.project)]);
    }
}

/// Deployment + ConfigMap + Secret of `deploy/kubernetes/`, as
/// `kube-play-variant` rewrites them for this machine, played with
/// `podman kube play`. Dropping it takes the pod down and removes the
/// secret (which `kube down` leaves behind).
pub(crate) struct KubePlay {
    pub(crate) name: String,
    dir: tempfile::TempDir,
    down: bool,
}

impl KubePlay {
    /// Writes the variant for `name` (its `args` after the directory and
    /// name), creates the secret and plays the rest.
    pub(crate) fn start(name: &str, args: &[&str]) -> KubePlay {
        let dir = tempfile::tempdir().expect("kube play dir");
        let path = dir.path().to_str().expect("utf-8 temp path").to_string();
        let script = here().join("kube-play-variant");
        let mut all = vec![script.to_str().expect("utf-8 path"), &path, name];
        all.extend_from_slice(args);
        checked(command(venv_tool("python"), &all));
        let played = KubePlay {
            name: name.to_string(),
            dir,
            down: false,
        };
        podman(&[
            "secret",
            "create",
            &played.secret(),
            &played.file("secret.json"),
        ]);
        podman(&["kube", "play", &played.file("play.yaml")]);
        played
    }

    /// The Deployment's HTTP probes as (probe, `http://127.0.0.1:<port><path>`),
    /// as the kubelet would send them on the host network.
    pub(crate) fn probes(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(self.file("probes.json")).expect("read probes.json");
        let probes: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).expect("probes.json is JSON");
        probes
            .into_iter()
            .map(|(probe, get)| {
                let url = format!(
                    "http://127.0.0.1:{}{}",
                    get["port"],
                    get["path"].as_str().expect("path")
                );
                (probe, url)
            })
            .collect()
    }

    fn file(&self, name: &str) -> String {
        self.dir
            .path()
            .join(name)
            .to_str()
            .expect("utf-8 path")
            .to_string()
    }

    fn secret(&self) -> String {
        format!("{}-jwt", self.name)
    }

    /// The pod podman made for the Deployment's one replica.
    pub(crate) fn pod(&self) -> String {
        format!("{}-pod-0", self.name)
    }

    /// The Herald container in that pod.
    pub(crate) fn container(&self) -> String {
        format!("{}-herald", self.pod())
    }

    /// Stops the pod the way Kubernetes ends one (the image's STOPSIGNAL,
    /// SIGTERM, then SIGKILL after a grace period); the container stays
    /// for `inspect`. podman 4.3's `kube down` alone SIGKILLs at once
    /// (podman issue 22397, fixed in 5.1), so `down` comes after this.
    pub(crate) fn stop(&self) {
        podman(&["pod", "stop", "--time", "60", &self.pod()]);
    }

    /// `podman kube down` of the played file.
    pub(crate) fn down(&mut self) {
        self.down = true;
        podman(&["kube", "down", &self.file("play.yaml")]);
    }
}

impl Drop for KubePlay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let out = podman_quiet(&["logs", &self.container()]);
            eprintln!(
                "--- {} log ---\n{}{}",
                self.container(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if !self.down {
            let _ = podman_quiet(&["kube", "down", &self.file("play.yaml")]);
        }
        let _ = podman_quiet(&["pod", "rm", "--force", &self.pod()]);
        let _ = podman_quiet(&["secret", "rm", &self.secret()]);
    }
}
