//! mqlock-fuse (placeholder until its issue lands)
