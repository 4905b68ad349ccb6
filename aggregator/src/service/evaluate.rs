//! Central evaluation: how the service scores the global model after a
//! round. It runs on a blocking thread, after the round's checkpoint is
//! written, so an evaluation that fails or is slow never loses a round.

use cohort_protocol::ParamGroups;
use cohort_tasks::{Dataset, SharedModel};
use serde::Serialize;
use tracing::warn;

/// One task's score of the global model, as written to `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Score {
    pub task: String,
    pub accuracy: f32,
    pub loss: f32,
}

/// Scores the global model after `round`. Implement it for an evaluation
/// of your own (other metrics, a held-out set that is not a classification
/// test split); [`TestSetEvaluator`] is the default. Called on a blocking
/// thread: it may take its time, but must not panic.
pub trait CentralEvaluator: Send + Sync {
    fn evaluate(&self, round: u64, global: &ParamGroups) -> Vec<Score>;
}

/// The model's accuracy and loss on each task's test set (what
/// `cohort-aggregator` does for every task of the experiment that names a
/// data set). A task whose evaluation fails is logged and left out.
#[derive(Debug)]
pub struct TestSetEvaluator {
    model: SharedModel,
    tests: Vec<(String, Dataset)>,
}

impl TestSetEvaluator {
    /// `tests`: (task, test set) pairs; each task must be one of the model's.
    pub fn new(model: SharedModel, tests: Vec<(String, Dataset)>) -> Self {
        TestSetEvaluator { model, tests }
    }

    /// The tasks it scores.
    pub fn tasks(&self) -> impl Iterator<Item = &str> {
        self.tests.iter().map(|(t, _)| t.as_str())
    }
}

impl CentralEvaluator for TestSetEvaluator {
    fn evaluate(&self, round: u64, global: &ParamGroups) -> Vec<Score> {
        let mut out = Vec::with_capacity(self.tests.len());
        for (task, test) in &self.tests {
            match self.model.evaluate(global, task, test, None) {
                Ok(m) => out.push(Score {
                    task: task.clone(),
                    accuracy: m.accuracy,
                    loss: m.loss,
                }),
                // The round's checkpoint is written: an evaluation error
                // loses nothing.
                Err(e) => {
                    warn!(round, task = %task, error = %e, "central evaluation failed; the round is kept")
                }
            }
        }
        out
    }
}
