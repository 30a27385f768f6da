"""What the server and the trainer both handle, and so both may import: the preference
store, the label statistics (acquisition, agreement) and the training job's schema.
No grpc, no torch: plain Python, sqlite3 and numpy."""
