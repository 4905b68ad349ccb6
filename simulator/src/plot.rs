//! Charts of a run, of several runs side by side and of repeats over seeds,
//! each drawn as SVG and PNG.
//!
//! A run's rounds become [`Curve`]s (one metric of one task, or of the
//! run); [`run_charts`] puts a run's curves on a few charts (accuracy,
//! loss, traffic, clients, privacy), [`compare_charts`] draws one chart
//! per curve with a line per run, [`repeat_charts`] the mean over seeds
//! with a min–max band.
//!
//! PNG text is rendered by plotters' `ab_glyph` backend from a font
//! compiled into the binary (`assets/DejaVuSans-subset.ttf`: DejaVu Sans
//! cut to Latin-1 and a few symbols, 17 kB), so no fontconfig and no
//! system font is needed. The SVGs name the `sans-serif` family and leave
//! the rendering to the viewer.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::metrics::RoundMetrics;
use crate::SimError;

/// The bundled font (see the module docs and `assets/LICENSE-DejaVu`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");

/// Chart size in pixels (PNG) or user units (SVG).
const SIZE: (u32, u32) = (800, 500);

/// One metric over rounds.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    /// The chart it goes on in a run's plots (the file stem): `accuracy`,
    /// `loss`, `traffic`, `clients`, `privacy`.
    pub chart: &'static str,
    /// Unique per metric, the file stem of its compare chart:
    /// `accuracy_digits`, `bytes_up`, ...
    pub key: String,
    /// Its name on the run's chart: `digits`, `up (sealed updates)`, ...
    pub label: String,
    /// The y axis of its chart.
    pub y_desc: &'static str,
    /// (round, value), rounds increasing.
    pub points: Vec<(f64, f64)>,
}

/// One line on a chart, with an optional band (x, low, high) around it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub band: Vec<(f64, f64, f64)>,
}

/// One chart: a file stem, a title, an axis and its lines.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Chart {
    pub stem: String,
    pub title: String,
    pub y_desc: String,
    pub series: Vec<Series>,
}

/// The curves of a run: per task central accuracy (%), central loss and
/// the clients' mean training loss; MB up and down; accepted, dropped and
/// refused-or-late clients; epsilon when privacy is on. A curve with no
/// point (e.g. no DP) is left out.
pub fn curves(rounds: &[RoundMetrics]) -> Vec<Curve> {
    let mut tasks: Vec<String> = Vec::new();
    for r in rounds {
        for s in r.central.iter().chain(&r.train_loss) {
            if !tasks.contains(&s.task) {
                tasks.push(s.task.clone());
            }
        }
    }
    let x = |r: &RoundMetrics| r.round as f64;
    let mut out = Vec::new();
    let mut push = |chart, key: String, label: String, y_desc, points: Vec<(f64, f64)>| {
        if !points.is_empty() {
            out.push(Curve {
                chart,
                key,
                label,
                y_desc,
                points,
            });
        }
    };
    for t in &tasks {
        let central = |f: fn(&crate::TaskScore) -> f64| -> Vec<(f64, f64)> {
            rounds
                .iter()
                .filter_map(|r| {
                    r.central
                        .iter()
                        .find(|s| &s.task == t)
                        .map(|s| (x(r), f(s)))
                })
                .collect()
        };
        push(
            "accuracy",
            format!("accuracy_{t}"),
            t.clone(),
            "central accuracy (%)",
            central(|s| 100.0 * f64::from(s.accuracy)),
        );
        push(
            "loss",
            format!("loss_{t}"),
            format!("{t} central"),
            "loss",
            central(|s| f64::from(s.loss)),
        );
        let train = rounds
            .iter()
            .filter_map(|r| {
                r.train_loss
                    .iter()
                    .find(|s| &s.task == t)
                    .map(|s| (x(r), f64::from(s.loss)))
            })
            .collect();
        push(
            "loss",
            format!("train_loss_{t}"),
            format!("{t} clients' training"),
            "loss",
            train,
        );
    }
    let per_round = |f: fn(&RoundMetrics) -> f64| rounds.iter().map(|r| (x(r), f(r))).collect();
    push(
        "traffic",
        "bytes_up".into(),
        "up (sealed updates)".into(),
        "MB per round",
        per_round(|r| r.bytes_up as f64 / 1e6),
    );
    push(
        "traffic",
        "bytes_down".into(),
        "down (model)".into(),
        "MB per round",
        per_round(|r| r.bytes_down as f64 / 1e6),
    );
    push(
        "clients",
        "accepted".into(),
        "accepted".into(),
        "clients per round",
        per_round(|r| r.accepted as f64),
    );
    push(
        "clients",
        "dropped".into(),
        "dropped".into(),
        "clients per round",
        per_round(|r| r.dropped as f64),
    );
    push(
        "clients",
        "refused".into(),
        "refused or late".into(),
        "clients per round",
        per_round(|r| (r.refused + r.late) as f64),
    );
    let eps = rounds
        .iter()
        .filter_map(|r| r.privacy.as_ref().map(|p| (x(r), p.epsilon)))
        .collect();
    push(
        "privacy",
        "epsilon".into(),
        "epsilon".into(),
        "epsilon spent",
        eps,
    );
    out
}

/// A run's charts: its curves grouped by [`Curve::chart`], one line per curve.
pub fn run_charts(name: &str, rounds: &[RoundMetrics]) -> Vec<Chart> {
    group_by_chart(
        name,
        curves(rounds).into_iter().map(|c| {
            let s = Series {
                label: c.label.clone(),
                points: c.points.clone(),
                band: Vec::new(),
            };
            (c, s)
        }),
    )
}

fn group_by_chart(name: &str, items: impl IntoIterator<Item = (Curve, Series)>) -> Vec<Chart> {
    let mut charts: Vec<Chart> = Vec::new();
    for (c, s) in items {
        let at = match charts.iter().position(|ch| ch.stem == c.chart) {
            Some(i) => i,
            None => {
                charts.push(Chart {
                    stem: c.chart.to_string(),
                    title: format!("{name}: {}", c.chart),
                    y_desc: c.y_desc.to_string(),
                    series: Vec::new(),
                });
                charts.len() - 1
            }
        };
        charts[at].series.push(s);
    }
    charts
}

/// Several runs on one chart per metric ([`Curve::key`]), a line per run
/// labelled with its name; a metric only some runs have shows those.
pub fn compare_charts(runs: &[(String, Vec<RoundMetrics>)]) -> Vec<Chart> {
    let mut charts: Vec<Chart> = Vec::new();
    for (name, rounds) in runs {
        for c in curves(rounds) {
            let series = Series {
                label: name.clone(),
                points: c.points,
                band: Vec::new(),
            };
            match charts.iter_mut().find(|ch| ch.stem == c.key) {
                Some(ch) => ch.series.push(series),
                None => charts.push(Chart {
                    stem: c.key.clone(),
                    title: format!("{}: {}", c.label, c.y_desc),
                    y_desc: c.y_desc.to_string(),
                    series: vec![series],
                }),
            }
        }
    }
    charts
}

/// Repeats of one experiment: per curve of a run, the mean over the runs
/// at each round all of them have, inside a band from the lowest to the
/// highest value (min–max); grouped as [`run_charts`] groups them.
pub fn repeat_charts(name: &str, runs: &[Vec<RoundMetrics>]) -> Vec<Chart> {
    let per_run: Vec<Vec<Curve>> = runs.iter().map(|r| curves(r)).collect();
    let Some(first) = per_run.first() else {
        return Vec::new();
    };
    let items = first.iter().filter_map(|c| {
        let same: Vec<&Curve> = per_run
            .iter()
            .map(|cs| cs.iter().find(|d| d.key == c.key))
            .collect::<Option<_>>()?;
        let mut s = Series {
            label: c.label.clone(),
            ..Series::default()
        };
        for &(x, _) in &c.points {
            let ys: Vec<f64> = same
                .iter()
                .filter_map(|d| d.points.iter().find(|p| p.0 == x).map(|p| p.1))
                .collect();
            if ys.len() == same.len() {
                let mean = ys.iter().sum::<f64>() / ys.len() as f64;
                let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                s.points.push((x, mean));
                s.band.push((x, lo, hi));
            }
        }
        Some((c.clone(), s))
    });
    let mut charts = group_by_chart(name, items.collect::<Vec<_>>());
    for ch in &mut charts {
        ch.title
            .push_str(&format!(" (mean of {} seeds, band min–max)", runs.len()));
    }
    charts
}

/// Writes `<stem>.svg` and `<stem>.png` of each chart into `dir`.
pub fn write_charts(dir: &Path, charts: &[Chart]) -> Result<(), SimError> {
    std::fs::create_dir_all(dir).map_err(|source| SimError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for c in charts {
        write_svg(&dir.join(format!("{}.svg", c.stem)), c)?;
        write_png(&dir.join(format!("{}.png", c.stem)), c)?;
    }
    Ok(())
}

/// Central accuracy per round for each task into `path` (SVG): the
/// `accuracy` chart of [`run_charts`].
pub fn accuracy_plot(path: &Path, title: &str, rounds: &[RoundMetrics]) -> Result<(), SimError> {
    let mut chart = run_charts("", rounds)
        .into_iter()
        .find(|c| c.stem == "accuracy")
        .unwrap_or_default();
    chart.title = title.to_string();
    write_svg(path, &chart)
}

pub fn write_svg(path: &Path, chart: &Chart) -> Result<(), SimError> {
    register_font()?;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    draw(root, chart).map_err(|e| plot_err(path, &e))
}

pub fn write_png(path: &Path, chart: &Chart) -> Result<(), SimError> {
    register_font()?;
    let (w, h) = SIZE;
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        draw(root, chart).map_err(|e| plot_err(path, &e))?;
    }
    let file = std::fs::File::create(path).map_err(|source| SimError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()
        .and_then(|mut wr| wr.write_image_data(&rgb))
        .map_err(|e| plot_err(path, &e))
}

fn plot_err(path: &Path, e: &dyn std::fmt::Display) -> SimError {
    SimError::Plot(format!("{}: {e}", path.display()))
}

/// Makes the bundled font plotters' `sans-serif`, once per process.
fn register_font() -> Result<(), SimError> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(SimError::Plot("the bundled font does not parse".into()))
    }
}

/// The y range of a chart's lines and bands, with a margin; a flat line
/// gets a unit range.
fn y_range(chart: &Chart) -> (f64, f64) {
    let ys = chart.series.iter().flat_map(|s| {
        s.points
            .iter()
            .map(|p| p.1)
            .chain(s.band.iter().flat_map(|b| [b.1, b.2]))
    });
    let (lo, hi) = ys
        .filter(|y| y.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
            (a.min(y), b.max(y))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    let lo = if lo >= 0.0 && lo - pad < 0.0 {
        0.0
    } else {
        lo - pad
    };
    if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi + pad)
    }
}

/// The legend goes in the right-hand corner the lines end away from.
fn legend_corner(chart: &Chart, mid: f64) -> SeriesLabelPosition {
    let ends: Vec<f64> = chart
        .series
        .iter()
        .filter_map(|s| s.points.last().map(|p| p.1))
        .collect();
    if ends.iter().sum::<f64>() / ends.len().max(1) as f64 > mid {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    }
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    chart: &Chart,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let x_max = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let x_min = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(x_max, f64::min)
        .min(x_max - 1.0);
    let (y_lo, y_hi) = y_range(chart);
    let mut ctx = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min..x_max, y_lo..y_hi)?;
    ctx.configure_mesh()
        .x_desc("round")
        .y_desc(chart.y_desc.as_str())
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, s) in chart.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        if !s.band.is_empty() {
            let outline: Vec<(f64, f64)> = s
                .band
                .iter()
                .map(|b| (b.0, b.2))
                .chain(s.band.iter().rev().map(|b| (b.0, b.1)))
                .collect();
            ctx.draw_series(std::iter::once(Polygon::new(
                outline,
                color.mix(0.2).filled(),
            )))?;
        }
        ctx.draw_series(LineSeries::new(
            s.points.iter().copied(),
            color.stroke_width(2),
        ))?
        .label(s.label.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    ctx.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(legend_corner(chart, (y_lo + y_hi) / 2.0))
        .draw()?;
    root.present()
}
