//! `pairdb`: parse the command line, load the config, start logging, run the roles.

use std::process::ExitCode;

use clap::Parser;
use pairdb::cli::{Cli, Command, RingCommand, TokenAction, TokenIssueArgs};
use pairdb::config::LogFormat;

/// mimalloc instead of glibc's malloc: every request allocates in several tasks on several
/// threads, and glibc's arenas showed up as ~10% of the coordinator's CPU (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for bad configuration or flags.
const EXIT_CONFIG: u8 = 2;
/// Exit code for a role that failed or could not start.
const EXIT_FAILURE: u8 = 1;

/// A multi-thread runtime with `workers` worker threads (one per core when `None`).
fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder.enable_all().build().map_err(|e| {
        eprintln!("pairdb: cannot start the async runtime: {e}");
        ExitCode::from(EXIT_FAILURE)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Token {
        action: TokenAction::Issue(args),
    }) = &cli.command
    {
        return issue_token(&cli, args);
    }
    if let Some(command @ (Command::Kv { .. } | Command::Admin { .. } | Command::Bench(_))) =
        &cli.command
    {
        return match runtime(None) {
            Ok(rt) => rt.block_on(run_tool(command)),
            Err(code) => code,
        };
    }
    if let Some(Command::Ring {
        command: RingCommand::Simulate(args),
    }) = &cli.command
    {
        return match pairdb::tools::ring::simulate(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pairdb: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
    }
    if let Some(Command::Cert(args)) = &cli.command {
        return make_certificates(args);
    }
    if let Some(Command::Restore(args)) = &cli.command {
        return restore(args);
    }
    if let Some(Command::Dev(args)) = cli.command {
        // No span export here: `pairdb dev` logs only.
        let origin = pairdb::telemetry::Origin {
            service: "pairdb-dev".to_owned(),
            node_id: None,
        };
        if let Err(e) = pairdb::telemetry::init(LogFormat::Human, "info", None, origin) {
            eprintln!("pairdb: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
        let rt = match runtime(None) {
            Ok(rt) => rt,
            Err(code) => return code,
        };
        return match rt.block_on(pairdb::roles::run_dev(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pairdb: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
    }
    if cli.server.print_config {
        return match cli.server.load_config().map(|c| toml::to_string(&c)) {
            Ok(Ok(text)) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Ok(Err(e)) => {
                eprintln!("pairdb: cannot print the config: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
            Err(e) => {
                eprintln!("pairdb: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let config = match cli
        .server
        .load_config()
        .and_then(|c| c.validate().map(|()| c))
    {
        Ok(config) => config,
        Err(e) => {
            eprintln!("pairdb: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.server.check_config {
        println!("configuration ok: roles {:?}", config.node.roles);
        return ExitCode::SUCCESS;
    }
    let rt = match runtime(Some(config.node.runtime_workers())) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // Inside the runtime: the OTLP exporter's channel spawns its task there.
    let telemetry = rt.block_on(async {
        let roles: Vec<String> = config
            .node
            .roles
            .iter()
            .map(|r| format!("{r:?}").to_lowercase())
            .collect();
        pairdb::telemetry::init(
            config.node.log_format,
            &config.node.log_level,
            config.node.otlp_endpoint.as_deref(),
            pairdb::telemetry::Origin {
                service: format!("pairdb-{}", roles.join("+")),
                node_id: config.node.id.as_deref(),
            },
        )
    });
    let telemetry = match telemetry {
        Ok(t) => t,
        Err(e) => {
            eprintln!("pairdb: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let outcome = rt.block_on(pairdb::roles::run(config));
    // Pending spans leave before the runtime goes.
    rt.block_on(async move { drop(telemetry) });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pairdb: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `pairdb cert`: prints the files it wrote.
fn make_certificates(args: &pairdb::cli::CertArgs) -> ExitCode {
    let request = pairdb::tools::cert::CertRequest {
        out_dir: args.out_dir.clone(),
        nodes: args.nodes.clone(),
        sans: args.sans.clone(),
        days: args.days,
    };
    match pairdb::tools::cert::make(&request) {
        Ok(written) => {
            if !written.ca_created {
                println!("using the CA in {}", args.out_dir.display());
            }
            for file in written.files {
                println!("wrote {}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pairdb: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `pairdb token issue`: prints one token on stdout.
fn issue_token(cli: &Cli, args: &TokenIssueArgs) -> ExitCode {
    use pairdb::gateway::auth::{TokenRole, issue, secret};
    let config = match cli.server.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pairdb: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let ttl = match humantime::parse_duration(&args.ttl) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("pairdb: --ttl {:?}: {e}", args.ttl);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = pairdb::limits::check_tenant(&args.tenant) {
        eprintln!("pairdb: --tenant: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let role = if args.admin {
        TokenRole::Admin
    } else {
        TokenRole::Tenant
    };
    match secret(&config.gateway.auth)
        .map_err(anyhow::Error::from)
        .and_then(|s| issue(&s, &args.tenant, role, ttl))
    {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pairdb: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `pairdb kv|admin|bench`: exit 0 on success, 1 on an error answer or failure.
async fn run_tool(command: &Command) -> ExitCode {
    use pairdb::tools::{bench, client};
    let answer = match command {
        Command::Kv { conn, command } => client::kv(conn, command).await,
        Command::Admin { conn, command } => client::admin(conn, command).await,
        Command::Bench(args) => {
            return match bench::run(args).await {
                Ok(report) if args.json => match serde_json::to_string(&report) {
                    Ok(json) => {
                        println!("{json}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("pairdb: {e}");
                        ExitCode::from(EXIT_FAILURE)
                    }
                },
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pairdb: bench: {e:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            };
        }
        _ => return ExitCode::from(EXIT_FAILURE),
    };
    match answer {
        Ok(a) => {
            let text = a
                .text
                .unwrap_or_else(|| serde_json::to_string_pretty(&a.body).unwrap_or_default());
            if a.ok {
                println!("{text}");
                a.exit_code.map_or(ExitCode::SUCCESS, ExitCode::from)
            } else {
                eprintln!("{text}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => {
            eprintln!("pairdb: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `pairdb restore`: a stopped node's data dir rebuilt from a snapshot.
fn restore(args: &pairdb::cli::RestoreArgs) -> ExitCode {
    use pairdb::storage::snapshots;
    let done = snapshots::locate(&args.data_dir, &args.snapshot)
        .map_err(anyhow::Error::from)
        .and_then(|dir| {
            snapshots::restore(
                &args.data_dir,
                &dir,
                args.gc_grace,
                args.allow_older_than_gc_grace,
            )
        });
    match done {
        Ok(info) => {
            println!(
                "restored {} from snapshot {:?} of node {} ({} tables, {} bytes); start the node, \
                 then repair its ranges: pairdb admin repair --node <its id>",
                args.data_dir.display(),
                info.name,
                info.node_id,
                info.tables,
                info.bytes
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pairdb: restore failed: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
