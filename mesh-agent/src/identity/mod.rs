//! Workload identities, the mesh CA and TLS configs (being written).
