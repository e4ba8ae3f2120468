"""Execute a package's program: stages on a backend, exits, and batch compaction between them."""
