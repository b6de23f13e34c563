//! The `herald` binary: parse flags, set up logging, hand over to the library.

use std::io::Write as _;
use std::process::ExitCode;

use herald::config::{Cli, Command, PublishArgs, TokenArgs};
use herald::Node;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse_with_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: systemd journals and log files get
        // plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let workers = match &cli.command {
        Command::Serve(config) => config.workers,
        _ => 0,
    };
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if workers > 1 {
        builder.worker_threads(workers);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(config) => serve(*config).await,
            Command::Token(args) => token(args),
            Command::Publish(args) => publish(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(mut config: herald::config::ServeConfig) -> anyhow::Result<()> {
    // Listen for signals before anything else: a SIGTERM that arrives right
    // after start-up (systemd, a test) must drain, not kill.
    let shutdown = shutdown_signal()?;
    // Every SSE connection is a file descriptor: use all the process may.
    let mut lowered = None;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::debug!(limit, "open files limit");
            let allowed = herald::config::connections_within(config.max_connections, limit);
            if allowed < config.max_connections {
                lowered = Some((config.max_connections, allowed, limit));
                config.max_connections = allowed;
            }
        }
        Err(error) => tracing::warn!(%error, "could not raise the open files limit"),
    }
    let node = Node::bind(config).await?;
    // Said once the node is up, so a start that fails says only why.
    if let Some((requested, allowed, open_files)) = lowered {
        // Info, not a warning: with the default 100,000 it is what most
        // machines' limits mean, not a mistake of the operator's.
        tracing::info!(
            requested,
            allowed,
            open_files,
            "event streams capped by the open files limit (--max-connections); \
             beyond it new ones get a 503"
        );
    }
    let public = node.public_addr();
    let mut out = std::io::stdout().lock();
    if let Some(token) = node.demo_token() {
        writeln!(out, "demo token: {token}")?;
        writeln!(out, "demo page: http://{public}/#token={token}")?;
    }
    writeln!(
        out,
        "herald listening public=http://{public} admin=http://{} node={}",
        node.admin_addr(),
        node.id()
    )?;
    out.flush()?;
    drop(out);
    node.run(shutdown).await
}

/// Installs the SIGINT and SIGTERM handlers now; the returned future
/// resolves on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    // With several secrets (rotation) the first one, the newest, signs.
    let secret = args.keys.jwt_secret.first().ok_or_else(|| {
        anyhow::anyhow!("`herald token` signs with --jwt-secret (or HERALD_JWT_SECRET)")
    })?;
    let claims = herald::auth::Claims {
        topics: args.topics,
        publish: args.publish,
        control: args.control,
        ..herald::auth::Claims::issue(&args.sub, args.ttl)
    };
    let token = herald::auth::sign(secret, &claims, args.kid.as_deref())?;
    println!("{token}");
    Ok(())
}

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    herald::cli::publish(args).await
}
