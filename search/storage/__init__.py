"""Where a study lives: storage URLs, the study's recorded attributes, the driver lock and heartbeats, and a storage
that survives a database restart."""
