//! Stop requests: SIGTERM (how Kubernetes, podman and process managers stop a process) and SIGINT set a flag
//! that the roles poll at safe points (a worker between steps, the supervisor in its loop); a second signal
//! exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use m3d_coordinator::cli::Terminated;

/// A flag set on the first SIGTERM or SIGINT; the second exits with status 143 without waiting.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal thread's runtime")?;
    // Registered here, before this returns, so a signal that arrives early is not lost to the default action.
    let (mut term, mut int) = rt
        .block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .context("installing the SIGTERM handler")?;
    let set = flag.clone();
    std::thread::Builder::new()
        .name("m3d-signals".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut seen = 0;
                loop {
                    let name = tokio::select! {
                        _ = term.recv() => "SIGTERM",
                        _ = int.recv() => "SIGINT",
                    };
                    seen += 1;
                    if seen > 1 {
                        eprintln!("{name} again: exiting now");
                        std::process::exit(i32::from(Terminated::EXIT_STATUS));
                    }
                    tracing::info!(
                        signal = name,
                        "stop requested: finishing the current step and saving"
                    );
                    set.store(true, Ordering::SeqCst);
                }
            })
        })
        .context("starting the signal thread")?;
    Ok(flag)
}

/// Sends SIGTERM to process `pid` (a supervised worker); a process already gone is not an error.
pub fn terminate(pid: u32) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}
