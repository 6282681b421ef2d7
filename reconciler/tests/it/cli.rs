//! CLI behaviour: determinism, git revisions, schemas, fmt, exit codes.
