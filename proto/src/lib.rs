//! capsnet-proto: placeholder until its issue lands (see DESIGN.md).
