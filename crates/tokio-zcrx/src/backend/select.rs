//! Starting a runtime in the builder's mode; `Auto` tries nic, then nodev, then copy, and
//! records why each better mode was refused.

use std::sync::Arc;

use super::copy::CopyRuntime;
use super::queues::{placement, GroupSpec, KernelNapi, QueueGroup};
use super::uring::{instance, start};
use super::Backend;
use crate::config::{Config, QueueSet, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::mode::{ActiveMode, Mode, ModeSelection};
use crate::sys::netdev::NetdevNetlink;

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
        let selection = ModeSelection::new(ActiveMode::Copy, refused);
        Ok((Backend::Copy(Arc::new(runtime)), selection))
    };
    let uring = |target: Target, chosen: ActiveMode, refused: Vec<(Mode, String)>| {
        let mut uring_config = config.uring_for(target.clone());
        let queue = nic_queue(&target);
        if let Some((ifindex, queue)) = queue {
            uring_config.cpus = placement(&config.driver_cpus, 0, napi_of(ifindex, queue));
        }
        let handle = start(uring_config, None)?;
        if let Some((ifindex, queue)) = queue {
            let napi = napi_of(ifindex, queue).unwrap_or(0);
            handle
                .shared
                .napi_id
                .store(napi, std::sync::atomic::Ordering::Relaxed);
        }
        let selection = ModeSelection {
            unavailable: handle.unavailable(),
            queues_bound: queue.map(|(_, queue)| queue).into_iter().collect(),
            ..ModeSelection::new(chosen, refused)
        };
        Ok::<_, Error>((Backend::Uring(handle), selection))
    };
    // Several queues of one interface: a driver each.
    let group = |target: Target, set: &QueueSet, refused: Vec<(Mode, String)>| {
        let (name, ifindex) = match &target {
            Target::Interface { name, .. } => (name.clone(), crate::sys::ifindex(name).ok()),
            Target::InterfaceIndex { index, .. } => (
                crate::sys::interface_name(*index).unwrap_or_else(|_| format!("#{index}")),
                Some(*index),
            ),
            Target::NoDevice => unreachable!("a queue set names an interface"),
        };
        let ifindex = ifindex.ok_or_else(|| {
            Error::new(
                ErrorKind::InterfaceNotFound,
                format!("no network interface {name} in this network namespace"),
            )
        })?;
        let available = crate::sys::rx_queue_count(&name).unwrap_or(0);
        let queues = set.queues(available);
        if queues.is_empty() {
            return Err(Error::new(
                ErrorKind::InterfaceUnsupported,
                format!(
                    "{name} lists no rx queue in /sys/class/net/{name}/queues, so the set \
                     {set} names none: bind queues by index, e.g. .interface_queues(\"{name}\", 0..4)"
                ),
            ));
        }
        if let [queue] = queues.as_slice() {
            let single = match &target {
                Target::Interface { name, .. } => Target::Interface {
                    name: name.clone(),
                    queue: *queue,
                },
                _ => Target::InterfaceIndex {
                    index: ifindex,
                    queue: *queue,
                },
            };
            return uring(single, ActiveMode::Nic, refused);
        }
        let spec = GroupSpec {
            interface: name,
            queues,
            required: config.mode == Mode::Nic,
            napi_wait: config.napi_wait,
            driver_cpus: config.driver_cpus.clone(),
            copy: config.copy.clone(),
        };
        let mut start_queue = |queue: u32, cpus, events| {
            let mut uring_config = config.uring_for(Target::InterfaceIndex {
                index: ifindex,
                queue,
            });
            if let Target::Interface { name, .. } = &target {
                // Named as the builder named it, in messages.
                uring_config.target = Target::Interface {
                    name: name.clone(),
                    queue,
                };
            }
            uring_config.cpus = cpus;
            uring_config.hand_over_moved = true;
            uring_config.thread_name = queue_thread_name(&uring_config.thread_name, queue);
            start(uring_config, Some(events))
        };
        let group = QueueGroup::start(spec, Box::new(KernelNapi { ifindex }), &mut start_queue)?;
        let selection = ModeSelection {
            queues_bound: group.bound(),
            queues_refused: group.refused().to_vec(),
            ..ModeSelection::new(ActiveMode::Nic, refused)
        };
        Ok((Backend::Queues(Arc::new(group)), selection))
    };
    let nic = |target: Target, refused: Vec<(Mode, String)>| match &config.queues {
        Some(set) => group(target, set, refused),
        None => uring(target, ActiveMode::Nic, refused),
    };
    let (backend, selection) = match config.mode {
        Mode::Copy => copy(Vec::new())?,
        Mode::NoDevice => uring(Target::NoDevice, ActiveMode::NoDevice, Vec::new())?,
        Mode::Nic => {
            let target = config.interface.clone().expect("validate checked it");
            nic(target, Vec::new())?
        }
        Mode::Auto => {
            let mut refused = Vec::new();
            let nic = match config.interface.clone() {
                Some(target) => match nic(target, Vec::new()) {
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

/// The interface index and queue of a NIC target (`None` for NODEV, or an unknown name).
fn nic_queue(target: &Target) -> Option<(u32, u32)> {
    match target {
        Target::Interface { name, queue } => Some((crate::sys::ifindex(name).ok()?, *queue)),
        Target::InterfaceIndex { index, queue } => Some((*index, *queue)),
        Target::NoDevice => None,
    }
}

/// The NAPI id of `queue` of `ifindex`, if the kernel says.
fn napi_of(ifindex: u32, queue: u32) -> Option<u32> {
    NetdevNetlink::open()
        .ok()?
        .rx_queue(ifindex, queue)
        .ok()?
        .napi_id
}

/// `base` with `-qN` appended, within the 15 bytes Linux keeps of a thread name.
fn queue_thread_name(base: &str, queue: u32) -> String {
    let suffix = format!("-q{queue}");
    let mut keep = 15usize.saturating_sub(suffix.len()).min(base.len());
    while !base.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", &base[..keep])
}

/// Refusals that `Auto` passes on instead of trying the next mode: no mode fixes them (a
/// setting this kernel cannot take, an interface that is not there, no file descriptor left).
fn is_callers_to_fix(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::InvalidConfig | ErrorKind::InterfaceNotFound | ErrorKind::TooManyOpenFiles
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{Builder, DriverCpus, QueueSet};

    #[test]
    fn queue_threads_are_named_within_linux_limit() {
        assert_eq!(queue_thread_name("tokio-zcrx-driver", 4), "tokio-zcrx-d-q4");
        assert_eq!(
            queue_thread_name("tokio-zcrx-driver", 123),
            "tokio-zcrx-q123"
        );
        assert_eq!(queue_thread_name("rx", 7), "rx-q7");
        // Not inside a character.
        assert_eq!(queue_thread_name("ééééééé", 1), "éééééé-q1");
    }

    #[test]
    fn queue_sets_are_checked_and_carried() {
        let config = Builder::new()
            .interface_queues("eth0", 0..4)
            .napi_wait(Duration::from_millis(50))
            .validate()
            .unwrap();
        assert_eq!(config.queues, Some(QueueSet::Range(0..=3)));
        assert_eq!(config.napi_wait, Duration::from_millis(50));
        assert_eq!(config.driver_cpus, DriverCpus::NearInterrupt);
        // One queue is `interface(name, queue)`.
        let config = Builder::new()
            .interface_queues("eth0", 5)
            .validate()
            .unwrap();
        assert_eq!(config.queues, None);
        assert_eq!(
            config.interface,
            Some(Target::Interface {
                name: "eth0".into(),
                queue: 5
            })
        );
        // `interface` after a set replaces it.
        let config = Builder::new()
            .interface_queues("eth0", QueueSet::All)
            .interface("eth1", 2)
            .validate()
            .unwrap();
        assert_eq!(config.queues, None);
        for (builder, words) in [
            (
                Builder::new().interface_queues("eth0", Vec::new()),
                "names no queue",
            ),
            (
                Builder::new().interface_queues("eth0", 3..3),
                "names no queue",
            ),
            (
                Builder::new()
                    .interface_queues("eth0", 0..2)
                    .driver_cpus(DriverCpus::Cpus(Vec::new())),
                "at least one CPU",
            ),
            (
                Builder::new()
                    .interface_queues("eth0", 0..2)
                    .napi_wait(Duration::from_secs(11)),
                "NAPI wait",
            ),
            (
                Builder::new().driver_linger(Duration::from_millis(2)),
                "driver linger",
            ),
        ] {
            let error = builder.validate().unwrap_err();
            assert_eq!(error.kind(), ErrorKind::InvalidConfig);
            assert!(error.to_string().contains(words), "{error}");
        }
    }

    #[test]
    fn a_missing_interface_fails_a_queue_set_in_auto_mode_too() {
        let error = Builder::new()
            .interface_queues("no-such-if9", 0..4)
            .build()
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InterfaceNotFound);
    }
}
