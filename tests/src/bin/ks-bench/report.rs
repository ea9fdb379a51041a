//! The report as Markdown: the machine, then one table per measurement with medians, min–max
//! and the ratios the targets are stated in (reported, never asserted).

use std::fmt::Write as _;

use serde_json::Value;

pub use killswitch::verify::thousands;

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// "median (min–max)" with `digits` decimals.
fn spread(stats: &Value, digits: usize) -> String {
    format!(
        "{:.digits$} ({:.digits$}–{:.digits$})",
        num(&stats["median"]),
        num(&stats["min"]),
        num(&stats["max"])
    )
}

pub fn markdown(report: &Value) -> String {
    let mut md = String::new();
    let m = &report["machine"];
    let _ = writeln!(
        md,
        "# killswitch benchmark{}\n\nMeasured on Linux {}, {} ({} cores, {} GiB), in {:.0} s. Medians of interleaved rounds, with min–max; ratios are of medians from the same run (of throughput: medians of each round's ratio).\n",
        if report["quick"] == true { " (quick smoke run: small sizes, few rounds; not for comparison)" } else { "" },
        m["kernel"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_gib"],
        num(&report["seconds"]),
    );
    // A part left out by `--only` is null.
    if !report["per_packet"].is_null() {
        per_packet(&mut md, &report["per_packet"]);
    }
    if !report["throughput"].is_null() {
        throughput(&mut md, &report["throughput"]);
    }
    if !report["control"].is_null() || !report["daemon"].is_null() {
        control(&mut md, &report["control"], &report["daemon"]);
    }
    md
}

fn per_packet(md: &mut String, pp: &Value) {
    let servers: Vec<u64> = pp["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    let lan = pp["lan_prefixes"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(Value::as_u64)
        .unwrap_or(1);
    let _ = writeln!(
        md,
        "## Per-packet cost\n\nBPF_PROG_TEST_RUN of the egress program, ns per packet, median of {} rounds × {} runs (min–max), and × the floor (a program that only counts and allows) in the same rounds; {} LAN prefixes.\n",
        pp["rounds"],
        thousands(pp["repeat"].as_u64().unwrap_or(0)),
        thousands(lan)
    );
    let header: Vec<String> = servers
        .iter()
        .map(|s| format!("{} servers", thousands(*s)))
        .collect();
    let _ = writeln!(
        md,
        "| path | {} | at {} vs 1 server |",
        header.join(" | "),
        thousands(*servers.last().unwrap_or(&1))
    );
    let _ = writeln!(md, "|---|{}---|", "---|".repeat(servers.len()));
    let rows = pp["rows"].as_array().cloned().unwrap_or_default();
    let floors = pp["floor"].as_array().cloned().unwrap_or_default();
    let floor_cells: Vec<String> = servers
        .iter()
        .map(|s| {
            floors
                .iter()
                .find(|f| f["servers"] == *s && f["lan_prefixes"] == lan)
                .map_or("–".into(), |f| spread(&f["ns"], 0))
        })
        .collect();
    let _ = writeln!(md, "| floor | {} | |", floor_cells.join(" | "));
    let mut names: Vec<String> = Vec::new();
    for row in &rows {
        let name = row["path"].as_str().unwrap_or("?").to_owned();
        if !names.contains(&name) && row.get("vs_floor").is_some() {
            names.push(name);
        }
    }
    for name in &names {
        let cells: Vec<String> = servers
            .iter()
            .map(|s| {
                rows.iter()
                    .find(|r| r["path"] == *name && r["servers"] == *s && r["lan_prefixes"] == lan)
                    .map_or("–".into(), |r| {
                        format!("{} ×{:.2}", spread(&r["ns"], 0), num(&r["vs_floor"]))
                    })
            })
            .collect();
        let growth = pp["growth"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|g| g["path"] == *name)
            .map_or("–".into(), |g| format!("{:.2}", num(&g["vs_one_server"])));
        let _ = writeln!(md, "| {name} | {} | {growth} |", cells.join(" | "));
    }
    let path = |r: &Value| r["path"].as_str().unwrap_or("?").to_owned();
    for row in rows.iter().filter(|r| path(r).ends_with(" + event")) {
        let _ = writeln!(
            md,
            "\n{} (1 server, every drop reported, no rate limit): {} ns.",
            path(row),
            spread(&row["ns"], 0)
        );
    }
    let _ = writeln!(
        md,
        "\n`killswitch trace` off (the programs that enforce: aya-log's level is off, the verifier removes the logging) and on (the copy `trace` swaps in), 1 server, same rounds, ns per packet:\n\n| path | trace off | trace on | on / off |\n|---|---|---|---|"
    );
    for on in rows.iter().filter(|r| path(r).ends_with(", trace on")) {
        let name = path(on).trim_end_matches(", trace on").to_owned();
        let off = rows
            .iter()
            .find(|r| path(r) == format!("{name}, trace off"))
            .map_or("–".into(), |r| spread(&r["ns"], 0));
        let _ = writeln!(
            md,
            "| {name} | {off} | {} | {:.2} |",
            spread(&on["ns"], 0),
            num(&on["vs_off"])
        );
    }
    let bits: Vec<&Value> = rows
        .iter()
        .filter(|r| path(r).ends_with(", tunnel bits 0"))
        .collect();
    if let Some(first) = bits.first() {
        let _ = writeln!(
            md,
            "\nThe tunnel bits (`Settings.tunnel_free`: a packet on an uplink skips the tunnel lookup) as `up` writes them and all 0 (every packet looks the tunnels up), {} servers, {} LAN prefixes, same rounds, ns per packet:\n\n| path | bits as written | bits 0 | written / 0 |\n|---|---|---|---|",
            thousands(first["servers"].as_u64().unwrap_or(0)),
            thousands(first["lan_prefixes"].as_u64().unwrap_or(0)),
        );
    }
    for row in bits {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} |",
            path(row).trim_end_matches(", tunnel bits 0"),
            spread(&row["with_bits_ns"], 0),
            spread(&row["ns"], 0),
            num(&row["with_bits_vs_without"])
        );
    }
    let _ = writeln!(
        md,
        "\nThe uplink guard (a tc program on the uplink; the tunnel has none), 1 server, same rounds, ns per frame:\n\n| path | floor | cgroup program | guard | guard / floor | guard / cgroup program |\n|---|---|---|---|---|---|"
    );
    for row in rows.iter().filter(|r| path(r).ends_with(", guard")) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.2} | {:.2} |",
            path(row).trim_end_matches(", guard"),
            spread(&row["floor_ns"], 0),
            spread(&row["cgroup_ns"], 0),
            spread(&row["ns"], 0),
            num(&row["guard_vs_floor"]),
            num(&row["guard_vs_cgroup"])
        );
    }
    let _ = writeln!(
        md,
        "\nTargets: tunnel ≤ 2.5× floor, server ≤ 5×, LAN ≤ 6×, default drop ≤ 6× at 100,000 servers and 1,000 LAN prefixes; every path at 100,000 servers within 1.1× of 1 server.\n"
    );
}

fn throughput(md: &mut String, tp: &Value) {
    let _ = writeln!(
        md,
        "## Throughput\n\niperf3 through a veth pair between two namespaces, the client in the scope's cgroup, {} s per run, the sender and the receiver each on a CPU of its own; median of {} rounds (min–max), and × no filter: the median of each round's ratio to the no-filter run of the same round. UDP: 64-byte datagrams received per second; TCP: Gbit/s. The server path goes to the last server added. The empty program only allows: what the kernel's cgroup_skb hook costs with any program attached; the floor program counts and allows: the least a filter that keeps counters does.\n",
        tp["seconds_per_run"].as_str().unwrap_or("?"),
        tp["rounds"]
    );
    let _ = writeln!(
        md,
        "| path | servers | test | no filter | empty program | floor program | eBPF | eBPF + guard | nftables | iptables |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let (slices, rows): (Vec<Value>, Vec<Value>) = tp["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .partition(|r| r["test"] == "udp64_slices");
    let mut keys: Vec<(String, u64, String)> = Vec::new();
    for r in &rows {
        let key = (
            r["path"].as_str().unwrap_or("?").to_owned(),
            r["servers"].as_u64().unwrap_or(0),
            r["test"].as_str().unwrap_or("?").to_owned(),
        );
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    for (path, servers, test) in keys {
        let cell = |variant: &str| {
            rows.iter()
                .find(|r| {
                    r["path"] == path.as_str()
                        && r["servers"] == servers
                        && r["test"] == test.as_str()
                        && r["variant"] == variant
                })
                .map_or("–".into(), |r| {
                    let digits = if test == "tcp_gbits" { 2 } else { 0 };
                    let value = spread(&r["value"], digits);
                    if variant == "none" {
                        value
                    } else {
                        format!("{value} ×{:.3}", num(&r["vs_no_filter"]))
                    }
                })
        };
        let _ = writeln!(
            md,
            "| {path} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(servers),
            if test == "tcp_gbits" {
                "TCP Gbit/s"
            } else {
                "UDP 64 B pps"
            },
            cell("none"),
            cell("empty"),
            cell("floor"),
            cell("ebpf"),
            cell("ebpf+guard"),
            cell("nftables"),
            cell("iptables")
        );
    }
    udp_slices(md, tp, &slices);
    let _ = writeln!(
        md,
        "\nTargets: eBPF ≥ 0.97 of no filter (UDP 64-byte pps, median; both tables) on both paths and above nftables in the same run; TCP within noise of no filter.\n"
    );
}

/// The UDP rows measured in interleaved slices: × no filter and × the floor program, each the
/// median of the rounds' ratios with the middle half of the rounds.
fn udp_slices(md: &mut String, tp: &Value, rows: &[Value]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\nUDP 64-byte datagrams in interleaved slices: one sender per variant, each sending for {} ms in turn, {} rounds; the sender's datagrams per second (the side a filter slows). × no filter and × floor program: the median of each round's ratio, with the middle half of the rounds (q1–q3).\n",
        tp["slice_ms"], tp["slice_rounds"]
    );
    let _ = writeln!(
        md,
        "| path | servers | no filter, pps (min–max) | empty program | floor program | eBPF | eBPF + guard | nftables | iptables | eBPF × floor |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut keys: Vec<(String, u64)> = Vec::new();
    for r in rows {
        let key = (
            r["path"].as_str().unwrap_or("?").to_owned(),
            r["servers"].as_u64().unwrap_or(0),
        );
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let quartiles = |q: &Value| {
        format!(
            "{:.3} ({:.3}–{:.3})",
            num(&q["median"]),
            num(&q["q1"]),
            num(&q["q3"])
        )
    };
    for (path, servers) in keys {
        let row = |variant: &str| {
            rows.iter().find(|r| {
                r["path"] == path.as_str() && r["servers"] == servers && r["variant"] == variant
            })
        };
        let cell = |variant: &str| {
            row(variant).map_or("–".into(), |r| quartiles(&r["vs_no_filter_quartiles"]))
        };
        let _ = writeln!(
            md,
            "| {path} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(servers),
            row("none").map_or("–".into(), |r| spread(&r["value"], 0)),
            cell("empty"),
            cell("floor"),
            cell("ebpf"),
            cell("ebpf+guard"),
            cell("nftables"),
            cell("iptables"),
            row("ebpf").map_or("–".into(), |r| quartiles(&r["vs_floor_quartiles"])),
        );
    }
    let arrived = rows
        .iter()
        .filter_map(|r| r["arrived"].as_f64())
        .fold(f64::INFINITY, f64::min);
    if arrived.is_finite() {
        let _ = writeln!(
            md,
            "\nOf the datagrams sent, at least {:.1} % arrived at the receiver in every variant and row.",
            arrived * 100.0
        );
    }
}

fn control(md: &mut String, cp: &Value, daemon: &Value) {
    let _ = writeln!(
        md,
        "## Control plane\n\nRelease build, {} servers{}, ms, median of {} rounds (min–max), each next to its nftables equivalent in the same rounds.\n",
        thousands(cp["servers"].as_u64().or(daemon["servers"].as_u64()).unwrap_or(0)),
        cp["lan_prefixes"]
            .as_u64()
            .map_or(String::new(), |n| format!(" and {} LAN prefixes", thousands(n))),
        cp["rounds"].as_u64().or(daemon["rounds"].as_u64()).unwrap_or(0)
    );
    let rows = cp["rows"].as_array().cloned().unwrap_or_default();
    let ms = |what: &str| {
        rows.iter()
            .find(|r| r["what"] == what)
            .map_or("–".into(), |r| spread(&r["ms"], 1))
    };
    let median = |what: &str| {
        rows.iter()
            .find(|r| r["what"] == what)
            .map_or(f64::NAN, |r| num(&r["ms"]["median"]))
    };
    let _ = writeln!(
        md,
        "| operation | killswitch, eBPF | killswitch, nftables backend | nft | eBPF × nft |\n|---|---|---|---|---|"
    );
    if !cp.is_null() {
        let _ = writeln!(
            md,
            "| validate (`check` / `nft -c -f`) | {} | | {} | {:.2} |",
            ms("check"),
            ms("nft -c -f"),
            median("check") / median("nft -c -f")
        );
        for (label, ebpf, backend, nft) in [
            (
                "cold `up` / `nft -f` of a new table",
                "cold up, eBPF",
                "cold up, nftables backend",
                "nft -f, new table",
            ),
            (
                "re-`up` / `nft -f` replacing the table",
                "re-up, eBPF",
                "re-up, nftables backend",
                "nft -f, table replaced",
            ),
        ] {
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {:.2} |",
                ms(ebpf),
                ms(backend),
                ms(nft),
                median(ebpf) / median(nft)
            );
        }
    }
    // A run of one part (`--only control` or `--only daemon`) has only its own rows.
    if daemon.is_null() {
        let _ = writeln!(md, "\n{TARGETS}");
        return;
    }
    let set = &daemon["servers_set_ms"];
    let _ = writeln!(
        md,
        "| `servers set` of {0} replacing {0} / one `nft -f` transaction | {1} | {2} | {3} | {4:.2} |",
        thousands(daemon["servers"].as_u64().unwrap_or(0)),
        spread(&set["ebpf"], 1),
        spread(&set["nftables"], 1),
        spread(&set["nft"], 1),
        num(&set["ebpf"]["median"]) / num(&set["nft"]["median"])
    );
    let _ = writeln!(
        md,
        "| link event → tunnel map, µs (added / removed) | {} / {} | (names: nothing to update) | | |",
        spread(&daemon["link_added_to_map_us"], 0),
        spread(&daemon["link_removed_from_map_us"], 0),
    );
    let _ = writeln!(
        md,
        "\nThe daemon's resident memory with {} servers: {} KiB.\n\n{TARGETS}",
        thousands(daemon["servers"].as_u64().unwrap_or(0)),
        thousands(daemon["daemon_rss_kib"].as_u64().unwrap_or(0))
    );
}

const TARGETS: &str = "Targets: cold `up` and `servers set` of 10,000 at or below `nft -f` of the same sets; link event → map update median ≤ 2 ms.";
