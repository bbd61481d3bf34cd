//! Holder of the workspace-level integration tests and examples; no code of its own.
