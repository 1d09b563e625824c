//! capsnet-worker: placeholder until its issue lands (see DESIGN.md).
