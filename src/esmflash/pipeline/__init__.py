"""The streaming embedding pipeline: FASTA in, resumable work units, finished output files."""
