//! Cohort's learning side. See ARCHITECTURE.md.
pub use cohort_protocol::{Layout, ParamGroups};
