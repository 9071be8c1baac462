"""featurestore: a content-addressed, multi-process-safe cache of Arrow tables and computed features."""
