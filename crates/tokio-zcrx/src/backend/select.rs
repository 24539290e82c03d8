//! Starting a runtime in the builder's mode; `Auto` tries nic, then nodev, then copy, and
//! records why each better mode was refused.

use std::sync::Arc;

use super::copy::CopyRuntime;
use super::uring::{instance, start};
use super::Backend;
use crate::config::{Config, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::mode::{ActiveMode, Mode, ModeSelection};

/// Starts a runtime in the configured mode; `Auto` tries the modes in order and records why
/// each was refused.
pub(crate) fn select_and_start(config: Config) -> Result<(Backend, ModeSelection)> {
    if config.mode != Mode::Copy {
        // A misspelt interface is a mistake in every mode: checked before anything is tried,
        // so that Auto does not hide it behind another mode (nor behind an earlier refusal,
        // such as io_uring being forbidden).
        if let Some(target) = &config.interface {
            instance::check_interface_exists(target)?;
        }
    }
    let copy = |refused: Vec<(Mode, String)>| -> Result<(Backend, ModeSelection)> {
        let runtime = CopyRuntime::new(&config.copy).map_err(|e| {
            Error::new(
                ErrorKind::OutOfMemory,
                "cannot allocate the copy-mode buffer pool",
            )
            .with_source(e)
        })?;
        let selection = ModeSelection {
            chosen: ActiveMode::Copy,
            refused,
            unavailable: Vec::new(),
        };
        Ok((Backend::Copy(Arc::new(runtime)), selection))
    };
    let uring = |target: Target, chosen: ActiveMode, refused: Vec<(Mode, String)>| {
        let handle = start(config.uring_for(target))?;
        let unavailable = handle.unavailable();
        let selection = ModeSelection {
            chosen,
            refused,
            unavailable,
        };
        Ok::<_, Error>((Backend::Uring(handle), selection))
    };
    let (backend, selection) = match config.mode {
        Mode::Copy => copy(Vec::new())?,
        Mode::NoDevice => uring(Target::NoDevice, ActiveMode::NoDevice, Vec::new())?,
        Mode::Nic => {
            let target = config.interface.clone().expect("validate checked it");
            uring(target, ActiveMode::Nic, Vec::new())?
        }
        Mode::Auto => {
            let mut refused = Vec::new();
            let nic = match config.interface.clone() {
                Some(target) => match uring(target, ActiveMode::Nic, Vec::new()) {
                    Ok(started) => Some(started),
                    Err(e) if is_callers_to_fix(&e) => return Err(e),
                    Err(e) => {
                        refused.push((Mode::Nic, e.to_string()));
                        None
                    }
                },
                None => {
                    refused.push((Mode::Nic, "no interface given".to_string()));
                    None
                }
            };
            match nic {
                Some(started) => started,
                None => match uring(Target::NoDevice, ActiveMode::NoDevice, refused.clone()) {
                    Ok(started) => started,
                    Err(e) if is_callers_to_fix(&e) => return Err(e),
                    Err(e) => {
                        refused.push((Mode::NoDevice, e.to_string()));
                        copy(refused)?
                    }
                },
            }
        }
    };
    tracing::info!(
        mode = %selection.chosen,
        receiving = %backend.description(),
        "tokio-zcrx runtime started: {}",
        selection
    );
    Ok((backend, selection))
}

/// Refusals that `Auto` passes on instead of trying the next mode: no mode fixes them (a
/// setting this kernel cannot take, an interface that is not there, no file descriptor left).
fn is_callers_to_fix(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::InvalidConfig | ErrorKind::InterfaceNotFound | ErrorKind::TooManyOpenFiles
    )
}
