//! The same model over the network: an aggregator and nodes of a real
//! federation (libp2p, sealed updates, checkpoints), run from this crate's
//! binary through the library drivers `cohort_aggregator::service` and
//! `cohort_node::agent`. The only thing this program adds is its model
//! registry; everything else is the code `cohort-aggregator` and
//! `cohort-node` run.

use std::path::Path;

use cohort_aggregator::service::{Aggregator, AggregatorConfig, FederationConfig};
use cohort_node::agent::{Agent, NodeConfig};

use crate::{registry, scheduled_momentum};

/// The aggregator of `experiment` (cohort-sim's format: `backbone =
/// "my_resmlp"` names our model), with its folder, addresses and access
/// from `cfg`; with `our_strategy`, it aggregates with
/// [`crate::strategy::ScheduledMomentum`] instead of the experiment's
/// strategy.
pub fn aggregator(
    cfg: AggregatorConfig,
    experiment: &Path,
    our_strategy: bool,
) -> anyhow::Result<Aggregator> {
    let fed = FederationConfig::load(experiment)?;
    let rounds = fed.rounds;
    let agg = Aggregator::from_config(cfg, fed, &registry())?;
    Ok(if our_strategy {
        agg.with_strategy(move || scheduled_momentum(rounds))
    } else {
        agg
    })
}

/// A node of a node file whose `backbone` may name our model.
pub fn node(cfg: NodeConfig) -> anyhow::Result<Agent> {
    Ok(Agent::from_config(cfg, &registry())?)
}
