//! The `probe` example, run inside the guest: a zcrx kernel with a capable NIC must be
//! reported as such (the host test, crates/tokio-zcrx/tests/probe_host.rs, covers 6.18).

use std::process::Command;

use serde_json::{json, Value};
use tokio_zcrx_kernel_tests::GuestKernel;

/// Runs the guest's `probe` binary (the examples are on the guest's PATH) with `args`.
fn probe_json(args: &[&str]) -> Value {
    let out = Command::new("probe")
        .arg("--json")
        .args(args)
        .output()
        .expect("the probe example is on the guest's PATH (cargo xtask vm-test puts it there)");
    assert!(out.status.success(), "probe {args:?} failed: {out:?}");
    serde_json::from_slice(&out.stdout).expect("probe --json prints one JSON document")
}

fn interface<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing from {report:#}"))
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn probe_reports_a_zcrx_kernel_and_a_capable_nic() {
    let nic = std::env::var("TZX_NIC").expect("TZX_NIC is set in the guest");
    let report = probe_json(&[]);
    println!("{report:#}");
    assert!(report["kernel_release"].as_str().unwrap().starts_with('7'));
    assert_eq!(report["io_uring"]["usable"], true);
    assert_eq!(report["recv_zc"]["support"], "supported");
    assert_eq!(report["zcrx_query"]["status"], "answered");
    for feature in ["import", "rx_buf_len", "nodev", "events"] {
        assert_eq!(
            report["features"][feature]["support"], "supported",
            "{feature}"
        );
    }
    assert_eq!(report["nodev_trial"]["outcome"], "registered");

    // The zcrx generation: everything up to events on 7.2, ADD_AREA too on 7.3.
    let kernel = GuestKernel::running();
    let generation = &report["generation"];
    let (level, missing) = if kernel.has_add_area() {
        ("7.3", json!([]))
    } else {
        ("7.2", json!(["add_area"]))
    };
    assert_eq!(generation["kernel"], level, "{generation:#}");
    assert_eq!(generation["missing"], missing, "{generation:#}");
    let steps: Vec<(&str, &str, &str)> = generation["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap(),
                s["min_kernel"].as_str().unwrap(),
                s["support"].as_str().unwrap(),
            )
        })
        .collect();
    let add_area = if kernel.has_add_area() {
        "supported"
    } else {
        "unsupported"
    };
    assert_eq!(
        steps,
        [
            ("nic", "6.15", "supported"),
            ("ctrl_ops", "6.19", "supported"),
            ("query", "6.19", "supported"),
            ("rx_buf_len", "7.0", "supported"),
            ("nodev", "7.1", "supported"),
            ("events", "7.2", "supported"),
            ("add_area", "7.3", add_area),
        ]
    );
    assert_eq!(
        report["zcrx_query"]["result"]["ctrl_add_area"],
        kernel.has_add_area()
    );
    // The human summary says what a 7.2 kernel misses, with the release that has it.
    let human = Command::new("probe").output().unwrap();
    let text = String::from_utf8(human.stdout).unwrap();
    let summary = text
        .lines()
        .find(|l| l.trim_start().starts_with("generation"))
        .unwrap_or_else(|| panic!("no generation line in:\n{text}"));
    assert!(
        summary.contains(&format!("Linux {level} level")),
        "{summary}"
    );
    assert_eq!(
        text.contains("missing         ADD_AREA (Linux 7.3+): growing the receive memory"),
        !kernel.has_add_area(),
        "{text}"
    );
    assert_eq!(report["cap_net_admin"]["effective"], true);

    let lo = interface(&report, "lo");
    assert_eq!(lo["verdict"], "unsupported");
    assert_eq!(lo["registration"]["errno"]["name"], "EOPNOTSUPP");

    // By default the probe must not register where it could succeed.
    let nsim = interface(&report, &nic);
    assert_eq!(nsim["tcp_data_split"], "on");
    assert_eq!(nsim["verdict"], "preconditions_met", "{nsim:#}");
    assert_eq!(nsim["registration"]["outcome"], "not_attempted");

    // The 4-queue pair: every rx queue with a NAPI id of its own, nothing bound; steering by
    // rules or RSS contexts is not something netdevsim has.
    let queues = nsim["queues"].as_array().expect("queues");
    let ids: Vec<u64> = queues.iter().map(|q| q["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [0, 1, 2, 3], "{nsim:#}");
    let mut napis: Vec<u64> = queues
        .iter()
        .map(|q| {
            q["napi_id"]
                .as_u64()
                .expect("netdevsim queues have NAPI ids")
        })
        .collect();
    napis.sort_unstable();
    napis.dedup();
    assert_eq!(napis.len(), 4, "distinct NAPI ids: {nsim:#}");
    assert!(queues.iter().all(|q| q["io_uring_provider"] == false));
    assert_eq!(
        nsim["steering"]["first_queue"], 3,
        "the probed (last) queue"
    );
    assert_eq!(nsim["steering"]["ntuple"], "unsupported");
    let commands = nsim["steering"]["commands"].as_array().unwrap();
    assert_eq!(
        commands.last().unwrap(),
        &format!("ethtool -N {nic} flow-type tcp4 dst-port PORT action 3")
    );

    let confirmed = probe_json(&["--interface", &nic, "--queue", "0", "--try-register"]);
    let nsim = interface(&confirmed, &nic);
    assert_eq!(nsim["registration"]["outcome"], "registered", "{nsim:#}");
    assert_eq!(nsim["verdict"], "ready");
}

#[test]
#[ignore = "real-kernel tier: run by `cargo xtask vm-test` in the QEMU guest"]
fn probe_explains_tcp_data_split_off() {
    let nic = std::env::var("TZX_NIC").expect("TZX_NIC is set in the guest");
    let set = |state: &str| {
        let ok = Command::new("ethtool")
            .args(["-G", &nic, "tcp-data-split", state])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ethtool -G {nic} tcp-data-split {state}");
    };
    set("off");
    let report = probe_json(&["--interface", &nic, "--queue", "0"]);
    set("on");
    let nsim = interface(&report, &nic);
    assert_eq!(nsim["tcp_data_split"], "off", "{nsim:#}");
    assert_eq!(nsim["verdict"], "needs_configuration", "{nsim:#}");
    assert_eq!(nsim["registration"]["errno"]["name"], "EINVAL", "{nsim:#}");
    let fix = nsim["fix"].as_str().unwrap();
    assert!(
        fix.contains(&format!("ethtool -G {nic} tcp-data-split on")),
        "{fix}"
    );
}
