//! The tidelog broker binary.

use std::process::ExitCode;

use tidelog_engine::config::{self, Command};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match config::from_args(&args, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tidelog: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match command {
        Command::Help => {
            print!("{}", config::help_text());
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("tidelog {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Run(c) => c,
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(config.log_level.as_str()))
        .format_timestamp_millis()
        .init();
    match tidelog_engine::broker::run(*config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("tidelog: {e}");
            ExitCode::from(1)
        }
    }
}
