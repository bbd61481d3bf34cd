//! mqlock
