//! Cohort's aggregator. See ARCHITECTURE.md.
