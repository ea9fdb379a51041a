//! The report's plot, one SVG with four panels: per-packet cost per verdict path against the
//! server count with the floor; UDP and TCP throughput of each filter as a share of no filter;
//! the control plane next to nftables.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::{coord::Shift, prelude::*};
use serde_json::Value;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn fail<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plot: {e:?}")
}

pub fn svg(report: &Value, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 1700)).into_drawing_area();
    root.fill(&WHITE).map_err(fail)?;
    let panels = root.split_evenly((4, 1));
    // A part left out by `--only` is null: its panels stay empty.
    if !report["per_packet"].is_null() {
        per_packet(&panels[0], &report["per_packet"])?;
    }
    if !report["throughput"].is_null() {
        let tp = &report["throughput"];
        throughput(&panels[1], tp, "udp64_pps", "UDP 64-byte packets/s")?;
        throughput(&panels[2], tp, "tcp_gbits", "TCP Gbit/s")?;
    }
    if !report["control"].is_null() || !report["daemon"].is_null() {
        control(&panels[3], &report["control"], &report["daemon"])?;
    }
    root.present().map_err(fail)?;
    Ok(())
}

fn color(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    COLORS[i % COLORS.len()]
}

fn per_packet(area: &Area, pp: &Value) -> Result<()> {
    let lan = pp["lan_prefixes"]
        .as_array()
        .and_then(|l| l.last())
        .cloned()
        .unwrap_or(Value::from(1));
    let rows: Vec<&Value> = pp["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["lan_prefixes"] == lan && r.get("vs_floor").is_some())
        .collect();
    let point = |r: &Value| {
        (
            r["servers"].as_f64().unwrap_or(1.0).log10(),
            r["ns"]["median"].as_f64().unwrap_or(0.0),
        )
    };
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let floor: Vec<(f64, f64)> = pp["floor"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["lan_prefixes"] == lan)
        .map(point)
        .collect();
    for r in &rows {
        let name = r["path"].as_str().unwrap_or("?").to_owned();
        match series.iter_mut().find(|(n, _)| *n == name) {
            Some((_, points)) => points.push(point(r)),
            None => series.push((name, vec![point(r)])),
        }
    }
    let top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.1))
        .fold(10.0, f64::max)
        * 1.15;
    let right = floor.iter().map(|p| p.0).fold(1.0, f64::max) + 0.3;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("Per-packet cost (BPF_PROG_TEST_RUN, {lan} LAN prefixes)"),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.3f64..right, 0f64..top)
        .map_err(fail)?;
    chart
        .configure_mesh()
        .x_desc("servers in the list")
        .y_desc("ns per packet")
        .x_labels(7)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 0.01 && *x >= 0.0 {
                crate::report::thousands(10f64.powf(x.round()) as u64)
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(fail)?;
    let mut draw = |name: &str, points: &[(f64, f64)], style: ShapeStyle| -> Result<()> {
        chart
            .draw_series(LineSeries::new(points.iter().copied(), style))
            .map_err(fail)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, style.filled())))
            .map_err(fail)?;
        Ok(())
    };
    draw("floor", &floor, BLACK.stroke_width(3))?;
    for (i, (name, points)) in series.iter().enumerate() {
        draw(name, points, color(i).stroke_width(2))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(fail)?;
    Ok(())
}

fn throughput(area: &Area, tp: &Value, test: &str, what: &str) -> Result<()> {
    let rows: Vec<&Value> = tp["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["test"] == test && r["variant"] != "none")
        .collect();
    let counts: Vec<u64> = tp["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in &rows {
        let name = format!(
            "{}, {} path",
            r["variant"].as_str().unwrap_or("?"),
            r["path"].as_str().unwrap_or("?")
        );
        let x = counts.iter().position(|c| r["servers"] == *c).unwrap_or(0) as f64;
        let y = r["vs_no_filter"].as_f64().unwrap_or(0.0);
        match series.iter_mut().find(|(n, _)| *n == name) {
            Some((_, points)) => points.push((x, y)),
            None => series.push((name, vec![(x, y)])),
        }
    }
    let top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.1))
        .fold(1.1, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("Throughput, {what}, as a share of no filter (iperf3 through veth)"),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(counts.len() as f64 - 0.5), 0f64..top)
        .map_err(fail)?;
    let labels = counts.clone();
    chart
        .configure_mesh()
        .x_desc("servers in the list (flow to the last one added)")
        .y_desc("× no filter")
        .x_labels(counts.len().max(2) * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels
                    .get(i as usize)
                    .map_or(String::new(), |c| crate::report::thousands(*c))
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(fail)?;
    chart
        .draw_series(LineSeries::new(
            [(-0.5, 1.0), (counts.len() as f64 - 0.5, 1.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(fail)?
        .label("no filter")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    for (i, (name, points)) in series.iter().enumerate() {
        // The tunnel path dashed-looking (thin), the server path thick, one colour per backend.
        let backend = [
            "ebpf",
            "nftables",
            "iptables",
            "floor",
            "ebpf+guard",
            "empty",
        ]
        .iter()
        .position(|b| name.split(',').next() == Some(b))
        .unwrap_or(i);
        let width = if name.contains("tunnel") { 1 } else { 3 };
        let style = color(backend).stroke_width(width);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), style))
            .map_err(fail)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 4, style.filled())))
            .map_err(fail)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(fail)?;
    Ok(())
}

fn control(area: &Area, cp: &Value, daemon: &Value) -> Result<()> {
    let ms = |what: &str| {
        cp["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["what"] == what)
            .and_then(|r| r["ms"]["median"].as_f64())
            .unwrap_or(0.0)
    };
    let set = |who: &str| {
        daemon["servers_set_ms"][who]["median"]
            .as_f64()
            .unwrap_or(0.0)
    };
    // Per operation: killswitch eBPF, killswitch nftables backend, nft.
    let groups = [
        ("validate", [ms("check"), 0.0, ms("nft -c -f")]),
        (
            "cold up",
            [
                ms("cold up, eBPF"),
                ms("cold up, nftables backend"),
                ms("nft -f, new table"),
            ],
        ),
        (
            "re-up",
            [
                ms("re-up, eBPF"),
                ms("re-up, nftables backend"),
                ms("nft -f, table replaced"),
            ],
        ),
        ("servers set", [set("ebpf"), set("nftables"), set("nft")]),
    ];
    let top = groups
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "Control plane, {} servers (ms, median)",
                crate::report::thousands(cp["servers"].as_u64().unwrap_or(0))
            ),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(groups.len() as f64 - 0.5), 0f64..top)
        .map_err(fail)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("ms")
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                groups
                    .get(i as usize)
                    .map_or(String::new(), |g| g.0.to_owned())
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(fail)?;
    for (k, who) in ["killswitch, eBPF", "killswitch, nftables backend", "nft"]
        .iter()
        .enumerate()
    {
        let style = color(k).filled();
        chart
            .draw_series(groups.iter().enumerate().map(|(i, (_, values))| {
                let left = i as f64 - 0.36 + k as f64 * 0.24;
                Rectangle::new([(left, 0.0), (left + 0.22, values[k])], style)
            }))
            .map_err(fail)?
            .label(*who)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(fail)?;
    Ok(())
}
