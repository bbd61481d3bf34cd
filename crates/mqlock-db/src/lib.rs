//! mqlock-db (placeholder until its issue lands)
