//! capsnet-coordinator: placeholder until its issue lands (see DESIGN.md).
