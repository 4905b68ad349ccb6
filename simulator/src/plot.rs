//! Accuracy per round per task, as an SVG chart.

use std::path::Path;

use plotters::prelude::*;

use crate::metrics::RoundMetrics;
use crate::SimError;

/// Draws central accuracy per round for each task into `path` (SVG).
pub fn accuracy_plot(path: &Path, title: &str, rounds: &[RoundMetrics]) -> Result<(), SimError> {
    let err = |e: &dyn std::fmt::Display| SimError::Plot(format!("{}: {e}", path.display()));
    let tasks: Vec<String> = rounds
        .iter()
        .find(|r| !r.central.is_empty())
        .map(|r| r.central.iter().map(|s| s.task.clone()).collect())
        .unwrap_or_default();
    let max_round = rounds.iter().map(|r| r.round).max().unwrap_or(1).max(1);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0u64..max_round, 0f32..100f32)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("central accuracy (%)")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, task) in tasks.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(u64, f32)> = rounds
            .iter()
            .filter_map(|r| {
                r.central
                    .iter()
                    .find(|s| &s.task == task)
                    .map(|s| (r.round, 100.0 * s.accuracy))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(task.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
