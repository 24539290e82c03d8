//! PNG charts of the results, drawn with plotters' bitmap backend. Text is rendered by
//! ab_glyph from an embedded DejaVu Sans (the `dejavu` crate), so no system fonts or
//! fontconfig are needed.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::protocol::{Receiver, ZcrxInfo};
use crate::receive::Summary;
use crate::scaling::ScalingSummary;
use crate::stats::Spread;
use crate::system::Machine;

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn register_fonts() -> Result<()> {
    static REGISTER: Once = Once::new();
    let mut result = Ok(());
    REGISTER.call_once(|| {
        let fonts = [
            (FontStyle::Normal, dejavu::sans::regular()),
            (FontStyle::Bold, dejavu::sans::bold()),
        ];
        for (style, bytes) in fonts {
            if plotters::style::register_font("sans-serif", style, bytes).is_err() {
                result = Err(anyhow!("the embedded DejaVu font did not load"));
            }
        }
    });
    result
}

fn color(receiver: Receiver) -> RGBColor {
    match receiver {
        Receiver::TokioZcrx => RGBColor(230, 120, 20),
        Receiver::TokioRead => RGBColor(45, 105, 200),
        Receiver::TokioUring => RGBColor(60, 160, 85),
        Receiver::StdThreads => RGBColor(130, 130, 130),
    }
}

fn short_label(receiver: Receiver, zcrx: Option<&ZcrxInfo>) -> String {
    match receiver {
        Receiver::TokioZcrx => match zcrx {
            Some(info) => format!("tokio-zcrx ({})", info.mode),
            None => "tokio-zcrx".into(),
        },
        Receiver::TokioRead => "tokio read".into(),
        Receiver::TokioUring => "tokio-uring".into(),
        Receiver::StdThreads => "std threads".into(),
    }
}

/// One bar: a median with its range, or a failure.
struct Bar {
    label: String,
    color: RGBColor,
    spread: Option<Spread>,
}

/// The title block's lines: the title, the machine, and how tokio-zcrx chose its mode,
/// wrapped to fit `width` pixels.
fn header_lines(
    title: &str,
    machine: &Machine,
    zcrx: Option<&ZcrxInfo>,
    width: u32,
) -> Vec<String> {
    let mut line = format!("{machine}");
    if let Some(info) = zcrx {
        line.push_str(&format!("; tokio-zcrx mode: {}", info.mode));
    }
    let mut lines = vec![title.to_string(), line];
    if let Some(info) = zcrx {
        // About 8.5 pixels per character at 16 px.
        let max_chars = (width as usize).saturating_sub(30) * 2 / 17;
        lines.extend(wrap(
            &format!("mode selection: {}", info.mode_selection),
            max_chars,
        ));
    }
    lines
}

/// Splits `text` at spaces into lines of at most `max` characters (longer words stay whole).
fn wrap(text: &str, max: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for word in text.split(' ') {
        if !current.is_empty() && current.chars().count() + 1 + word.chars().count() > max {
            lines.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(word);
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

/// Height in pixels of a title block of `lines` lines.
fn header_height(lines: usize) -> u32 {
    24 + 32 + 24 * lines.saturating_sub(1) as u32
}

/// Draws a title block: a bold first line and smaller ones under it.
fn title_block(area: &Area<'_>, lines: &[String]) -> Result<()> {
    let mut y = 10;
    for (i, line) in lines.iter().enumerate() {
        let (size, style) = if i == 0 {
            (24, FontStyle::Bold)
        } else {
            (16, FontStyle::Normal)
        };
        area.draw(&Text::new(
            line.clone(),
            (14, y),
            ("sans-serif", size).into_font().style(style).color(&BLACK),
        ))?;
        y += if i == 0 { 34 } else { 24 };
    }
    Ok(())
}

/// A bar chart with min-max whiskers and the median printed above each bar.
fn bar_panel(
    area: &Area<'_>,
    caption: &str,
    y_desc: &str,
    bars: &[Bar],
    show: impl Fn(f64) -> String,
) -> Result<()> {
    let top = bars
        .iter()
        .filter_map(|b| b.spread.map(|s| s.max))
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.2 } else { 1.0 };
    let n = bars.len();
    let mut chart = ChartBuilder::on(area)
        .caption(
            caption,
            ("sans-serif", 18).into_font().style(FontStyle::Bold),
        )
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(62)
        .build_cartesian_2d((0..n.saturating_sub(1)).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .y_desc(y_desc)
        .y_label_formatter(&|v| show(*v))
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map_or(String::new(), |b| b.label.clone()),
            _ => String::new(),
        })
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for (i, bar) in bars.iter().enumerate() {
        let Some(spread) = bar.spread else {
            chart.draw_series(std::iter::once(Text::new(
                "failed".to_string(),
                (SegmentValue::CenterOf(i), top * 0.05),
                ("sans-serif", 16).into_font().color(&RED),
            )))?;
            continue;
        };
        chart.draw_series(
            Histogram::vertical(&chart)
                .margin(18)
                .style(bar.color.filled())
                .data(std::iter::once((i, spread.median))),
        )?;
        if spread.max > spread.min {
            // Min-max whisker: a vertical line with short caps (pixel offsets at each end).
            let x = SegmentValue::CenterOf(i);
            let style = BLACK.stroke_width(2);
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x.clone(), spread.min), (x.clone(), spread.max)],
                style,
            )))?;
            chart.draw_series([spread.min, spread.max].map(|y| {
                EmptyElement::at((x.clone(), y)) + PathElement::new(vec![(-7, 0), (7, 0)], style)
            }))?;
        }
        chart.draw_series(std::iter::once(Text::new(
            show(spread.median),
            (SegmentValue::CenterOf(i), spread.max + top * 0.06),
            ("sans-serif", 15).into_font().color(&BLACK),
        )))?;
    }
    Ok(())
}

/// Throughput and CPU per GiB, one column per connection count.
pub(crate) fn receive(
    path: &Path,
    title: &str,
    machine: &Machine,
    zcrx: Option<&ZcrxInfo>,
    conns: &[usize],
    receivers: &[Receiver],
    summary: &[Summary],
) -> Result<()> {
    register_fonts()?;
    let width = 180 + 520 * conns.len() as u32;
    let root = BitMapBackend::new(path, (width, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let lines = header_lines(title, machine, zcrx, width);
    let (head, body) = root.split_vertically(header_height(lines.len()));
    title_block(&head, &lines)?;
    let panels = body.split_evenly((2, conns.len()));
    for (col, &c) in conns.iter().enumerate() {
        let group: Vec<&Summary> = receivers
            .iter()
            .filter_map(|r| summary.iter().find(|s| s.receiver == *r && s.conns == c))
            .collect();
        let bars = |metric: fn(&Summary) -> Option<Spread>| -> Vec<Bar> {
            group
                .iter()
                .map(|s| Bar {
                    label: short_label(s.receiver, zcrx),
                    color: color(s.receiver),
                    spread: metric(s),
                })
                .collect()
        };
        let conn_word = if c == 1 { "connection" } else { "connections" };
        bar_panel(
            &panels[col],
            &format!("{c} {conn_word}: throughput"),
            "Gbit/s",
            &bars(|s| s.gbps),
            |v| format!("{v:.1}"),
        )?;
        bar_panel(
            &panels[conns.len() + col],
            &format!("{c} {conn_word}: receiver CPU per GiB"),
            "CPU s/GiB (user+sys)",
            &bars(|s| s.cpu_s_per_gib),
            |v| format!("{v:.3}"),
        )?;
    }
    root.present()?;
    Ok(())
}

/// Memory per idle connection and the busy connections' throughput.
pub(crate) fn scaling(
    path: &Path,
    title: &str,
    machine: &Machine,
    zcrx: Option<&ZcrxInfo>,
    summary: &[ScalingSummary],
) -> Result<()> {
    register_fonts()?;
    let width = 1200;
    let root = BitMapBackend::new(path, (width, 660)).into_drawing_area();
    root.fill(&WHITE)?;
    let lines = header_lines(title, machine, zcrx, width);
    let (head, body) = root.split_vertically(header_height(lines.len()));
    title_block(&head, &lines)?;
    let panels = body.split_evenly((1, 3));
    // Values are scaled to the axis unit first, so the ticks fall on round numbers.
    let bars = |metric: fn(&ScalingSummary) -> Option<Spread>, unit: f64| -> Vec<Bar> {
        summary
            .iter()
            .map(|s| Bar {
                label: match s.receiver {
                    Receiver::TokioRead => "tokio read 64 KiB".into(),
                    r => short_label(r, zcrx),
                },
                color: color(s.receiver),
                spread: metric(s).map(|v| Spread {
                    median: v.median / unit,
                    min: v.min / unit,
                    max: v.max / unit,
                }),
            })
            .collect()
    };
    bar_panel(
        &panels[0],
        "resident memory per idle connection",
        "KiB",
        &bars(|s| s.bytes_per_idle_conn, 1024.0),
        |v| format!("{v:.1}"),
    )?;
    bar_panel(
        &panels[1],
        "peak RSS of the receiver",
        "MiB",
        &bars(|s| s.peak_rss, (1 << 20) as f64),
        |v| format!("{v:.0}"),
    )?;
    bar_panel(
        &panels[2],
        "busy connections: throughput",
        "Gbit/s",
        &bars(|s| s.busy_gbps, 1.0),
        |v| format!("{v:.1}"),
    )?;
    root.present()?;
    Ok(())
}

/// The proxy benchmark (`proxy-throughput --results`): throughput and the proxy's CPU per
/// GiB, tokio-zcrx against `copy_bidirectional`, one column per connection count.
pub(crate) fn proxy(path: &Path, results: &serde_json::Value) -> Result<()> {
    register_fonts()?;
    let rows = results["results"]
        .as_array()
        .ok_or_else(|| anyhow!("no `results` in the proxy benchmark's file"))?;
    let width = 180 + 520 * rows.len() as u32;
    let root = BitMapBackend::new(path, (width, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let mode = results["mode"].as_str().unwrap_or("?");
    let how = match mode {
        "copy" => "copy mode: plain reads and writes".to_string(),
        _ => format!("{mode} mode: zcrx receive, SEND_ZC sends"),
    };
    let mut lines = vec![
        format!("proxy: tokio-zcrx ({how}) vs tokio copy_bidirectional"),
        results["machine"].as_str().unwrap_or("").to_string(),
    ];
    lines.push(format!(
        "{} alternating rounds of {} s per proxy; median and min-max; one direction, {} KiB \
         client writes{}",
        results["rounds"],
        results["secs"],
        results["io_size"].as_u64().unwrap_or(0) >> 10,
        match results["netns"].as_str() {
            Some(_) => "; clients and upstream in the peer namespace, across netdevsim",
            None => "; loopback",
        }
    ));
    let (head, body) = root.split_vertically(header_height(lines.len()));
    title_block(&head, &lines)?;
    let panels = body.split_evenly((2, rows.len()));
    let spread = |v: &serde_json::Value| -> Option<Spread> {
        Some(Spread {
            median: v["median"].as_f64()?,
            min: v["min"].as_f64()?,
            max: v["max"].as_f64()?,
        })
    };
    for (col, row) in rows.iter().enumerate() {
        let conns = row["conns"].as_u64().unwrap_or(0);
        let proxies = row["proxies"].as_array().cloned().unwrap_or_default();
        let bars = |field: &str| -> Vec<Bar> {
            proxies
                .iter()
                .map(|p| {
                    let zcrx = p["proxy"] == "tokio-zcrx";
                    Bar {
                        label: if zcrx {
                            format!("tokio-zcrx ({mode})")
                        } else {
                            "copy_bidirectional".into()
                        },
                        color: color(if zcrx {
                            Receiver::TokioZcrx
                        } else {
                            Receiver::TokioRead
                        }),
                        spread: spread(&p[field]),
                    }
                })
                .collect()
        };
        let conn_word = if conns == 1 {
            "connection"
        } else {
            "connections"
        };
        let ratio = |field: &str| row[field]["median"].as_f64().unwrap_or(f64::NAN);
        bar_panel(
            &panels[col],
            &format!(
                "{conns} {conn_word}: throughput ({:.2}x)",
                ratio("throughput_ratio_per_round")
            ),
            "Gbit/s",
            &bars("gbps_spread"),
            |v| format!("{v:.2}"),
        )?;
        bar_panel(
            &panels[rows.len() + col],
            &format!(
                "{conns} {conn_word}: proxy CPU per GiB ({:.2}x)",
                ratio("cpu_ratio_per_round")
            ),
            "CPU s/GiB (user+sys)",
            &bars("cpu_spread"),
            |v| format!("{v:.2}"),
        )?;
    }
    root.present()?;
    Ok(())
}
