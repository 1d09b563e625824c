//! `capsnet plot RUN_DIR...`: training loss, test accuracy and images/s against step and wall
//! time, several runs overlaid, from their metrics.jsonl (single-process and distributed runs
//! alike), as PNG or SVG.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use capsnet_bench::plots::{self, Panel, Series, XAxis};
use clap::Args;

use crate::exit::ConfigError;

#[derive(Args)]
pub struct PlotArgs {
    /// Run folders (each with a metrics.jsonl), drawn over each other.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The image to write: PNG, or SVG when it ends in .svg.
    #[arg(long, default_value = "curves.png")]
    out: PathBuf,
    /// The runs' names in the legend, comma-separated [default: the folders' names].
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// The font of the PNG's text.
    #[arg(long, default_value = plots::FONT)]
    font: PathBuf,
}

/// What one run's metrics.jsonl says, as points.
#[derive(Default)]
struct Curves {
    /// (step, wall seconds, value) per training line.
    loss: Vec<(f64, Option<f64>, f64)>,
    images_per_s: Vec<(f64, Option<f64>, f64)>,
    accuracy: Vec<(f64, Option<f64>, f64)>,
}

pub fn run(a: PlotArgs) -> Result<()> {
    if !a.labels.is_empty() && a.labels.len() != a.runs.len() {
        return Err(ConfigError(format!(
            "--labels names {} runs, but {} run folders are given",
            a.labels.len(),
            a.runs.len()
        ))
        .into());
    }
    let mut runs = vec![];
    for (i, dir) in a.runs.iter().enumerate() {
        let label = a.labels.get(i).cloned().unwrap_or_else(|| {
            dir.file_name()
                .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into())
        });
        runs.push((label, read(dir)?));
    }
    let minutes = runs
        .iter()
        .flat_map(|(_, c)| c.loss.iter().filter_map(|p| p.1))
        .fold(0.0f64, f64::max)
        > 600.0;
    let (wall_unit, wall_div) = if minutes {
        ("wall time (min)", 60.0)
    } else {
        ("wall time (s)", 1.0)
    };
    let mut panels = vec![];
    type Pick = fn(&Curves) -> &Vec<(f64, Option<f64>, f64)>;
    // Per-step values are noisy: each run's are averaged in windows of a hundredth of its
    // length (evaluations are not).
    let kinds: [(&str, Pick, bool); 3] = [
        ("training loss", |c| &c.loss, true),
        ("test accuracy", |c| &c.accuracy, false),
        ("images/s", |c| &c.images_per_s, true),
    ];
    for (name, pick, smoothed) in kinds {
        let title = if smoothed {
            format!("{name} (mean of each 1% of a run)")
        } else {
            name.to_string()
        };
        for wall in [false, true] {
            let series = runs
                .iter()
                .map(|(label, c)| {
                    let pts: Vec<(f64, f64)> = pick(c)
                        .iter()
                        .filter_map(|&(step, t, v)| {
                            if wall {
                                t.map(|t| (t / wall_div, v))
                            } else {
                                Some((step, v))
                            }
                        })
                        .collect();
                    let window = if smoothed {
                        (pts.len() / 100).max(1)
                    } else {
                        1
                    };
                    Series {
                        label: label.clone(),
                        points: moving_mean(&pts, window),
                    }
                })
                .collect();
            panels.push(Panel {
                title: title.clone(),
                x_desc: if wall {
                    wall_unit.into()
                } else {
                    "step".into()
                },
                y_desc: name.into(),
                x_axis: XAxis::Linear,
                y_range: None,
                legend_upper_right: true,
                series,
            });
        }
    }
    plots::draw(&a.out, &a.font, &panels, 2, (640, 400))?;
    println!("plot: {} ({} runs)", a.out.display(), runs.len());
    Ok(())
}

/// The mean of each `n` consecutive points (x and y), so that noisy per-step values read.
fn moving_mean(pts: &[(f64, f64)], n: usize) -> Vec<(f64, f64)> {
    if n <= 1 {
        return pts.to_vec();
    }
    pts.chunks(n)
        .map(|c| {
            let k = c.len() as f64;
            (
                c.iter().map(|p| p.0).sum::<f64>() / k,
                c.iter().map(|p| p.1).sum::<f64>() / k,
            )
        })
        .collect()
}

/// The points of `dir/metrics.jsonl`: `train` lines (single process), `round` lines
/// (distributed: the step is the round count) and `eval` lines.
fn read(dir: &Path) -> Result<Curves> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
    let mut c = Curves::default();
    let mut t0: Option<f64> = None;
    // Distributed runs before lines had `unix_s`: wall time is the sum of the rounds' times.
    let mut rounds_s = 0.0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let unix = v["unix_s"].as_f64();
        if let Some(u) = unix {
            t0.get_or_insert(u);
        }
        let wall = |fallback: Option<f64>| unix.and_then(|u| t0.map(|t| u - t)).or(fallback);
        let num = |k: &str| v[k].as_f64();
        match v["kind"].as_str() {
            Some("train") => {
                let (Some(step), Some(loss)) = (num("step"), num("loss")) else {
                    continue;
                };
                let t = wall(None);
                c.loss.push((step, t, loss));
                if let Some(ips) = num("images_per_s") {
                    c.images_per_s.push((step, t, ips));
                }
            }
            Some("round") => {
                let Some(round) = num("round") else { continue };
                rounds_s += num("round_s").unwrap_or(0.0);
                let t = wall(Some(rounds_s));
                if let Some(loss) = num("train_loss") {
                    c.loss.push((round + 1.0, t, loss));
                }
                if let Some(ips) = num("images_per_s") {
                    c.images_per_s.push((round + 1.0, t, ips));
                }
            }
            Some("eval") => {
                let (Some(step), Some(acc)) = (num("step").or(num("round")), num("test_accuracy"))
                else {
                    continue;
                };
                let fallback = (rounds_s > 0.0).then_some(rounds_s);
                c.accuracy.push((step, wall(fallback), acc));
            }
            _ => {}
        }
    }
    if c.loss.is_empty() {
        bail!(ConfigError(format!(
            "{}: no training lines (kind \"train\" or \"round\")",
            path.display()
        )));
    }
    Ok(c)
}
