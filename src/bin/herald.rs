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
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(config) => serve(config).await,
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

async fn serve(config: herald::config::ServeConfig) -> anyhow::Result<()> {
    let node = Node::bind(config).await?;
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
    node.run(shutdown_signal()).await
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let secret = args.keys.jwt_secret.as_deref().ok_or_else(|| {
        anyhow::anyhow!("`herald token` signs with --jwt-secret (or HERALD_JWT_SECRET)")
    })?;
    let token = herald::auth::mint(secret, &args.sub, args.topics, args.publish, args.ttl)?;
    println!("{token}");
    Ok(())
}

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    herald::cli::publish(args).await
}
