//! Start-up configuration: every flag is documented, and bad configuration
//! fails fast with one clear line instead of a half-started node.

use std::process::{Command, Output};

fn herald(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env_clear()
        .output()
        .expect("run herald")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_documents_every_design_flag_with_its_env_var() {
    let out = herald(&["serve", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "listen",
        "admin-listen",
        "redis-url",
        "channel-prefix",
        "jwt-secret",
        "jwt-public-key",
        "jwt-issuer",
        "jwt-audience",
        "jwt-leeway",
        "cookie-name",
        "allow-query-token",
        "cors-origin",
        "heartbeat",
        "retry",
        "queue-capacity",
        "max-connections",
        "max-connections-per-user",
        "history-size",
        "history-ttl",
        "max-payload",
        "drain-timeout",
        "max-http-connections",
        "jwt-jwks-url",
        "jwt-jwks-refresh",
        "auth-url",
        "auth-timeout",
        "auth-cache-ttl",
        "revocation-ttl",
    ] {
        assert!(
            help.contains(&format!("--{flag}")),
            "--{flag} missing from help"
        );
        let env = format!("HERALD_{}", flag.to_uppercase().replace('-', "_"));
        assert!(help.contains(&env), "{env} missing from help");
        // The name alone, not clap's `HERALD_X=` for an unset variable.
        assert!(!help.contains(&format!("{env}=")), "{env}= in help");
    }
}

#[test]
fn a_bad_duration_or_size_is_refused_naming_the_value() {
    let out = herald(&["--heartbeat", "5 fortnights", "--jwt-secret", "s"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("5 fortnights"), "{}", stderr(&out));
    let out = herald(&["--max-payload", "lots", "--jwt-secret", "s"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("lots"), "{}", stderr(&out));
}

#[test]
fn an_unreadable_key_file_fails_with_one_line() {
    let out = herald(&[
        "--jwt-public-key",
        "/nonexistent/key.pem",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: cannot read --jwt-public-key /nonexistent/key.pem"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn a_taken_listen_address_fails_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = herald(&[
        "--jwt-secret",
        "s",
        "--listen",
        &addr,
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("error: cannot listen on {addr} (--listen)")),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn env_vars_configure_serve() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .env_clear()
        .env("HERALD_LISTEN", &addr)
        .env("HERALD_JWT_SECRET", "s")
        .output()
        .expect("run herald");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot listen on {addr}")),
        "HERALD_LISTEN ignored: {err}"
    );
}
